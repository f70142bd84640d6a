"""The sections of ``params.yaml``: frozen pydantic dataclasses, one per section, each field with its
bounds or choices in its annotation and what it does in its docstring (which the JSON Schema,
``params.schema.json``, carries to editors). A section is checked whenever it is made: from
params.yaml (``src.core.config.load_params``, one-line errors), by ``dataclasses.replace`` or in code.
YAML values are taken as written: an int where a float is expected is fine, nothing else converts
(``"5"`` is not a number, ``1`` is not true).
"""
from __future__ import annotations

from dataclasses import field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic.dataclasses import dataclass

from src.core.errors import InputError

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

# YAML values as they are written: an int where a float is expected is fine, nothing else converts.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
Text = Annotated[str, BeforeValidator(lambda v: "" if v is None else v), Strict()]  # `key:` alone is ""
Pair = Annotated[list[Int], Field(min_length=2, max_length=2)]  # [dx, dy]


def _empty_mapping(value: Any) -> Any:
    return {} if value is None else value


SECTION = ConfigDict(extra="forbid", use_attribute_docstrings=True, arbitrary_types_allowed=False)


def section(cls: type) -> type:
    """A params.yaml section: a frozen dataclass whose fields are checked whenever it is made."""
    return dataclass(frozen=True, config=SECTION)(cls)


@section
class DataConfig:
    h5: Text
    """Competition-layout HDF5 (images/{Train,Test}/S_k, spots/{Train,Test}/S_k)."""
    truth: Text
    """Truth file of the test slides (test abundances; simulated data also the noise-free expectation); "" if none."""


@section
class SimulateConfig:
    seed: Int
    """Generator seed: same seed, same bytes."""
    n_train: Annotated[Int, Field(ge=0)]
    """Number of training slides."""
    n_test: Annotated[Int, Field(ge=0)]
    """Number of test slides."""
    size: Annotated[Int, Field(ge=64)]
    """Slide edge in pixels (real slides are about 2000)."""
    pitch: Annotated[Float, Field(gt=0)]
    """Hexagonal spot pitch in the simulator's pixels of 2.115 µm (the competition's: 25; Visium's 100 µm: 47.3)."""
    n_types: Annotated[Int, Field(ge=2)]
    """Number of cell types (the competition has 35)."""
    tissue_extent: Annotated[list[Annotated[Float, Field(gt=0)]], Field(min_length=2, max_length=2)]
    """[low, high] tissue radius relative to the slide, drawn per slide."""
    family: SimulationFamily = "compartments"
    """compartments: the embedded default | cells: the held-out family (src/data/simulators/cells.py)."""
    offsets: list[Pair] = field(default_factory=list)
    """[dx, dy] misregistration of training slide i (the correction that maps stored spots back onto the
    tissue, as patches.offsets); test slides are aligned."""

    @model_validator(mode="after")
    def _related(self):
        low, high = self.tissue_extent
        if low > high:
            raise InputError(f"params: simulate.tissue_extent = {self.tissue_extent}: expected [low, high], low <= high")
        if len(self.offsets) < self.n_train:
            raise InputError(f"params: simulate.offsets lists {len(self.offsets)} shifts for simulate.n_train = "
                             f"{self.n_train} training slides (one [dx, dy] each)")
        return self


@section
class StainConfig:
    method: StainMethod
    """Stain normalization: vahadane | macenko | none."""
    reference: Text
    """Slide fitted as the target stain ("" = the first training slide, as the seed did)."""
    luminosity_standardize: Bool
    """staintools' brightness standardization before fitting and transforming."""
    fit_pixels: Annotated[Int, Field(ge=64)]
    """Tissue pixels sampled per slide to fit its stain matrix."""
    seed: Int
    """Seed of that pixel sample."""


@section
class PatchesConfig:
    size: Annotated[Int, Field(ge=8)]
    """Patch edge in pixels, centred on the spot (competition scale: 224-400)."""
    registration: RegistrationMode
    """auto: estimate each training slide's misregistration (dx, dy); none: trust x, y."""
    max_shift: Annotated[Float, Field(ge=0)]
    """The estimate searches shifts up to this many spot pitches per axis (the slide's own pitch)."""
    offsets: Annotated[dict[str, Pair], BeforeValidator(_empty_mapping)] = field(default_factory=dict)
    """Slide -> hand-set [dx, dy] added to its spots' x, y; overrides the estimate for that slide."""


