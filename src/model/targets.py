"""Regression targets: abundances to the space the model predicts in, and back."""
from __future__ import annotations

import typing

import numpy as np
from scipy.interpolate import interp1d
from scipy.stats import rankdata

from src.core.sections import TargetTransform

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


ABUNDANCE_FLOOR = 1e-10  # below the smallest real abundance (~6e-10): predictions under it are reported as it


def rank_scale(abundance: np.ndarray) -> np.ndarray:
    """The log abundance that goes with each within-spot rank: the mean over spots of the k-th smallest
    ``log(abundance + ABUNDANCE_FLOOR)`` of the spot, for k = 1..T (increasing). It puts predicted
    ranks on the abundance scale without changing their order within a spot or across spots."""
    ordered = np.sort(np.log(abundance + ABUNDANCE_FLOOR), axis=1).mean(axis=0)  # non-decreasing
    return ordered + 1e-6 * np.arange(len(ordered))  # strictly: tables with many zeros tie at the floor


def _rank_levels(n_types: int) -> np.ndarray:
    return np.arange(1, n_types + 1) / n_types  # the values of ``transform_targets(..., "rank")``


def log_abundance(predictions: np.ndarray, kind: str, epsilon: float, scale: np.ndarray) -> np.ndarray:
    """Predictions in target space -> log abundance, strictly monotone in every prediction, so neither
    the order within a spot nor the order across spots changes (except below the floor).

    ``log``: the prediction itself, log(abundance + epsilon). ``log1p`` and ``raw``: their inverse,
    floored at ``ABUNDANCE_FLOOR`` (a prediction below it tells nothing apart). ``rank``: the rank
    scale ``scale`` (``rank_scale`` of the training abundances) at the predicted rank, extrapolated
    linearly beyond the lowest and highest rank."""
    if kind == "log":
        return np.asarray(predictions, dtype=np.float64)
    if kind in ("log1p", "raw"):
        values = np.expm1(predictions) if kind == "log1p" else predictions
        return np.log(np.maximum(values, ABUNDANCE_FLOOR))
    if kind == "rank":
        curve = interp1d(_rank_levels(len(scale)), scale, fill_value="extrapolate", assume_sorted=True)
        return curve(predictions)
    raise ValueError(f"unknown target transform {kind!r} (choose {', '.join(TARGET_TRANSFORMS)})")


def to_abundance_scale(predictions: np.ndarray, kind: str, epsilon: float, scale: np.ndarray) -> np.ndarray:
    """Predictions in target space -> abundances, comparable across spots, slides and recipes
    (``log`` predictions give abundance + epsilon; see ``log_abundance``)."""
    return np.exp(log_abundance(predictions, kind, epsilon, scale))


def from_abundance_scale(values: np.ndarray, kind: str, scale: np.ndarray) -> np.ndarray:
    """Inverse of ``to_abundance_scale``: predictions saved on the abundance scale back to the space the
    model predicted them in (where a trial's smoothing was applied)."""
    if kind == "log":
        return np.log(values)
    if kind == "log1p":
        return np.log1p(values)
    if kind == "rank":
        levels = interp1d(scale, _rank_levels(len(scale)), fill_value="extrapolate", assume_sorted=True)
        return levels(np.log(values))
    return values


def target_ranks(abundance: np.ndarray) -> np.ndarray:
    """Within-spot average ranks (ties share a rank, as scipy's Spearman does)."""
    return rankdata(abundance, axis=1).astype(np.float32)
