"""Neighbour aggregation: what a spot's model sees of the spots around it.

Every spot is described by the frozen start of the backbone, pooled (``SpatialCellModel.spot_descriptors``);
a spot's neighbourhood is the mean descriptor of the spots of its own slide within
``model.neighbour_radius`` px of it (itself included). Descriptors come from images only, never from
labels, so a validation or test spot's neighbourhood carries no label across a CV fold boundary, and
at prediction the neighbours are the slide's own spots, as in training.

``spot_inputs`` is what the model's head receives per spot: normalized coordinates, then (with a
radius) the neighbourhood mean.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import radius_neighbors_graph

from src.data import PatchSet, build_transform
from src.devices import autocast
from src.model import Ensemble, SpatialCellModel

_MEMO_SIZE = 8
_DESCRIPTORS: dict[tuple, np.ndarray] = {}  # descriptors per (patches, frozen blocks, preprocessing)


def neighbour_mean(values: np.ndarray, xy: np.ndarray, slides: np.ndarray, radius: float) -> np.ndarray:
    """Mean of ``values`` (N x D) over each spot's same-slide spots within ``radius`` px, itself included."""
    out = np.empty_like(values)
    for name in pd.unique(slides):
        rows = np.flatnonzero(slides == name)
        graph = radius_neighbors_graph(xy[rows], radius, mode="connectivity", include_self=True)
        out[rows] = (graph @ values[rows]) / np.asarray(graph.sum(axis=1))
    return out


def spot_descriptors(model: SpatialCellModel, patch_set: PatchSet, device: torch.device,
                     batch_size: int = 256) -> np.ndarray:
    """Every spot's descriptor (N x model.descriptor_width, float32), computed once per process for
    the same patches, frozen weights and preprocessing (all folds and trials of a study share them)."""
    key = (patch_set.images_digest(), model.cfg.backbone, model.descriptor_cut, model.preprocessing,
           model.descriptor_digest(), device.type)
    if key not in _DESCRIPTORS:
        transform = build_transform(model.preprocessing, patch_set.patch_size, train=None)
        out = np.empty((len(patch_set.images), model.descriptor_width), np.float32)
        model.to(device)
        for start in range(0, len(out), batch_size):
            raw = torch.from_numpy(np.array(patch_set.images[start : start + batch_size])).permute(0, 3, 1, 2)
            with autocast(device):
                out[start : start + len(raw)] = model.spot_descriptors(transform(raw).to(device)).float().cpu().numpy()
        while len(_DESCRIPTORS) >= _MEMO_SIZE:
            _DESCRIPTORS.pop(next(iter(_DESCRIPTORS)))
        _DESCRIPTORS[key] = out
    return _DESCRIPTORS[key]


def spot_inputs(model: SpatialCellModel | Ensemble, patch_set: PatchSet, device: torch.device,
                batch_size: int = 256) -> np.ndarray:
    """The head's per-spot inputs for every spot of ``patch_set`` (N x 2, or N x (2 + descriptor
    width) with neighbour aggregation), float32."""
    coords = patch_set.coords()
    radius = model.cfg.neighbour_radius
    if radius <= 0:
        return coords
    member = model.members[0] if isinstance(model, Ensemble) else model
    descriptors = spot_descriptors(member, patch_set, device, batch_size)
    around = neighbour_mean(descriptors, patch_set.xy(), patch_set.spots["slide"].to_numpy(), radius)
    return np.hstack([coords, around]).astype(np.float32)
