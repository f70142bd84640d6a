"""Spot geometry shared by registration, simulation, smoothing, neighbourhoods and the spatial folds.

Distances between spots are set in spot pitches and turned into each slide's pixels here, from the
pitch measured on its own lattice, so one setting means the same neighbourhood on the competition's
file (25 px) and on true Visium geometry (100 µm: 47 px at 2.115 µm/px).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

SPOT_DIAMETER_UM = 55.0  # a Visium spot
SPOT_PITCH_UM = 100.0  # centre to centre on Visium's hexagonal lattice (rows 86.6 µm apart)
COMPETITION_SPOT_PX = 26.0  # the competition's spots are 26 px across ...
COMPETITION_PITCH_PX = 25.0  # ... and 25 px apart: not Visium's 100 / 55 ratio (source unknown)
COMPETITION_UM_PER_PX = SPOT_DIAMETER_UM / COMPETITION_SPOT_PX  # 2.115: its scale, if a spot is 55 µm
SPOT_RADIUS = COMPETITION_SPOT_PX / 2  # px at the competition scale (the simulator draws at it)


def balanced_blocks(xy: np.ndarray, n_blocks: int) -> np.ndarray:
    """Label each point with one of ``n_blocks`` contiguous blocks of (nearly) equal size.

    Recursive bisection along the longer extent, at the quantile that keeps the counts balanced.
    """
    labels = np.zeros(len(xy), dtype=np.int64)

    def split(rows: np.ndarray, first_label: int, count: int) -> None:
        if count == 1 or len(rows) == 0:
            labels[rows] = first_label
            return
        left_count = count // 2
        pts = xy[rows]
        axis = int(np.argmax(np.ptp(pts, axis=0)))
        order = rows[np.argsort(pts[:, axis], kind="stable")]
        cut = int(round(len(rows) * left_count / count))
        split(order[:cut], first_label, left_count)
        split(order[cut:], first_label + left_count, count - left_count)

    split(np.arange(len(xy)), 0, n_blocks)
    return labels


def lattice_pitch(x: np.ndarray, y: np.ndarray) -> float:
    """The spot lattice's pitch: the median distance from each spot centre to its (up to) 6 nearest
    neighbours, to 0.01 px; NaN below 2 spots. Over all six rather than the nearest one, because
    coordinates rounded to whole pixels (the competition's) put one diagonal neighbour a pixel closer
    than the pitch on most spots, while the median of the six stays on the lattice's own spacing."""
    if len(x) < 2:
        return float("nan")
    from scipy.spatial import cKDTree

    points = np.column_stack([x, y]).astype(np.float64)
    distance, _ = cKDTree(points).query(points, k=min(7, len(points)))
    return round(float(np.median(distance[:, 1:])), 2)


def slide_pitches(xy: np.ndarray, slides: np.ndarray, um_per_px: float) -> dict[str, float]:
    """Each slide's spot pitch in its pixels; a slide of one spot takes the others' median (or Visium's)."""
    pitches = {str(name): lattice_pitch(xy[rows, 0], xy[rows, 1]) for name, rows in pd.Series(slides).groupby(
        np.asarray(slides), sort=False).indices.items()}
    known = [p for p in pitches.values() if np.isfinite(p)]
    fallback = float(np.median(known)) if known else SPOT_PITCH_UM / um_per_px
    return {name: (p if np.isfinite(p) else fallback) for name, p in pitches.items()}


def spot_radius_px(um_per_px: float) -> float:
    """A Visium spot's radius in pixels of ``um_per_px`` (13 px at the competition's 2.115 µm/px)."""
    return SPOT_DIAMETER_UM / 2 / um_per_px


def hex_lattice(width: float, height: float, pitch: float) -> np.ndarray:
    """Spot centres of a Visium-like hexagonal lattice covering a ``width`` x ``height`` rectangle (N x 2,
    x then y): rows ``pitch * sqrt(3) / 2`` apart, spots ``pitch`` apart within a row, every other row
    shifted by half a pitch; the first spot half a pitch from the top-left corner."""
    if pitch <= 0:
        raise ValueError(f"lattice pitch must be positive, got {pitch}")
    row_step = pitch * np.sqrt(3) / 2
    ys = np.arange(pitch / 2, height, row_step)
    rows = []
    for i, y in enumerate(ys):
        xs = np.arange(pitch / 2 + (pitch / 2 if i % 2 else 0.0), width, pitch)
        rows.append(np.column_stack([xs, np.full(len(xs), y)]))
    return np.concatenate(rows) if rows else np.zeros((0, 2))
