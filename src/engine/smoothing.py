"""Spatial smoothing of predictions over neighbouring spots of the same slide.

A normalized Gaussian-kernel average: each spot's prediction becomes the weighted mean of the
spots within ``truncate * sigma`` (itself included), weights exp(-d^2 / 2 sigma^2) divided by their
sum, so values do not shrink at tissue edges (the seed's grid filter did). ``smooth`` takes sigma in
spot pitches and each slide's pitch in its pixels; ``smooth_slide`` works in pixels.
"""
from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree


def smooth_slide(values: np.ndarray, xy: np.ndarray, sigma: float, truncate: float = 3.0) -> np.ndarray:
    """Smooth one slide's N x T predictions given N x 2 spot coordinates; sigma 0 = identity."""
    if sigma <= 0 or len(values) < 2:
        return values.copy()
    pairs = cKDTree(xy).query_pairs(truncate * sigma, output_type="ndarray")  # i < j, no self pairs
    dist2 = ((xy[pairs[:, 0]] - xy[pairs[:, 1]]) ** 2).sum(axis=1)
    w = np.exp(-dist2 / (2 * sigma**2))
    n = len(xy)
    weights = sparse.coo_matrix(
        (np.concatenate([w, w, np.ones(n)]),
         (np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)]),
          np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)]))),
        shape=(n, n),
    ).tocsr()
    weights = sparse.diags(1.0 / np.asarray(weights.sum(axis=1)).ravel()) @ weights
    return np.asarray(weights @ values)


def smooth(values: np.ndarray, xy: np.ndarray, slides: np.ndarray, sigma: float, pitches: dict[str, float],
           truncate: float = 3.0) -> np.ndarray:
    """Smooth each slide's spots separately (spots of different slides never mix); ``sigma`` in spot
    pitches, ``pitches`` each slide's pitch in its pixels."""
    out = np.empty_like(values, dtype=np.float64)
    slides = np.asarray(slides)
    for slide in np.unique(slides):
        rows = slides == slide
        out[rows] = smooth_slide(values[rows], xy[rows], sigma * pitches[str(slide)], truncate)
    return out
