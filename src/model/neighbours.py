"""Neighbour aggregation: what a spot's model sees of the spots around it.

Every spot is described by the frozen start of the backbone, pooled (``src.model.network.SpatialCellModel.spot_descriptors``);
a spot's neighbourhood is the mean descriptor of the spots of its own slide within
``model.neighbour_radius`` spot pitches of it (itself included; the slide's own pitch). Descriptors come from images only, never from
labels, so a validation or test spot's neighbourhood carries no label across a CV fold boundary, and
at prediction the neighbours are the slide's own spots, as in training.

``spot_inputs`` is what the model's head receives per spot: normalized coordinates, then (with a
radius) the neighbourhood mean; for an ensemble whose members describe spots differently (fold models
pretrained on their own folds), one neighbourhood mean per distinct describer.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import radius_neighbors_graph

from src.core.devices import autocast
from src.data.preprocessing.patch_set import PatchSet
from src.model.feature_cache import FeatureCaches
from src.model.network import Ensemble, SpatialCellModel
from src.model.transforms import build_transform


def neighbour_mean(values: np.ndarray, xy: np.ndarray, slides: np.ndarray, radius: float,
                   pitches: dict[str, float]) -> np.ndarray:
    """Mean of ``values`` (N x D) over each spot's same-slide spots within ``radius`` spot pitches (each
    slide's pitch in its pixels: ``pitches``), itself included."""
    out = np.empty_like(values)
    for name in pd.unique(slides):
        rows = np.flatnonzero(slides == name)
        graph = radius_neighbors_graph(xy[rows], radius * pitches[str(name)], mode="connectivity", include_self=True)
        out[rows] = (graph @ values[rows]) / np.asarray(graph.sum(axis=1))
    return out


def spot_descriptors(model: SpatialCellModel, patch_set: PatchSet, device: torch.device,
                     batch_size: int = 256, reuse: FeatureCaches | None = None) -> np.ndarray:
    """Every spot's descriptor (N x model.descriptor_width, float32); with ``reuse``, computed once for
    the same patches, frozen weights and preprocessing (the folds and trials of a study share them)."""

    def compute() -> np.ndarray:
        transform = build_transform(model.preprocessing, patch_set.patch_size, train=None)
        out = np.empty((len(patch_set.images), model.descriptor_width), np.float32)
        model.to(device)
        for start in range(0, len(out), batch_size):
            raw = torch.from_numpy(np.array(patch_set.images[start : start + batch_size])).permute(0, 3, 1, 2)
            with autocast(device):
                out[start : start + len(raw)] = model.spot_descriptors(transform(raw).to(device)).float().cpu().numpy()
        return out

    if reuse is None:
        return compute()
    key = ("descriptors", patch_set.images_digest(), model.cfg.backbone, model.descriptor_cut, model.preprocessing,
           model.descriptor_digest(), device.type)
    return reuse.remember(key, compute)


def spot_inputs(model: SpatialCellModel | Ensemble, patch_set: PatchSet, device: torch.device,
                batch_size: int = 256, reuse: FeatureCaches | None = None) -> np.ndarray:
    """The head's per-spot inputs for every spot of ``patch_set`` (N x 2, or N x (2 + descriptor
    width) with neighbour aggregation; an ensemble: one neighbourhood block per describer), float32."""
    coords = patch_set.coords()
    radius = model.cfg.neighbour_radius
    if radius <= 0:
        return coords
    describers = model.describers if isinstance(model, Ensemble) else [model]
    xy, slides = patch_set.xy(), patch_set.spots["slide"].to_numpy()
    edges = np.cumsum([2] + [d.descriptor_width for d in describers])
    out = np.empty((len(coords), edges[-1]), np.float32)  # filled in place: one N x width copy at a time
    out[:, :2] = coords
    for d, start, stop in zip(describers, edges[:-1], edges[1:]):
        out[:, start:stop] = neighbour_mean(spot_descriptors(d, patch_set, device, batch_size, reuse), xy, slides,
                                            radius, patch_set.pitches())
    return out
