"""Targets and the Spearman-aware loss.

The competition scores each spot by the Spearman correlation of its 35 predicted and true
abundances, averaged over spots. The loss follows that: soft ranks (torchsort) of each spot's
predictions, correlated with the spot's true ranks, averaged over spots (the seed flattened the whole
batch into one correlation instead), blended with an MSE on transformed targets.
"""
from __future__ import annotations

import numpy as np
import torch
import torchsort
from scipy.stats import rankdata

from src.config import LossConfig
from src.errors import InputError

TARGET_TRANSFORMS = ("log", "log1p", "rank", "raw")


def transform_targets(abundance: np.ndarray, kind: str, epsilon: float = 0.0) -> np.ndarray:
    """Abundances (N x T, >= 0) -> regression targets.

    ``log`` takes ``log(abundance + epsilon)``: real abundances are strictly positive and span about
    ten decades, and ``log1p`` maps every value below ~0.01 to nearly the same number, losing the order
    the metric scores. ``epsilon`` sets where small values stop being told apart (it must be > 0 so a
    zero cannot give -inf)."""
    if kind == "log":
        if not epsilon > 0:
            raise InputError(f"params: loss.log_epsilon = {epsilon}: must be > 0 for target_transform log")
        return np.log(abundance + epsilon)
    if kind == "log1p":
        return np.log1p(abundance)
    if kind == "rank":  # within-spot average ranks scaled to (0, 1]
        return rankdata(abundance, axis=1) / abundance.shape[1]
    if kind == "raw":
        return abundance.astype(np.float64, copy=True)
    raise InputError(f"params: loss.target_transform = {kind!r}: choose {', '.join(TARGET_TRANSFORMS)}")


def to_abundance_scale(predictions: np.ndarray, kind: str, epsilon: float = 0.0) -> np.ndarray:
    """Back to the abundance scale where the transform is invertible; ranks and raw stay as they are.

    Only within-spot order is scored, so the inverse must stay strictly monotone: ``log`` predictions
    become ``exp(prediction)``, i.e. abundance + epsilon (subtracting epsilon and clipping at 0 would
    tie every prediction below ``log(epsilon)``)."""
    if kind == "log":
        return np.exp(predictions)
    return np.expm1(predictions) if kind == "log1p" else predictions


def target_ranks(abundance: np.ndarray) -> np.ndarray:
    """Within-spot average ranks (ties share a rank, as scipy's Spearman does)."""
    return rankdata(abundance, axis=1).astype(np.float32)


def _row_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation of each row pair, and a mask of rows where it is defined."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norm = a.norm(dim=1) * b.norm(dim=1)
    defined = norm > eps
    return (a * b).sum(dim=1) / norm.clamp_min(eps), defined


def soft_spearman(predictions: torch.Tensor, ranks: torch.Tensor, regularization: float) -> torch.Tensor:
    """Mean over spots of the correlation between soft ranks of predictions and true ranks.

    Spots whose true ranks are constant (all abundances equal) have no defined correlation and are
    left out; if none is defined the result is 0 (no NaN).
    """
    soft = torchsort.soft_rank(predictions.float(), regularization_strength=regularization)
    corr, defined = _row_pearson(soft, ranks.float())
    if not defined.any():
        return predictions.sum() * 0.0
    return corr[defined].mean()


class AbundanceLoss(torch.nn.Module):
    """alpha * (1 - soft Spearman per spot) + (1 - alpha) * MSE."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        if not 0.0 <= cfg.alpha <= 1.0:
            raise InputError(f"params: loss.alpha = {cfg.alpha}: must be within 0-1")
        if cfg.regularization <= 0:
            raise InputError(f"params: loss.regularization = {cfg.regularization}: must be > 0")
        self.alpha = cfg.alpha
        self.regularization = cfg.regularization

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        predictions = predictions.float()
        loss = (1 - self.alpha) * torch.nn.functional.mse_loss(predictions, targets.float())
        if self.alpha > 0:
            loss = loss + self.alpha * (1 - soft_spearman(predictions, ranks, self.regularization))
        return loss