@section
class ModelConfig:
    backbone: Text
    """An encoder preset (uni, uni2-h, h-optimus-0, h-optimus-1, virchow2, prov-gigapath, convnext_small,
    resnet10t) or any timm model name."""
    pretrained: Bool
    """The preset's (or timm's) hub weights (needs network); ignored when `weights` is set."""
    weights: Text
    """Offline weights: a state-dict file, a hub-style folder (config.json + model.safetensors), or a
    folder of them named by preset ("" = none)."""
    input_size: Annotated[Int, Field(ge=0)]
    """Px fed to backbones without their own size (presets of pretrained encoders and ViTs built for a
    fixed size take theirs); 0 = the timm data-config size."""
    context: Annotated[Float, Field(ge=0.05, le=1.0)]
    """Share of the patch edge the backbone sees (centre crop); 1 = all of it."""
    unfrozen_blocks: Annotated[Int, Field(ge=0)]
    """The last k blocks of the backbone train; 0 = frozen backbone."""
    fusion: FusionName
    """How coordinates join the image features."""
    coord_dim: Annotated[Int, Field(ge=1)]
    """Width of the coordinate encoder."""
    hidden: Annotated[Int, Field(ge=4)]
    """Width of the fused representation (the head's input; the head halves it twice)."""
    dropout: Annotated[Float, Field(ge=0, le=0.95)]
    """Dropout in the head and the coordinate encoder."""
    neighbour_radius: Annotated[Float, Field(ge=0)]
    """Spot pitches: a spot also sees the mean frozen descriptor of its slide's spots within it; 0 = off."""


@section
class LossConfig:
    alpha: Annotated[Float, Field(ge=0, le=1)]
    """Weight of (1 - soft Spearman); (1 - alpha) weighs the MSE."""
    regularization: Annotated[Float, Field(gt=0)]
    """torchsort soft_rank regularization strength (-> 0: hard ranks)."""
    target_transform: TargetTransform
    """log (of abundance + log_epsilon) | log1p | rank (within spot) | raw."""
    log_epsilon: Annotated[Float, Field(gt=0)]
    """Added before `log`: abundances are positive but span about ten decades."""


@section
class TrainConfig:
    epochs: Annotated[Int, Field(ge=1)]
    """Passes over the training spots."""
    batch_size: Annotated[Int, Field(ge=2)]
    """Spots per optimizer step (BatchNorm in the head needs 2)."""
    lr_backbone: Annotated[Float, Field(gt=0)]
    """AdamW learning rate of the backbone's unfrozen blocks."""
    lr_head: Annotated[Float, Field(gt=0)]
    """AdamW learning rate of the head, coordinate encoder and fusion."""
    weight_decay: Annotated[Float, Field(ge=0)]
    """AdamW weight decay."""
    warmup_fraction: Annotated[Float, Field(ge=0, le=1)]
    """Share of steps with linear warm-up before the cosine decay."""
    grad_clip: Annotated[Float, Field(ge=0)]
    """Max gradient norm; 0 = no clipping."""
    seed: Int
    """Seed of initialization, shuffling and augmentation."""
    flips: Bool
    """Augmentation: a random element of the dihedral group (flips, 90-degree turns)."""
    color_jitter: Annotated[Float, Field(ge=0)]
    """Brightness/contrast/saturation jitter strength; 0 = off."""
    resized_crop: Annotated[Float, Field(ge=0, le=1)]
    """RandomResizedCrop minimum scale; 0 = off."""
    num_workers: Annotated[Int, Field(ge=0)]
    """DataLoader worker processes."""
    feature_cache: Bool
    """Cache the frozen backbone prefix per patch and dihedral variant (src/model/feature_cache.py)."""
    cache_dir: Text
    """Where cached features, fold backbones and trained models live (never under git; safe to delete)."""
    compile: Bool
    """torch.compile the trained modules (worth it on a GPU; slow to start on a CPU)."""
    final: FinalModel
    """The model stage train delivers: the CV's fold models (ensemble) | one retrained on all spots."""

    @model_validator(mode="after")
    def _related(self):
        if self.feature_cache and (self.color_jitter > 0 or self.resized_crop > 0):
            raise InputError("params: train.feature_cache fixes the backbone input: set train.color_jitter and "
                             "train.resized_crop to 0 (dihedral flips stay available), or train.feature_cache: false")
        return self


