"""Regression targets: abundances to the space the model predicts in, and back."""
from __future__ import annotations

import typing

import numpy as np
from scipy.stats import rankdata

from src.core.config import TargetTransform

TARGET_TRANSFORMS: tuple[str, ...] = typing.get_args(TargetTransform)


def transform_targets(abundance: np.ndarray, kind: str, epsilon: float = 0.0) -> np.ndarray:
    """Abundances (N x T, >= 0) -> regression targets.

    ``log`` takes ``log(abundance + epsilon)``: real abundances are strictly positive and span about
    ten decades, and ``log1p`` maps every value below ~0.01 to nearly the same number, losing the order
    the metric scores. ``epsilon`` sets where small values stop being told apart (it must be > 0 so a
    zero cannot give -inf)."""
    if kind == "log":
        if not epsilon > 0:
            raise ValueError(f"log targets need epsilon > 0, got {epsilon}")
        return np.log(abundance + epsilon)
    if kind == "log1p":
        return np.log1p(abundance)
    if kind == "rank":  # within-spot average ranks scaled to (0, 1]
        return rankdata(abundance, axis=1) / abundance.shape[1]
    if kind == "raw":
        return abundance.astype(np.float64, copy=True)
    raise ValueError(f"unknown target transform {kind!r} (choose {', '.join(TARGET_TRANSFORMS)})")


def to_abundance_scale(predictions: np.ndarray, kind: str, epsilon: float = 0.0) -> np.ndarray:
    """Back to the abundance scale where the transform is invertible; ranks and raw stay as they are.

    Only within-spot order is scored, so the inverse must stay strictly monotone: ``log`` predictions
    become ``exp(prediction)``, i.e. abundance + epsilon (subtracting epsilon and clipping at 0 would
    tie every prediction below ``log(epsilon)``)."""
    if kind == "log":
        return np.exp(predictions)
    return np.expm1(predictions) if kind == "log1p" else predictions


def from_abundance_scale(values: np.ndarray, kind: str) -> np.ndarray:
    """Inverse of ``to_abundance_scale``: predictions saved on the abundance scale back to the space the
    model predicted them in (where a trial's smoothing was applied)."""
    if kind == "log":
        return np.log(values)
    return np.log1p(values) if kind == "log1p" else values


def target_ranks(abundance: np.ndarray) -> np.ndarray:
    """Within-spot average ranks (ties share a rank, as scipy's Spearman does)."""
    return rankdata(abundance, axis=1).astype(np.float32)
