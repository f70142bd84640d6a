"""``params.yaml`` -> typed, frozen dataclasses: the one config source, checked when it is read.

Every section of ``params.yaml`` is one dataclass below; each field carries a short comment. Unknown or
missing keys, values of the wrong type, names outside a field's choices (``Literal``) and numbers
outside a field's bounds (``Annotated[..., AtLeast(...)]``) are an :class:`~src.core.errors.InputError`
naming the key and the value, raised by :func:`load_params` before any stage computes or writes
anything. Workers trust the config they are given. Command lines may override single values with
``--set section.key=value`` (YAML-parsed value).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal

import yaml

from src.core.checks import Above, AtLeast, Length, Section, Within, build, check_rules, convert
from src.core.errors import InputError

PARAMS_FILE = "params.yaml"

# Names a field may take. The modules that act on them key their registries by the same names
# (tests check that both agree).
StainMethod = Literal["vahadane", "macenko", "none"]
RegistrationMode = Literal["auto", "none"]
FusionName = Literal["product", "concat", "film", "gated", "none"]
TargetTransform = Literal["log", "log1p", "rank", "raw"]
FinalModel = Literal["ensemble", "retrain"]
SimulationFamily = Literal["compartments", "cells"]
CVScheme = Literal["blocks", "leave_one_slide_out"]
PrunerName = Literal["wilcoxon", "median", "hyperband", "none"]
Dihedral = Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "transpose", "antitranspose"]


Pair = Annotated[list[int], Length(2, "[dx, dy]")]


@dataclass(frozen=True)
class DataConfig(Section, key="data"):
    h5: str  # competition-layout HDF5 (images/{Train,Test}/S_k, spots/{Train,Test}/S_k)
    truth: str  # optional truth file of simulated data (test abundances, noise-free expectation); "" if none


@dataclass(frozen=True)
class SimulateConfig(Section, key="simulate"):
    seed: int  # generator seed: same seed, same bytes
    n_train: Annotated[int, AtLeast(0)]  # number of training slides
    n_test: Annotated[int, AtLeast(0)]  # number of test slides
    size: Annotated[int, AtLeast(64)]  # slide edge in pixels (real slides are about 2000)
    pitch: Annotated[float, Above(0)]  # hexagonal spot pitch in pixels (Visium at this scale: about 25)
    n_types: Annotated[int, AtLeast(2)]  # number of cell types (the competition has 35)
    tissue_extent: Annotated[list[Annotated[float, Above(0)]], Length(2, "[low, high]")]  # tissue radius
    # relative to the slide, drawn per slide
    family: SimulationFamily = "compartments"  # the embedded default | cells (src/data/simulation_cells.py)
    offsets: list[Pair] = field(default_factory=list)  # [dx, dy] misregistration of training slide i
    # (the correction that maps stored spots back onto the tissue, as patches.offsets); test slides are aligned

    def check(self) -> None:
        low, high = self.tissue_extent
        if low > high:
            raise InputError(f"params: simulate.tissue_extent = {self.tissue_extent}: expected [low, high], low <= high")
        if len(self.offsets) < self.n_train:
            raise InputError(f"params: simulate.offsets lists {len(self.offsets)} shifts for simulate.n_train = "
                             f"{self.n_train} training slides (one [dx, dy] each)")


@dataclass(frozen=True)
class StainConfig(Section, key="stain"):
    method: StainMethod
    reference: str  # slide fitted as the target stain ("" = first training slide, as the seed did)
    luminosity_standardize: bool  # staintools' brightness standardization before fitting/transforming
    fit_pixels: Annotated[int, AtLeast(64)]  # tissue pixels sampled per slide to fit its stain matrix
    seed: int  # seed of that pixel sample


@dataclass(frozen=True)
class PatchesConfig(Section, key="patches"):
    size: Annotated[int, AtLeast(8)]  # patch edge in pixels, centred on the spot (competition scale: 224-400)
    registration: RegistrationMode  # auto: estimate each training slide's misregistration (dx, dy); none: trust x, y
    max_shift_px: Annotated[int, AtLeast(0)]  # the estimate searches shifts up to this many px per axis
    offsets: dict[str, Pair] = field(default_factory=dict)  # slide -> hand-set [dx, dy] added to spot
    # x, y; overrides the estimate for that slide


@dataclass(frozen=True)
class ModelConfig(Section, key="model"):
    backbone: str  # any timm model name (timm.create_model(name, num_classes=0))
    pretrained: bool  # timm hub weights (needs network); ignored when `weights` is set
    weights: str  # local .safetensors / .pt state dict for offline machines ("" = none)
    input_size: Annotated[int, AtLeast(0)]  # px fed to the backbone; 0 = the backbone's own data-config size
    context: Annotated[float, Within(0.05, 1.0)]  # share of the patch edge the backbone sees (centre crop); 1 = all
    unfrozen_blocks: Annotated[int, AtLeast(0)]  # the last k blocks of the backbone train; 0 = frozen backbone
    fusion: FusionName  # how coordinates join image features
    coord_dim: Annotated[int, AtLeast(1)]  # width of the coordinate encoder
    hidden: Annotated[int, AtLeast(4)]  # width of the fused representation (head input; the head halves it twice)
    dropout: Annotated[float, Within(0, 0.95)]  # dropout in the head and coordinate encoder
    neighbour_radius: Annotated[float, AtLeast(0)]  # px: a spot also sees the mean frozen descriptor of its
    # slide's spots within it; 0 = off


@dataclass(frozen=True)
class LossConfig(Section, key="loss"):
    alpha: Annotated[float, Within(0, 1)]  # weight of (1 - soft Spearman); (1 - alpha) weighs the MSE
    regularization: Annotated[float, Above(0)]  # torchsort soft_rank regularization strength (-> 0: hard ranks)
    target_transform: TargetTransform  # log (of abundance + log_epsilon) | log1p | rank (within spot) | raw
    log_epsilon: Annotated[float, Above(0)]  # added before `log`: abundances are positive but span ~10 decades


@dataclass(frozen=True)
class TrainConfig(Section, key="train"):
    epochs: Annotated[int, AtLeast(1)]  # passes over the training spots
    batch_size: Annotated[int, AtLeast(2)]  # (BatchNorm in the head needs 2 spots per batch)
    lr_backbone: Annotated[float, Above(0)]  # AdamW learning rate of the backbone's unfrozen blocks
    lr_head: Annotated[float, Above(0)]  # AdamW learning rate of the head, coordinate encoder and fusion
    weight_decay: Annotated[float, AtLeast(0)]
    warmup_fraction: Annotated[float, Within(0, 1)]  # share of steps with linear warm-up before the cosine decay
    grad_clip: Annotated[float, AtLeast(0)]  # max gradient norm; 0 = no clipping
    seed: int
    flips: bool  # augmentation: random element of the dihedral group (flips, 90-degree turns)
    color_jitter: Annotated[float, AtLeast(0)]  # brightness/contrast/saturation jitter strength; 0 = off
    resized_crop: Annotated[float, Within(0, 1)]  # RandomResizedCrop minimum scale; 0 = off
    num_workers: Annotated[int, AtLeast(0)]  # DataLoader worker processes
    feature_cache: bool  # cache the frozen backbone prefix per patch and dihedral variant (src/model/feature_cache.py)
    cache_dir: str  # where cached features live (never under git; safe to delete)
    compile: bool  # torch.compile the trained modules (worth it on a GPU; slow to start on a CPU)
    final: FinalModel  # the model stage `train` delivers: the CV's fold models | one retrained on all spots

    def check(self) -> None:
        if self.feature_cache and (self.color_jitter > 0 or self.resized_crop > 0):
            raise InputError("params: train.feature_cache fixes the backbone input: set train.color_jitter and "
                             "train.resized_crop to 0 (dihedral flips stay available), or train.feature_cache: false")


@dataclass(frozen=True)
class CVConfig(Section, key="cv"):
    scheme: CVScheme  # blocks (contiguous spatial blocks per slide) | leave_one_slide_out
    n_folds: Annotated[int, AtLeast(2)]  # folds of the blocks scheme
    blocks_per_fold: Annotated[int, AtLeast(1)]  # blocks each slide contributes to each fold
    buffer_px: Annotated[float, AtLeast(0)]  # extra margin beyond "a training patch reaches a validation spot"
    seed: int  # assignment of blocks to folds


@dataclass(frozen=True)
class PretrainConfig(Section, key="pretrain"):
    epochs: Annotated[int, AtLeast(0)]  # the whole backbone's own training on each CV fold's training spots,
    # before the trials train a head on it (and its last model.unfrozen_blocks; src.engine.pretraining); 0 = off
    lr: Annotated[float, Above(0)]  # its AdamW learning rate (backbone and a small head)
    weight_decay: Annotated[float, AtLeast(0)]  # its AdamW weight decay
    context: Annotated[float, Within(0.05, 1.0)]  # share of the patch edge it sees
    log_epsilon: Annotated[float, Above(0)]  # its target: MSE on log(abundance + this)


@dataclass(frozen=True)
class InferConfig(Section, key="infer"):
    tta: Annotated[list[Dihedral], Length(-1, "transforms")]  # dihedral transforms averaged at inference
    smoothing_sigma: Annotated[float, AtLeast(0)]  # Gaussian smoothing over neighbouring spots, px; 0 = off
    smoothing_truncate: Annotated[float, Above(0)]  # neighbours within truncate * sigma count
    batch_size: Annotated[int, AtLeast(1)]


@dataclass(frozen=True)
class TuneConfig(Section, key="tune"):
    trials: Annotated[int, AtLeast(1)]  # the study's target of finished (complete + pruned) trials
    study: str  # study name inside the storage
    storage: str  # Optuna storage URL; "" = sqlite:///studies/studies.db
    sampler_seed: int  # TPE seed
    pruner: PrunerName  # fed with each CV fold's score
    pruner_startup_trials: Annotated[int, AtLeast(0)]  # complete trials before the pruner may prune
    sigma_grid: Annotated[list[Annotated[float, AtLeast(0)]], Length(-1, "sigmas")]  # smoothing sigmas (px) each
    # trial's out-of-fold predictions are scored with; the best is kept
    warm_start: Annotated[int, AtLeast(0)]  # a new study first runs this many best recipes of earlier studies; 0 = off
    timeout_s: Annotated[float, AtLeast(0)]  # stop starting new trials after this many seconds; 0 = no limit
    heartbeat_s: Annotated[int, AtLeast(1)]  # RDB heartbeat interval; a trial silent for 2x this is failed and retried
    ensemble_size: Annotated[int, AtLeast(0)]  # rounds of ensemble selection over complete trials (src.search.selection);
    # the ensemble is delivered where the nested CV scores it above the best trial; 0 = always the best trial
    space: dict[str, dict[str, Any]] = field(default_factory=dict)  # section -> field -> range or choices
    # (checked against these dataclasses by src.search.space.parse_space when a study or retrain reads it)


@dataclass(frozen=True)
class Params:
    data: DataConfig
    simulate: SimulateConfig
    stain: StainConfig
    patches: PatchesConfig
    model: ModelConfig
    loss: LossConfig
    train: TrainConfig
    pretrain: PretrainConfig
    cv: CVConfig
    infer: InferConfig
    tune: TuneConfig


def field_type(section: str, name: str) -> Any:
    """The annotation of ``section.name`` (with its choices and bounds), or None for an unknown field."""
    sections = typing.get_type_hints(Params)
    if section not in sections:
        return None
    return typing.get_type_hints(sections[section], include_extras=True).get(name)


def check_field(section: str, name: str, value: Any) -> Any:
    """``value`` checked as ``section.name`` would be in params.yaml (for searched values)."""
    annotation, where = field_type(section, name), f"{section}.{name}"
    value = convert(value, annotation, where)
    check_rules(value, annotation, where)
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stain.method=macenko"`` -> (["stain", "method"], "macenko"); the value is YAML-parsed."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value, e.g. stain.method=macenko")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of the raw params dict with ``--set`` overrides applied (unknown keys raise)."""
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
    return build(Params, raw, "")


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