@section
class CVConfig:
    scheme: CVScheme
    """blocks (contiguous spatial blocks per slide) | leave_one_slide_out."""
    n_folds: Annotated[Int, Field(ge=2)]
    """Folds of the blocks scheme."""
    blocks_per_fold: Annotated[Int, Field(ge=1)]
    """Blocks each slide contributes to each fold."""
    buffer: Annotated[Float, Field(ge=0)]
    """Extra margin, in spot pitches, beyond "a training patch reaches a validation spot"."""
    seed: Int
    """Assignment of blocks to folds."""


@section
class PretrainConfig:
    epochs: Annotated[Int, Field(ge=0)]
    """The whole backbone's own training on each CV fold's training spots, before the trials train a head
    on it (and its last model.unfrozen_blocks; src.engine.pretraining); 0 = off."""
    lr: Annotated[Float, Field(gt=0)]
    """Its AdamW learning rate (backbone and a small head)."""
    weight_decay: Annotated[Float, Field(ge=0)]
    """Its AdamW weight decay."""
    context: Annotated[Float, Field(ge=0.05, le=1.0)]
    """Share of the patch edge it sees."""
    log_epsilon: Annotated[Float, Field(gt=0)]
    """Its target: MSE on log(abundance + this)."""
    from_weights: Bool
    """Also train backbones that start from trained weights (model.pretrained or model.weights); false:
    those are used as they are (a pathology encoder is not overwritten at this rate)."""


@section
class InferConfig:
    tta: Annotated[list[Dihedral], Field(min_length=1)]
    """Dihedral transforms averaged at inference."""
    smoothing_sigma: Annotated[Float, Field(ge=0)]
    """Gaussian smoothing over neighbouring spots, in spot pitches; 0 = off."""
    smoothing_truncate: Annotated[Float, Field(gt=0)]
    """Neighbours within truncate * sigma count."""
    batch_size: Annotated[Int, Field(ge=1)]
    """Spots per inference batch."""


@section
class TuneConfig:
    trials: Annotated[Int, Field(ge=1)]
    """The study's target of finished (complete + pruned) trials."""
    study: Text
    """Study name inside the storage."""
    storage: Text
    """Optuna storage URL; "" = sqlite:///studies/studies.db."""
    sampler_seed: Int
    """TPE seed."""
    pruner: PrunerName
    """Fed with each CV fold's score."""
    pruner_startup_trials: Annotated[Int, Field(ge=0)]
    """Complete trials before the pruner may prune."""
    sigma_grid: Annotated[list[Annotated[Float, Field(ge=0)]], Field(min_length=1)]
    """Smoothing sigmas (spot pitches) each trial's out-of-fold predictions are scored with; the best is kept."""
    warm_start: Annotated[Int, Field(ge=0)]
    """A new study first runs this many best recipes of earlier studies of its data; 0 = off."""
    timeout_s: Annotated[Float, Field(ge=0)]
    """Stop starting new trials after this many seconds; 0 = no limit."""
    heartbeat_s: Annotated[Int, Field(ge=1)]
    """RDB heartbeat interval; a trial silent for 2x this is failed and retried."""
    ensemble_size: Annotated[Int, Field(ge=0)]
    """Rounds of ensemble selection over complete trials (src.search.selection); the ensemble is delivered
    where the nested CV scores it above the best trial; 0 = always the best trial."""
    space: Annotated[dict[str, dict[str, Any]], BeforeValidator(_empty_mapping)] = field(default_factory=dict)
    """Section -> field -> {low, high[, log, step]} or {choices: [...]} (checked against these sections by
    src.search.space.parse_space when a study or retrain reads it)."""


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
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
