"""Self-describing checkpoints: everything evaluation and prediction need, without params.yaml or a study.

A checkpoint holds one or several recipes, each with its weight in the delivered prediction. A recipe
is the weights of one model or of an ensemble (the CV's fold models) with the model config, the
encoder it was built as (``src.model.encoders``: architecture and arguments, pooling), the target transform, the preprocessing the backbone was trained with and the inference settings (TTA,
smoothing; its spatial settings in spot pitches). Shared by all: the cell types, the patch size, the
resolution (µm/px) and median spot pitch (px) of the training slides, the stain reference and the rank
scale (the log abundance of each within-spot rank in the training data, which puts rank predictions on
the abundance scale: ``src.model.targets.rank_scale``), plus where it
came from: its format number, the versions of torch, timm, torchsort and numpy, the digest of the
code that rebuilds and runs it, and the digest of the patch store it was trained on. Loading refuses
formats it does not know, and a model whose rebuilt preprocessing differs from the recorded one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import torch

from src.core.errors import InputError
from src.core.files import atomic_path
from src.core.provenance import imported_modules, modules_digest, versions
from src.core.sections import InferConfig, LossConfig, ModelConfig
from src.data.spatial import COMPETITION_PITCH_PX, COMPETITION_UM_PER_PX
from src.model.encoders import Encoder, resolve_encoder
from src.model.network import Ensemble, RecipeEnsemble, SpatialCellModel

FORMAT = 7  # 1: before the preprocessing and provenance were recorded; 2: model.context in px; 3: one recipe
# at the top level; 4: no rank scale (all still read, except rank recipes of formats before 5); 5: neighbour
# radius and smoothing sigma in px of the competition's 25-px pitch, no resolution recorded; 6: no encoder
# recorded (a timm name, fed bilinearly: what src.model.encoders resolves it to)
LIBRARIES = ("torch", "timm", "torchsort", "numpy")
RUNS_A_CHECKPOINT = ("src.engine.inference", "src.model.checkpoint")  # and all they import


def code_version() -> str:
    """Digest of the code that rebuilds a checkpoint's model and predicts with it."""
    return modules_digest(imported_modules(RUNS_A_CHECKPOINT))


def save_checkpoint(path: str | Path, model: SpatialCellModel | Ensemble, *, targets: list[str],
                    loss: LossConfig, patch_size: int, infer: InferConfig, stain: dict, rank_scale: list[float],
                    data_digest: str = "", um_per_px: float = COMPETITION_UM_PER_PX,
                    pitch: float = COMPETITION_PITCH_PX) -> None:
    """One recipe (a model, or the fold models of one CV)."""
    save_recipes(path, [(model, loss, infer, 1.0)], targets=targets, patch_size=patch_size, stain=stain,
                 rank_scale=rank_scale, data_digest=data_digest, um_per_px=um_per_px, pitch=pitch)


