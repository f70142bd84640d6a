"""``params.yaml`` -> typed, frozen dataclasses: the one config source.

Every section of ``params.yaml`` is one dataclass below; each field carries a short comment. Unknown or
missing keys and values of the wrong type are an :class:`~src.errors.InputError` naming the key.
Command lines may override single values with ``--set section.key=value`` (YAML-parsed value).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from src.errors import InputError

PARAMS_FILE = "params.yaml"


@dataclass(frozen=True)
class DataConfig:
    h5: str  # competition-layout HDF5 (images/{Train,Test}/S_k, spots/{Train,Test}/S_k)
    truth: str  # optional truth file of simulated data (test abundances, noise-free expectation); "" if none


@dataclass(frozen=True)
class SimulateConfig:
    seed: int  # generator seed: same seed, same bytes
    n_train: int  # number of training slides
    n_test: int  # number of test slides
    size: int  # slide edge in pixels (real slides are about 2000)
    pitch: float  # hexagonal spot pitch in pixels (Visium at this scale: about 25)
    n_types: int  # number of cell types (the competition has 35)
    tissue_extent: list[float]  # [low, high] tissue radius relative to the slide, drawn per slide
    offsets: list[list[int]] = field(default_factory=list)  # [dx, dy] misregistration of training slide i
    # (the correction that maps stored spots back onto the tissue, as patches.offsets); test slides are aligned


@dataclass(frozen=True)
class StainConfig:
    method: str  # vahadane | macenko | none
    reference: str  # slide fitted as the target stain ("" = first training slide, as the seed did)
    luminosity_standardize: bool  # staintools' brightness standardization before fitting/transforming
    fit_pixels: int  # tissue pixels sampled per slide to fit its stain matrix (once per slide)
    seed: int  # seed of that pixel sample


@dataclass(frozen=True)
class PatchesConfig:
    size: int  # patch edge in pixels, centred on the spot (competition scale: 224-400)
    registration: str  # auto: estimate each training slide's spot misregistration (dx, dy); none: trust x, y
    max_shift_px: int  # the estimate searches shifts up to this many px per axis (100 = 4 spot pitches)
    offsets: dict[str, list[int]] = field(default_factory=dict)  # slide -> hand-set [dx, dy] added to spot
    # x, y; overrides the estimate for that slide


@dataclass(frozen=True)
class ModelConfig:
    backbone: str  # any timm model name (timm.create_model(name, num_classes=0))
    pretrained: bool  # timm hub weights (needs network); ignored when `weights` is set
    weights: str  # local .safetensors / .pt state dict for offline machines ("" = none)
    input_size: int  # px fed to the backbone; 0 = the backbone's own data-config size
    context: int  # px of tissue around the spot the backbone sees (centre crop of the patch); 0 = whole patch
    unfrozen_blocks: int  # the last k blocks of the backbone train; 0 = frozen backbone
    fusion: str  # how coordinates join image features: product | concat | film | gated | none
    coord_dim: int  # width of the coordinate encoder
    hidden: int  # width of the fused representation (head input)
    dropout: float  # dropout in the head and coordinate encoder
    neighbour_radius: float  # px: a spot also sees the mean frozen descriptor of its slide's spots within it; 0 = off


@dataclass(frozen=True)
class LossConfig:
    alpha: float  # weight of (1 - soft Spearman); (1 - alpha) weighs the MSE
    regularization: float  # torchsort soft_rank regularization strength (-> 0: hard ranks)
    target_transform: str  # log (of abundance + log_epsilon) | log1p | rank (within spot) | raw
    log_epsilon: float  # added before `log`: abundances are strictly positive but span ~10 decades


@dataclass(frozen=True)
class TrainConfig:
    epochs: int  # passes over the training spots
    batch_size: int
    lr_backbone: float  # AdamW learning rate of the backbone's unfrozen blocks
    lr_head: float  # AdamW learning rate of the head, coordinate encoder and fusion
    weight_decay: float
    warmup_fraction: float  # share of steps with linear warm-up before the cosine decay
    grad_clip: float  # max gradient norm; 0 = no clipping
    seed: int
    flips: bool  # augmentation: random element of the dihedral group (flips, 90-degree turns)
    color_jitter: float  # brightness/contrast/saturation jitter strength; 0 = off
    resized_crop: float  # RandomResizedCrop minimum scale; 0 = off
    num_workers: int  # DataLoader worker processes
    feature_cache: bool  # cache the frozen backbone prefix per patch and dihedral variant (src/features.py)
    cache_dir: str  # where cached features live (never under git; safe to delete)
    compile: bool  # torch.compile the model's modules (worth it on a GPU; slow to start on a CPU)
    final: str  # the model stage `train` delivers: ensemble (the CV's fold models) | retrain (one on all spots)


@dataclass(frozen=True)
class CVConfig:
    scheme: str  # blocks (contiguous spatial blocks per slide) | leave_one_slide_out
    n_folds: int  # folds of the blocks scheme
    blocks_per_fold: int  # blocks each slide contributes to each fold
    buffer_px: float  # extra margin beyond "a training patch reaches a validation spot"
    seed: int  # assignment of blocks to folds


@dataclass(frozen=True)
class InferConfig:
    tta: list[str]  # dihedral transforms averaged at inference (identity, hflip, vflip, rot90, ...)
    smoothing_sigma: float  # Gaussian smoothing over neighbouring spots, px; 0 = off
    smoothing_truncate: float  # neighbours within truncate * sigma count
    batch_size: int


@dataclass(frozen=True)
class TuneConfig:
    trials: int  # the study's target of finished (complete + pruned) trials
    study: str  # study name inside the storage
    storage: str  # Optuna storage URL; "" = sqlite:///studies/studies.db
    sampler_seed: int  # TPE seed
    pruner: str  # wilcoxon | median | hyperband | none (fed with each CV fold's score)
    pruner_startup_trials: int  # complete trials before the pruner may prune
    sigma_grid: list[float]  # smoothing sigmas (px) each trial's out-of-fold predictions are scored with; the best is kept
    warm_start: int  # a new study first runs this many best recipes of earlier studies of the same name; 0 = off
    timeout_s: float  # stop starting new trials after this many seconds; 0 = no limit
    heartbeat_s: int  # RDB heartbeat interval; a trial silent for 2x this is failed and retried
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> field -> range or choices


@dataclass(frozen=True)
class Params:
    data: DataConfig
    simulate: SimulateConfig
    stain: StainConfig
    patches: PatchesConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    cv: CVConfig
    infer: InferConfig
    tune: TuneConfig


def _check_value(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"params: {where} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"params: {where} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise InputError(f"params: {where} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InputError(f"params: {where} must be a string, got {value!r}")
        return value
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(f"params: {where} must be a mapping, got {value!r}")
        _, val_type = typing.get_args(annotation)
        return {str(k): _check_value(v, val_type, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"params: {where} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_check_value(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is typing.Any:
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise InputError(f"params: section {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"params: unknown key {prefix}{unknown[0]} (known: {', '.join(known)})")
    missing = [k for k in known if k not in raw]
    if missing:
        raise InputError(f"params: missing key {prefix}{missing[0]}")
    return cls(**{k: _check_value(raw[k], hints[k], prefix + k) for k in known})


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stain.method=macenko"`` -> (["stain", "method"], "macenko"); the value is YAML-parsed."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value, e.g. stain.method=macenko")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of the raw params dict with ``--set`` overrides applied (unknown keys raise)."""
    import copy

    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise InputError(f"--set {text!r}: unknown key {'.'.join(path[: i + 1])}")
            node = node[part]
        if not isinstance(node, dict) or (path[-1] not in node and not _is_open_mapping(path)):
            raise InputError(f"--set {text!r}: unknown key {'.'.join(path)}")
        node[path[-1]] = value
    return raw


def _is_open_mapping(path: list[str]) -> bool:
    """Keys under a ``dict[...]`` field (e.g. patches.offsets.S_1) may be new."""
    cls: Any = Params
    for part in path[:-1]:
        if typing.get_origin(cls) is dict:  # inside a mapping (e.g. tune.space.model.backbone): open
            return True
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return typing.get_origin(cls) is dict


def read_raw(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def params_from_dict(raw: dict) -> Params:
    return _build(Params, raw, "")


def load_params(path: str | Path = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Load ``params.yaml`` (plus ``--set`` overrides) into :class:`Params`."""
    return params_from_dict(apply_overrides(read_raw(path), overrides))


def to_dict(obj: Any) -> dict:
    """Dataclass -> plain dict (for checkpoints and YAML dumps)."""
    return dataclasses.asdict(obj)


def add_params_arguments(parser, example: str) -> None:
    """The ``--params`` and ``--set`` options every stage command shares."""
    parser.add_argument("--params", default=PARAMS_FILE, help=f"params file (default: {PARAMS_FILE})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one param, e.g. {example} (repeatable)")
