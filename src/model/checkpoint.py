"""Self-describing checkpoints: model config, targets, target transform, preprocessing and stain
reference with the weights of one model or of an ensemble (the CV's fold models), so evaluation and
prediction rebuild the model without params.yaml or a study."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from src.core.config import InferConfig, LossConfig, ModelConfig
from src.core.errors import InputError
from src.core.files import atomic_path
from src.model.network import Ensemble, SpatialCellModel


def save_checkpoint(path: str | Path, model: SpatialCellModel | Ensemble, *, targets: list[str],
                    loss: LossConfig, patch_size: int, infer: InferConfig, stain: dict) -> None:
    members = list(model.members) if isinstance(model, Ensemble) else [model]
    payload = {
        "model_config": dataclasses.asdict(model.cfg),
        "targets": list(targets),
        "target_transform": loss.target_transform,
        "log_epsilon": loss.log_epsilon,
        "patch_size": int(patch_size),
        "infer": dataclasses.asdict(infer),
        "stain": stain,
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
    # Weights come from the checkpoint: no hub download, no local backbone file needed.
    fields = {"neighbour_radius": 0.0, **payload["model_config"]}  # checkpoints from before the field: none
    cfg = dataclasses.replace(ModelConfig(**fields), pretrained=False, weights="")
    members = []
    for state in payload.pop("state_dicts"):
        member = SpatialCellModel(cfg, n_outputs=len(payload["targets"]))
        member.load_state_dict(state)
        members.append(member)
    model = members[0] if len(members) == 1 else Ensemble(members)
    meta = dict(payload, infer=InferConfig(**payload["infer"]))
    return model.eval(), meta
