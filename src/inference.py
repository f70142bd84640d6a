"""Batched prediction with test-time augmentation over the dihedral group."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from src.config import InferConfig
from src.data import DIHEDRAL, PatchSet, SpotDataset, build_transform, dihedral
from src.devices import autocast, default_device
from src.errors import InputError
from src.model import Ensemble, SpatialCellModel
from src.neighbours import spot_inputs


def check_tta(names: list[str]) -> None:
    if not names:
        raise InputError("params: infer.tta: list at least one transform (identity = no TTA)")
    for name in names:
        if name not in DIHEDRAL:
            raise InputError(f"params: infer.tta: unknown transform {name!r} (choose {', '.join(DIHEDRAL)})")


@torch.inference_mode()
def predict(model: SpatialCellModel | Ensemble, patch_set: PatchSet, rows: np.ndarray, tta: list[str],
            batch_size: int = 256, device: torch.device | None = None, cached: tuple | None = None
            ) -> np.ndarray:
    """Mean prediction over the ``tta`` transforms for the given rows (N x T, target space).

    ``cached`` = (FeatureCache, PrefixSplit): read the transforms' prefix features from the cache."""
    check_tta(tta)
    device = device or default_device()
    model.eval().to(device)
    if cached is not None and isinstance(model, Ensemble):
        raise ValueError("cached features belong to one model's prefix: predict an ensemble uncached")
    if cached is not None:
        return _predict_cached(model, patch_set, np.asarray(rows), tta, batch_size, device, *cached)
    transform = build_transform(model.preprocessing, patch_set.patch_size, train=None)
    dataset = SpotDataset(patch_set, rows, transform, spot_inputs=spot_inputs(model, patch_set, device, batch_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
    out = []
    for images, spot, _, _ in loader:
        images = images.to(device, non_blocking=True)
        spot = spot.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        total = None
        with autocast(device):
            for name in tta:
                pred = model(dihedral(images, name), spot).float()
                total = pred if total is None else total + pred
        out.append((total / len(tta)).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(patch_set.targets)))


def _predict_cached(model, patch_set, rows, tta, batch_size, device, cache, split) -> np.ndarray:
    from src.features import cached_batch

    spot = torch.from_numpy(spot_inputs(model, patch_set, device, batch_size))
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        batch_spot = spot[batch].to(device)
        total = None
        with autocast(device):
            for name in tta:
                variants = np.full(len(batch), cache.variant_index(name))
                features = split.features(cached_batch(cache, variants, batch, device), model.preprocessing.input_size)
                pred = model.forward_head(features, batch_spot).float()
                total = pred if total is None else total + pred
        out.append((total / len(tta)).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(patch_set.targets)))


def predict_abundance(model: SpatialCellModel | Ensemble, meta: dict, patch_set: PatchSet,
                      device: torch.device | None = None) -> np.ndarray:
    """What a checkpoint predicts for every spot of ``patch_set``: TTA, then spatial smoothing per
    slide, on the abundance scale (N x T). Settings come from the checkpoint (``meta``)."""
    from src.losses import to_abundance_scale

    pred = predict_smoothed(model, patch_set, meta["infer"], device)
    return to_abundance_scale(pred, meta["target_transform"], meta["log_epsilon"])


def predict_smoothed(model: SpatialCellModel | Ensemble, patch_set: PatchSet, infer: InferConfig,
                     device: torch.device | None = None) -> np.ndarray:
    """Every spot of ``patch_set``: TTA predictions smoothed per slide, in target space (N x T)."""
    from src.smoothing import smooth

    pred = predict(model, patch_set, np.arange(len(patch_set.spots)), infer.tta, infer.batch_size, device)
    return smooth(pred, patch_set.xy(), patch_set.spots["slide"].to_numpy(), infer.smoothing_sigma,
                  infer.smoothing_truncate)
