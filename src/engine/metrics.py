"""The competition score and its reference points.

Score: for each spot, the Spearman correlation between its predicted and true abundances across
cell types; averaged over spots (as every public solution computes it). A spot whose prediction or
truth is constant has no defined correlation and counts as 0 (it ranks nothing).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr


def spot_spearman(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman across cell types, one value per spot (N x T inputs -> N)."""
    a = rankdata(pred, axis=1)
    b = rankdata(true, axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a * b).sum(axis=1) / denom
    return np.where(denom > 0, corr, 0.0)


def competition_score(pred: np.ndarray, true: np.ndarray) -> float:
    return float(spot_spearman(pred, true).mean())


def per_type_spearman(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman across spots, one value per cell type (nan where a column is constant)."""
    out = np.full(pred.shape[1], np.nan)
    for j in range(pred.shape[1]):
        if np.ptp(pred[:, j]) > 0 and np.ptp(true[:, j]) > 0:
            out[j] = spearmanr(pred[:, j], true[:, j]).statistic
    return out


def floor_score(train_abundance: np.ndarray, true: np.ndarray) -> float:
    """Score of predicting the training mean profile for every spot (the floor to beat)."""
    profile = np.tile(train_abundance.mean(axis=0), (len(true), 1))
    return competition_score(profile, true)


def skill(score: float, floor: float, ceiling: float) -> float:
    """(score - floor) / (ceiling - floor): 0 at the floor, 1 at the noise ceiling."""
    return float((score - floor) / (ceiling - floor)) if ceiling > floor else float("nan")
