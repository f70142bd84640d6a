"""Region-blocked spatial cross-validation.

Neighbouring spots' patches overlap heavily (25 px pitch, patches of 64-400 px), so a random split
leaks. Folds here are contiguous spatial blocks within each slide, balanced in spot count (recursive
median bisection), and a training spot whose patch would reach a validation spot of the same slide
is dropped from that fold's training set (the buffer).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from src.core.errors import InputError
from src.core.sections import CVConfig
from src.data.spatial import balanced_blocks, spot_radius_px


@dataclass(frozen=True)
class Fold:
    train: np.ndarray  # row indices of training spots (buffer already removed)
    val: np.ndarray  # row indices of validation spots
    dropped: int  # training spots removed by the buffer


def buffer_radius(patch_size: int, buffer: float, pitch: float, um_per_px: float) -> float:
    """Chebyshev distance (px) below which a training patch reaches a validation spot, plus ``buffer``
    spot pitches."""
    return patch_size / 2 + spot_radius_px(um_per_px) + buffer * pitch


def drop_buffer(xy: np.ndarray, slides: np.ndarray, train: np.ndarray, val: np.ndarray,
                radius: dict[str, float]) -> np.ndarray:
    """Training rows whose square patch (half-width ``radius`` of their slide) reaches no validation spot."""
    keep = np.ones(len(train), dtype=bool)
    for slide in np.unique(slides[val]):
        val_xy = xy[val[slides[val] == slide]]
        in_slide = slides[train] == slide
        if not in_slide.any():
            continue
        tree = cKDTree(val_xy)
        dist, _ = tree.query(xy[train[in_slide]], p=np.inf)  # Chebyshev: the patch is a square
        keep[np.flatnonzero(in_slide)[dist < radius[str(slide)]]] = False
    return train[keep]


def fold_count(cfg: CVConfig, slides: np.ndarray) -> int:
    """How many folds ``make_folds`` makes for training spots of these slides."""
    return len(set(slides)) if cfg.scheme == "leave_one_slide_out" else cfg.n_folds


def make_folds(xy: np.ndarray, slides: np.ndarray, cfg: CVConfig, patch_size: int, pitches: dict[str, float],
               um_per_px: float) -> list[Fold]:
    """Folds over the training spots (``xy``: N x 2 pixel coordinates, ``slides``: N slide names,
    ``pitches``: each slide's spot pitch in its pixels, at ``um_per_px``)."""
    slides = np.asarray(slides)
    names = list(dict.fromkeys(slides))  # file order
    if cfg.scheme == "leave_one_slide_out":
        if len(names) < 2:
            raise InputError("params: cv.scheme = leave_one_slide_out needs at least 2 training slides")
        fold_of = np.array([names.index(s) for s in slides])
        n_folds = len(names)
    else:  # blocks
        n_folds = cfg.n_folds
        fold_of = np.empty(len(slides), dtype=np.int64)
        rng = np.random.default_rng(cfg.seed)
        for name in names:
            rows = np.flatnonzero(slides == name)
            blocks = balanced_blocks(xy[rows], n_folds * cfg.blocks_per_fold)
            # Each slide gives every fold blocks_per_fold blocks, in a seeded random arrangement.
            assignment = rng.permutation(np.arange(n_folds * cfg.blocks_per_fold) % n_folds)
            fold_of[rows] = assignment[blocks]

    radius = {name: buffer_radius(patch_size, cfg.buffer, pitches[str(name)], um_per_px) for name in names}
    folds = []
    for k in range(n_folds):
        val = np.flatnonzero(fold_of == k)
        candidates = np.flatnonzero(fold_of != k)
        train = drop_buffer(xy, slides, candidates, val, radius)
        folds.append(Fold(train=train, val=val, dropped=len(candidates) - len(train)))
    return folds
