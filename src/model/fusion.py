"""How a spot's coordinates join its image features: a registry of fusion modules by name
(``model.fusion``; the names are ``src.core.config.FusionName``)."""
from __future__ import annotations

import torch
from torch import nn


class ProductFusion(nn.Module):
    """Element-wise product of image and coordinate features (the seed's fusion)."""

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        return image * coord


class ConcatFusion(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU())

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat([image, coord], dim=1))


class FiLMFusion(nn.Module):
    """Feature-wise linear modulation: coordinates scale and shift the image features."""

    def __init__(self, dim: int):
        super().__init__()
        self.to_scale_shift = nn.Linear(dim, 2 * dim)

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(coord).chunk(2, dim=1)
        return image * (1 + scale) + shift


class GatedFusion(nn.Module):
    """A learned per-feature gate chooses between image and coordinate features."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, image: torch.Tensor, coord: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate(torch.cat([image, coord], dim=1)))
        return gate * image + (1 - gate) * coord


FUSIONS: dict[str, type[nn.Module] | None] = {  # keys: the choices of src.core.config.FusionName
    "product": ProductFusion,
    "concat": ConcatFusion,
    "film": FiLMFusion,
    "gated": GatedFusion,
    "none": None,  # image features only: no coordinate encoder at all
}
