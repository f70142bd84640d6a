"""Batched prediction with test-time augmentation over the dihedral group."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from src.core.devices import autocast, default_device
from src.core.sections import InferConfig
from src.data.preprocessing.patch_set import PatchSet
from src.engine.ensemble_selection import combine
from src.engine.smoothing import smooth
from src.model.dataset import SpotDataset
from src.model.feature_cache import FeatureCache, FeatureCaches, cached_batch
from src.model.neighbours import spot_inputs
from src.model.network import Ensemble, RecipeEnsemble, SpatialCellModel
from src.model.targets import log_abundance, to_abundance_scale
from src.model.transforms import build_transform, dihedral


@torch.inference_mode()
def predict(model: SpatialCellModel | Ensemble, patch_set: PatchSet, rows: np.ndarray, tta: list[str],
            batch_size: int = 256, device: torch.device | None = None, cache: FeatureCache | None = None,
            reuse: FeatureCaches | None = None, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Mean prediction over the ``tta`` transforms for the given rows (N x T, target space).

    ``cache``: read the transforms' prefix features from the model's feature cache; ``reuse``: where
    spot descriptors computed before may be found; ``progress``: called with each batch's spot count."""
    device = device or default_device()
    model.eval().to(device)
    if cache is not None and isinstance(model, Ensemble):
        raise ValueError("cached features belong to one model's prefix: predict an ensemble uncached")
    if cache is not None:
        return _predict_cached(model, patch_set, np.asarray(rows), tta, batch_size, device, cache, reuse)
    transform = build_transform(model.preprocessing, patch_set.patch_size, train=None)
    spot = spot_inputs(model, patch_set, device, batch_size, reuse)
    dataset = SpotDataset(patch_set, rows, transform, spot_inputs=spot)
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
        if progress is not None:
            progress(len(images))
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(patch_set.targets)))


def _predict_cached(model: SpatialCellModel, patch_set: PatchSet, rows: np.ndarray, tta: list[str], batch_size: int,
                    device: torch.device, cache: FeatureCache, reuse: FeatureCaches | None) -> np.ndarray:
    rest = model.split_at(cache.cut).rest
    spot = torch.from_numpy(spot_inputs(model, patch_set, device, batch_size, reuse))
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        batch_spot = spot[batch].to(device)
        total = None
        with autocast(device):
            for name in tta:
                variants = np.full(len(batch), cache.variant_index(name))
                features = rest(cached_batch(cache, variants, batch, device))
                pred = model.forward_head(features, batch_spot).float()
                total = pred if total is None else total + pred
        out.append((total / len(tta)).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(patch_set.targets)))


def predict_abundance(model: SpatialCellModel | Ensemble | RecipeEnsemble, meta: dict, patch_set: PatchSet,
                      device: torch.device | None = None, progress: Callable[[int], None] | None = None
                      ) -> np.ndarray:
    """What a checkpoint predicts for every spot of ``patch_set``: TTA, then spatial smoothing per
    slide, on the abundance scale (N x T), comparable across spots and slides. Settings come from the
    checkpoint (``meta``).

    A :class:`RecipeEnsemble` predicts with every recipe (its own TTA, smoothing and target space)
    and returns the weighted geometric mean of their abundances (the weighted mean of their log
    abundances, ``src.model.targets.log_abundance``): one scale for recipes whose targets differ.
    ``progress`` is called with each batch's spot count (:func:`prediction_passes` passes in all)."""
    scale = np.asarray(meta["rank_scale"])
    if isinstance(model, RecipeEnsemble):
        views = [log_abundance(predict_smoothed(m, patch_set, s["infer"], device, progress), s["target_transform"],
                               s["log_epsilon"], scale) for m, s in zip(model.models, model.settings)]
        return np.exp(combine(views, np.asarray(model.weights)))
    pred = predict_smoothed(model, patch_set, meta["infer"], device, progress)
    return to_abundance_scale(pred, meta["target_transform"], meta["log_epsilon"], scale)


def predict_smoothed(model: SpatialCellModel | Ensemble, patch_set: PatchSet, infer: InferConfig,
                     device: torch.device | None = None, progress: Callable[[int], None] | None = None
                     ) -> np.ndarray:
    """Every spot of ``patch_set``: TTA predictions smoothed per slide, in target space (N x T)."""
    pred = predict(model, patch_set, np.arange(len(patch_set.spots)), infer.tta, infer.batch_size, device,
                   progress=progress)
    return smooth(pred, patch_set.xy(), patch_set.slides, infer.smoothing_sigma, patch_set.pitches(),
                  infer.smoothing_truncate)


def prediction_passes(model: SpatialCellModel | Ensemble | RecipeEnsemble) -> int:
    """How many times :func:`predict_abundance` goes over every spot (one per recipe)."""
    return len(model.models) if isinstance(model, RecipeEnsemble) else 1
