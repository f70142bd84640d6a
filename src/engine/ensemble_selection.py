"""Ensemble selection over recipes (Caruana et al. 2004, "Ensemble selection from libraries of models",
as auto-sklearn and AutoGluon deliver it), and a fair choice between it and the single best recipe.

Every candidate is one recipe's out-of-fold predictions as log abundances
(``src.model.targets.log_abundance``): one scale for recipes with different target transforms (log,
log1p, rank), on which their weighted mean is the delivered prediction (a weighted geometric mean of
abundances), comparable across spots as a map needs. Greedy forward selection with replacement adds,
round after round, the candidate whose inclusion scores best; a candidate picked ``n`` times of ``R``
rounds weighs ``n / R``.

Both the best CV of many noisy trials and an ensemble selected on the same predictions are biased
upward. ``nested_scores`` measures the two procedures without that bias: for each CV fold, pick (the
best candidate, or the selected ensemble) on the other folds' spots and predict this fold's spots with
the pick; those nested out-of-fold predictions are scored as any OOF predictions are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from src.engine.metrics import spot_spearman


def combine(views: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """The weighted mean of views (log abundances: what an ensemble of recipes predicts)."""
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
    single_oof: np.ndarray  # those predictions: each fold's spots predicted by the other folds' best candidate
    ensemble_oof: np.ndarray  # ... by the ensemble selected on the other folds


def nested_scores(views: list[np.ndarray], truth: np.ndarray, fold_of: np.ndarray, rounds: int) -> NestedScores:
    """Unbiased CV of "take the best trial" and of "select an ensemble" (``rounds`` 0: no ensemble, both
    the best trial): each fold's spots are predicted by what was picked on the other folds' spots and
    scored (spot-weighted over folds, as the CV score is)."""
    single, ensemble = np.zeros_like(views[0], dtype=np.float64), np.zeros_like(views[0], dtype=np.float64)
    for k in np.unique(fold_of):
        inner, outer = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        picks = [(best_single(views, truth, inner), single)]
        picks.append((greedy_selection(views, truth, rounds, inner) if rounds > 0 else picks[0][0], ensemble))
        for weights, out in picks:
            out[outer] = combine([v[outer] for v in views], weights)
    return NestedScores(single=float(spot_spearman(single, truth).mean()),
                        ensemble=float(spot_spearman(ensemble, truth).mean()), single_oof=single, ensemble_oof=ensemble)
