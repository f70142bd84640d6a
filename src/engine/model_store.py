"""Trained models kept between runs, so that nothing is trained twice: every complete trial of a study
leaves its CV's fold models here, and stage ``train`` takes a delivered recipe's models from here instead
of running its CV again. ``train`` also stores each recipe's models as soon as they are built, so a
failure on a later recipe loses none of the earlier ones.

Entries are keyed by what the models depend on: every param their training reads (not the inference
settings), the patch store's content and the code that trains them. A model is stored without the
tensors it shares with its fold's pretrained backbone (``src.engine.pretraining``, in the same cache
folder), which head-only trials leave untouched: a trial's four fold models then take a few MB instead
of a backbone copy each; the same holds for weights from ``model.weights`` (a pathology encoder), named
by path, size and time. An entry whose weights file is gone or replaced is not used. The folder is
``train.cache_dir/models``, safe to delete with the rest of the cache.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from src.core.files import atomic_path
from src.core.locations import shared_path
from src.core.provenance import imported_modules, modules_digest
from src.core.sections import ModelConfig, Params
from src.data.preprocessing.patch_set import PatchSet
from src.engine.pretraining import backbone_folder
from src.model.backbone import read_state_dict
from src.model.encoders import WEIGHT_FILES, Encoder, weights_file
from src.model.network import SpatialCellModel

TRAINING_ROOTS = ("src.engine.final_model",)  # the code that trains a recipe's models, and all it imports
TRAINED_BY = ("model", "loss", "train", "pretrain", "cv")  # params sections training reads
RUN_ONLY = {"cache_dir", "num_workers", "compile", "feature_cache"}  # train keys that change no weight
_CODE: dict[str, str] = {}  # the training code's digest, computed once per process


def _code_digest() -> str:
    if "digest" not in _CODE:
        _CODE["digest"] = modules_digest(imported_modules(TRAINING_ROOTS))
    return _CODE["digest"]


def entry_key(params: Params, patch_set: PatchSet) -> str:
    recipe = {section: dataclasses.asdict(getattr(params, section)) for section in TRAINED_BY}
    recipe["train"] = {k: v for k, v in recipe["train"].items() if k not in RUN_ONLY}
    what = {"recipe": recipe, "patches": patch_set.digest(), "code": _code_digest()}
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _folder(params: Params) -> Path:
    return shared_path(params.train.cache_dir) / "models"


def save_models(params: Params, patch_set: PatchSet, models: list[SpatialCellModel], epochs: list[int]) -> Path:
    """Store a recipe's trained models (and the epochs each ran); returns the entry's file."""
    entries, backbones = [], backbone_folder(params)
    references: dict[Path, dict] = {}  # each weights file read once (a frozen encoder's folds share one)
    for model in models:
        state, base = model.state_dict(), Path(model.cfg.weights) if model.cfg.weights else None
        if base is not None and base.exists():  # leave out what the weights it started from hold unchanged
            if base not in references:
                references[base] = read_state_dict(base)
            shared = references[base]
            state = {k: v for k, v in state.items()
                     if not (k.startswith("backbone.") and k[9:] in shared and torch.equal(v.cpu(), shared[k[9:]]))}
        else:  # hub weights: the state holds everything
            base = None
        config = dataclasses.replace(model.cfg, weights="", pretrained=False)
        entries.append({"config": dataclasses.asdict(config), "encoder": model.encoder.as_dict(),
                        "backbone": _reference(base, backbones), "state": state})
    path = _folder(params) / f"{entry_key(params, patch_set)}.pt"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"models": entries, "epochs": list(epochs), "n_outputs": len(patch_set.targets)}, f)
    return path


def _reference(base: Path | None, backbones: Path) -> dict | str:
    """How an entry names the weights its models started from: a fold backbone by its file name (the
    folder moves with the cache), other weights by path, size and modification time."""
    if base is None:
        return ""
    if base.parent == backbones:
        return base.name
    stat = weights_file(base).stat()  # a hub-style folder: its weights file
    return {"path": str(base.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _resolve(reference: dict | str, backbones: Path) -> Path | None | bool:
    """The weights file an entry names; None: none; False: gone or replaced since."""
    if not reference:
        return None
    if isinstance(reference, str):
        path = backbones / reference
        return path if path.is_file() else False
    path = Path(reference["path"])
    if not path.exists() or (path.is_dir() and not any((path / n).is_file() for n in WEIGHT_FILES)):
        return False
    stat = weights_file(path).stat()
    return path if (stat.st_size, stat.st_mtime_ns) == (reference["size"], reference["mtime_ns"]) else False


def load_models(params: Params, patch_set: PatchSet) -> tuple[list[SpatialCellModel], list[int]] | None:
    """A recipe's stored models and their epochs, or None when the store has none (or lacks a backbone)."""
    path = _folder(params) / f"{entry_key(params, patch_set)}.pt"
    if not path.is_file():
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True)
    backbones, models = backbone_folder(params), []
    for entry in payload["models"]:
        base = _resolve(entry["backbone"], backbones)
        if base is False:
            return None
        cfg = ModelConfig(**dict(entry["config"], weights=str(base) if base is not None else ""))
        encoder = Encoder.from_dict(entry["encoder"]) if "encoder" in entry else None
        if cfg.unfrozen_blocks == 0 and cfg.weights and any(k.startswith("backbone.") for k in entry["state"]):
            return None  # a frozen backbone that differs from its weights: not what this code stores
        model = SpatialCellModel(cfg, n_outputs=payload["n_outputs"], encoder=encoder, weights_follow=True)
        missing, unexpected = model.load_state_dict(entry["state"], strict=False)
        if unexpected or not all(k.startswith("backbone.") for k in missing):
            return None  # not what this code builds (the code digest should have told): train again
        models.append(model.eval())
    return models, list(payload["epochs"])