def save_recipes(path: str | Path, recipes: list[tuple[SpatialCellModel | Ensemble, LossConfig, InferConfig, float]],
                 *, targets: list[str], patch_size: int, stain: dict, rank_scale: list[float],
                 data_digest: str = "", um_per_px: float = COMPETITION_UM_PER_PX,
                 pitch: float = COMPETITION_PITCH_PX) -> None:
    """Several recipes, each (model, its loss config, its inference settings, its weight)."""
    recipe_payloads = [_recipe_payload(model, loss, infer, weight) for model, loss, infer, weight in recipes]
    _share_equal_tensors([state for recipe in recipe_payloads for state in recipe["state_dicts"]])
    payload = {
        "format": FORMAT,
        "recipes": recipe_payloads,
        "targets": list(targets),
        "patch_size": int(patch_size),
        "um_per_px": float(um_per_px),
        "pitch": float(pitch),
        "stain": stain,
        "rank_scale": [float(v) for v in rank_scale],
        "versions": versions(LIBRARIES),
        "code_version": code_version(),
        "data_digest": data_digest,
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(_canonical(payload), f)  # a file object: the archive's folder is "archive", not the temp name


def _canonical(value):
    """The payload with every container made anew and every string interned. Pickle writes an object
    it has seen before as a reference, so whether two equal strings were one object (a config built
    from params.yaml) or two (one read back from the model store) would change the file's bytes;
    tensors are left as ``_share_equal_tensors`` made them."""
    if isinstance(value, dict):
        return type(value)((_canonical(k), _canonical(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_canonical(v) for v in value)
    return sys.intern(value) if isinstance(value, str) else value


def _recipe_payload(model: SpatialCellModel | Ensemble, loss: LossConfig, infer: InferConfig, weight: float) -> dict:
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    # Where the weights came from (a fold backbone under this checkout's cache, a hub name) is not
    # stored: the state dicts hold them, and a path would make two checkouts write different bytes.
    config = dataclasses.asdict(dataclasses.replace(model.cfg, weights="", pretrained=False))
    return {"model_config": config, "encoder": members[0].encoder.as_dict(),
            "preprocessing": dataclasses.asdict(model.preprocessing),
            "target_transform": loss.target_transform, "log_epsilon": loss.log_epsilon,
            "infer": dataclasses.asdict(infer), "weight": float(weight),
            "state_dicts": [m.state_dict() for m in members]}


def _share_equal_tensors(state_dicts: list[dict]) -> None:
    """Let equal tensors of different state dicts be one object, which ``torch.save`` writes once: the
    recipes of an ensemble fine-tune heads on the same fold backbones, so their frozen blocks repeat."""
    seen: dict[tuple, torch.Tensor] = {}
    for state in state_dicts:
        for name, tensor in state.items():
            data = tensor.detach().cpu().contiguous()
            key = (str(data.dtype), tuple(data.shape), hashlib.blake2b(data.view(-1).view(torch.uint8).numpy()
                                                                       if data.numel() else b"").hexdigest())
            state[name] = seen.setdefault(key, tensor)


RECIPE_KEYS = ("model_config", "preprocessing", "target_transform", "log_epsilon", "infer", "state_dicts")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[SpatialCellModel | Ensemble | RecipeEnsemble, dict]:
    """(model in eval mode, the rest of the checkpoint's fields). The model is an :class:`Ensemble`
    when one recipe holds several fold models, a :class:`RecipeEnsemble` when the checkpoint holds
    several recipes (its ``recipes`` pair every model with its own settings; ``meta`` then has no
    recipe fields)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # pickle/zip errors differ by torch version; all mean the same here
        raise InputError(f"{path}: not a checkpoint of this project ({type(err).__name__})") from None
    if isinstance(payload, dict) and "state_dict" in payload and "state_dicts" not in payload:
        raise InputError(f"{path}: written by an earlier version of this project (one model, no target "
                         "epsilon); rerun `dvc repro train` or `python -m src.train`")
    if isinstance(payload, dict) and "state_dicts" in payload and "model_config" in payload:  # formats 1-3
        payload = dict({k: v for k, v in payload.items() if k not in RECIPE_KEYS},
                       recipes=[dict({k: payload[k] for k in RECIPE_KEYS if k in payload}, weight=1.0)])
    if not isinstance(payload, dict) or not isinstance(payload.get("recipes"), list) or not payload["recipes"]:
        raise InputError(f"{path}: not a checkpoint of this project (no recipes or model_config/state_dicts)")
    written = payload.get("format", 1)
    if not isinstance(written, int) or written > FORMAT:
        raise InputError(f"{path}: checkpoint format {written} is newer than this code reads ({FORMAT}); "
                         f"update the project (it was written with {payload.get('versions', {})})")
    recipes = payload.pop("recipes")
    if "rank_scale" not in payload and any(r.get("target_transform") == "rank" for r in recipes):
        raise InputError(f"{path}: a recipe with rank targets, written before predictions were put on the "
                         "abundance scale; rerun `dvc repro train` (or `python -m src.train`)")
    payload.setdefault("rank_scale", [])
    payload.setdefault("um_per_px", COMPETITION_UM_PER_PX)  # formats before 6: the competition's scale
    payload.setdefault("pitch", COMPETITION_PITCH_PX)
    backbones: dict[tuple, torch.nn.Module] = {}  # one module per distinct backbone, across recipes
    loaded = [_load_recipe(path, recipe, written, payload, backbones) for recipe in recipes]
    meta = dict(payload, format=written)
    if len(loaded) == 1:
        model, settings = loaded[0]
        return model, dict(meta, **settings)
    return RecipeEnsemble([m for m, _ in loaded], [s for _, s in loaded]), meta


def _load_recipe(path: Path, recipe: dict, written: int, shared: dict,
                 backbones: dict[tuple, torch.nn.Module]) -> tuple[SpatialCellModel | Ensemble, dict]:
    # Weights come from the checkpoint: no hub download, no local backbone file needed.
    fields = {"neighbour_radius": 0.0, **recipe["model_config"]}  # checkpoints from before the field: none
    px = fields.get("context", 0)
    if written < 3 and isinstance(px, int):  # model.context was px (0 = the whole patch); now a share of the edge
        fields["context"] = 1.0 if not px else px / shared["patch_size"]
        if recipe.get("preprocessing") is not None:
            recipe = dict(recipe, preprocessing=dict(recipe["preprocessing"], context=fields["context"]))
    infer = dict(recipe["infer"])
    if written < 6:  # px set for the competition's 25-px pitch, now spot pitches
        fields["neighbour_radius"] = fields["neighbour_radius"] / COMPETITION_PITCH_PX
        infer["smoothing_sigma"] = infer["smoothing_sigma"] / COMPETITION_PITCH_PX
        recipe = dict(recipe, infer=infer)
    cfg = dataclasses.replace(ModelConfig(**fields), pretrained=False, weights="")
    encoder = Encoder.from_dict(recipe["encoder"]) if "encoder" in recipe else resolve_encoder(cfg.backbone)
    members = []
    for state in recipe["state_dicts"]:
        # Members whose backbones were saved as one (equal tensors are written once) share one module:
        # an ensemble over the folds of a frozen pathology encoder holds it once, not once per member.
        key = (cfg.backbone, tuple(sorted((k, v.untyped_storage().data_ptr(), v.storage_offset())
                                          for k, v in state.items() if k.startswith("backbone."))))
        member = SpatialCellModel(cfg, n_outputs=len(shared["targets"]), backbone=backbones.get(key), encoder=encoder,
                                  weights_follow=True)
        member.load_state_dict(state)
        backbones.setdefault(key, member.backbone)
        members.append(member)
    recorded = recipe.get("preprocessing")
    if recorded is not None:
        recorded = {"interpolation": "bilinear", **recorded}  # before it was recorded: always bilinear
    rebuilt = dataclasses.asdict(members[0].preprocessing)
    if recorded is not None and _as_lists(recorded) != _as_lists(rebuilt):
        raise InputError(f"{path}: the model was trained on preprocessing {recorded}, but timm "
                         f"{versions(('timm',))['timm']} builds {rebuilt} for {cfg.backbone}; use the versions "
                         f"it was written with ({shared.get('versions', {})})")
    model = members[0] if len(members) == 1 else Ensemble(members)
    settings = {k: v for k, v in recipe.items() if k != "state_dicts"}
    settings.update(infer=InferConfig(**recipe["infer"]), weight=float(recipe.get("weight", 1.0)))
    return model.eval(), settings


def _as_lists(values: dict) -> dict:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
