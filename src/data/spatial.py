"""Spot geometry shared by registration, simulation and the spatial folds."""
from __future__ import annotations

import numpy as np

SPOT_RADIUS = 13.0  # px: a Visium spot is about 26 px (55 um) across at the competition scale


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
