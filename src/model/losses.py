"""The Spearman-aware loss.

The competition scores each spot by the Spearman correlation of its 35 predicted and true
abundances, averaged over spots. The loss follows that: soft ranks (torchsort) of each spot's
predictions, correlated with the spot's true ranks, averaged over spots (the seed flattened the whole
batch into one correlation instead), blended with an MSE on transformed targets.
"""
from __future__ import annotations

import torch
import torchsort

from src.core.sections import LossConfig


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
        self.alpha = cfg.alpha
        self.regularization = cfg.regularization

    def forward(self, predictions: torch.Tensor, targets: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        predictions = predictions.float()
        loss = (1 - self.alpha) * torch.nn.functional.mse_loss(predictions, targets.float())
        if self.alpha > 0:
            loss = loss + self.alpha * (1 - soft_spearman(predictions, ranks, self.regularization))
        return loss
