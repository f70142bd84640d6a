"""Self-describing checkpoints: everything evaluation and prediction need, without params.yaml or a study.

A checkpoint holds the weights of one model or of an ensemble (the CV's fold models) with the model
config, the cell types, the target transform, the patch size, the preprocessing the backbone was
trained with, the inference settings (TTA, smoothing) and the stain reference, plus where it came
from: its format number, the versions of torch, timm, torchsort and numpy, the digest of the code
that rebuilds and runs it, and the digest of the patch store it was trained on. Loading refuses
formats it does not know, and a model whose rebuilt preprocessing differs from the recorded one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from src.core.config import InferConfig, LossConfig, ModelConfig
from src.core.errors import InputError
from src.core.files import atomic_path
from src.core.provenance import imported_modules, modules_digest, versions
from src.model.network import Ensemble, SpatialCellModel

FORMAT = 3  # 1: before the preprocessing and provenance were recorded; 2: model.context in px (both still read)
LIBRARIES = ("torch", "timm", "torchsort", "numpy")
RUNS_A_CHECKPOINT = ("src.engine.inference", "src.model.checkpoint")  # and all they import


def code_version() -> str:
    """Digest of the code that rebuilds a checkpoint's model and predicts with it."""
    return modules_digest(imported_modules(RUNS_A_CHECKPOINT))


def save_checkpoint(path: str | Path, model: SpatialCellModel | Ensemble, *, targets: list[str],
                    loss: LossConfig, patch_size: int, infer: InferConfig, stain: dict, data_digest: str = "") -> None:
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    payload = {
        "format": FORMAT,
        "model_config": dataclasses.asdict(model.cfg),
        "preprocessing": dataclasses.asdict(model.preprocessing),
        "targets": list(targets),
        "target_transform": loss.target_transform,
        "log_epsilon": loss.log_epsilon,
        "patch_size": int(patch_size),
        "infer": dataclasses.asdict(infer),
        "stain": stain,
        "versions": versions(LIBRARIES),
        "code_version": code_version(),
        "data_digest": data_digest,
        "state_dicts": [m.state_dict() for m in members],
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[SpatialCellModel | Ensemble, dict]:
    """(model in eval mode -- an :class:`Ensemble` when the checkpoint holds several --, the rest of
    the checkpoint's fields)."""
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
    if not isinstance(payload, dict) or "state_dicts" not in payload or "model_config" not in payload:
        raise InputError(f"{path}: not a checkpoint of this project (no model_config/state_dicts)")
    written = payload.get("format", 1)
    if not isinstance(written, int) or written > FORMAT:
        raise InputError(f"{path}: checkpoint format {written} is newer than this code reads ({FORMAT}); "
                         f"update the project (it was written with {payload.get('versions', {})})")
    # Weights come from the checkpoint: no hub download, no local backbone file needed.
    fields = {"neighbour_radius": 0.0, **payload["model_config"]}  # checkpoints from before the field: none
    px = fields.get("context", 0)
    if written < 3 and isinstance(px, int):  # model.context was px (0 = the whole patch); now a share of the edge
        fields["context"] = 1.0 if not px else px / payload["patch_size"]
        if payload.get("preprocessing") is not None:
            payload["preprocessing"] = dict(payload["preprocessing"], context=fields["context"])
    cfg = dataclasses.replace(ModelConfig(**fields), pretrained=False, weights="")
    members = []
    for state in payload.pop("state_dicts"):
        member = SpatialCellModel(cfg, n_outputs=len(payload["targets"]))
        member.load_state_dict(state)
        members.append(member)
    recorded = payload.get("preprocessing")
    rebuilt = dataclasses.asdict(members[0].preprocessing)
    if recorded is not None and _as_lists(recorded) != _as_lists(rebuilt):
        raise InputError(f"{path}: the model was trained on preprocessing {recorded}, but timm "
                         f"{versions(('timm',))['timm']} builds {rebuilt} for {cfg.backbone}; use the versions "
                         f"it was written with ({payload.get('versions', {})})")
    model = members[0] if len(members) == 1 else Ensemble(members)
    meta = dict(payload, format=written, infer=InferConfig(**payload["infer"]))
    return model.eval(), meta


def _as_lists(values: dict) -> dict:
    return {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in values.items()}
