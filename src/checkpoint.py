"""Self-describing checkpoints: model config, targets, preprocessing and stain reference with the
weights, so evaluation and prediction rebuild the model without params.yaml or a study."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from src.config import InferConfig, ModelConfig
from src.errors import InputError
from src.io_utils import atomic_path
from src.model import SpatialCellModel


def save_checkpoint(path: str | Path, model: SpatialCellModel, *, targets: list[str],
                    target_transform: str, patch_size: int, infer: InferConfig, stain: dict) -> None:
    payload = {
        "model_config": dataclasses.asdict(model.cfg),
        "targets": list(targets),
        "target_transform": target_transform,
        "patch_size": int(patch_size),
        "infer": dataclasses.asdict(infer),
        "stain": stain,
        "state_dict": model.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[SpatialCellModel, dict]:
    """(model in eval mode, the rest of the checkpoint's fields)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # pickle/zip errors differ by torch version; all mean the same here
        raise InputError(f"{path}: not a checkpoint of this project ({type(err).__name__})") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "model_config" not in payload:
        raise InputError(f"{path}: not a checkpoint of this project (no model_config/state_dict)")
    # Weights come from the checkpoint: no hub download, no local backbone file needed.
    cfg = dataclasses.replace(ModelConfig(**payload["model_config"]), pretrained=False, weights="")
    model = SpatialCellModel(cfg, n_outputs=len(payload["targets"]))
    model.load_state_dict(payload.pop("state_dict"))
    meta = dict(payload, infer=InferConfig(**payload["infer"]))
    return model.eval(), meta
