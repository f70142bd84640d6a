"""Ensemble selection over recipes (Caruana et al. 2004, "Ensemble selection from libraries of models",
as auto-sklearn and AutoGluon deliver it), and a fair choice between it and the single best recipe.

Every candidate is one recipe's out-of-fold predictions, each spot's cell types turned into
within-spot ranks (``rank_view``): the metric scores only that order, and it puts recipes with
different target transforms (log, log1p, rank) on one scale. Greedy forward selection with
replacement adds, round after round, the candidate whose inclusion scores best; a candidate picked
``n`` times of ``R`` rounds weighs ``n / R``.

Both the best CV of many noisy trials and an ensemble selected on the same predictions are biased
upward. ``nested_scores`` measures the two procedures without that bias: for each CV fold, pick (the
best candidate, or the selected ensemble) on the other folds' spots and score the pick on this fold's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from src.engine.metrics import spot_spearman


def rank_view(pred: np.ndarray) -> np.ndarray:
    """Within-spot ranks of N x T predictions, scaled to (0, 1] (ties share a rank)."""
    return (rankdata(pred, axis=1) / pred.shape[1]).astype(np.float32)


def combine(views: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The weighted mean of rank views (what an ensemble of recipes predicts)."""
    weights = np.asarray(weights, dtype=np.float64)
    return sum(w * v.astype(np.float64) for w, v in zip(weights, views) if w > 0) / weights.sum()


def greedy_selection(views: list[np.ndarray], truth: np.ndarray, rounds: int,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """Caruana's forward selection with replacement over ``rounds`` rounds, scored on ``rows``.

    Returns the weight of every candidate (sums to 1). Ties go to the earlier candidate, so list
    candidates best first."""
    rows = np.arange(len(truth)) if rows is None else rows
    truth = truth[rows]
    parts = [v[rows].astype(np.float64) for v in views]
    counts = np.zeros(len(views), dtype=np.int64)
    total = np.zeros_like(parts[0])
    for r in range(1, rounds + 1):
        scores = [spot_spearman((total + p) / r, truth).mean() for p in parts]
        best = int(np.argmax(scores))
        counts[best] += 1
        total += parts[best]
    return counts / counts.sum()


def best_single(views: list[np.ndarray], truth: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Weight 1 on the candidate that scores best on ``rows`` (the plain "best trial")."""
    rows = np.arange(len(truth)) if rows is None else rows
    scores = [spot_spearman(v[rows], truth[rows]).mean() for v in views]
    weights = np.zeros(len(views))
    weights[int(np.argmax(scores))] = 1.0
    return weights


@dataclass(frozen=True)
class NestedScores:
    single: float  # the best candidate of the other folds, scored on each fold
    ensemble: float  # the ensemble selected on the other folds, scored on each fold


def nested_scores(views: list[np.ndarray], truth: np.ndarray, fold_of: np.ndarray, rounds: int) -> NestedScores:
    """Unbiased CV of "take the best trial" and of "select an ensemble": each fold's spots are scored
    by what was picked on the other folds' spots (spot-weighted over folds, as the CV score is)."""
    single, ensemble = np.zeros(len(truth)), np.zeros(len(truth))
    for k in np.unique(fold_of):
        inner, outer = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        for weights, out in ((best_single(views, truth, inner), single),
                             (greedy_selection(views, truth, rounds, inner), ensemble)):
            out[outer] = spot_spearman(combine([v[outer] for v in views], weights), truth[outer])
    return NestedScores(single=float(single.mean()), ensemble=float(ensemble.mean()))
