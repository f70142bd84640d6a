"""What the backbone sees of a patch: the spot's context (centre crop), augmentation, resizing and
normalization; and the dihedral group used for flips and test-time augmentation."""
from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

from src.core.sections import Dihedral, TrainConfig

DIHEDRAL: tuple[str, ...] = typing.get_args(Dihedral)

_DIHEDRAL_OPS = {
    "identity": lambda t: t,
    "hflip": lambda t: t.flip(-1),
    "vflip": lambda t: t.flip(-2),
    "rot90": lambda t: t.rot90(1, (-2, -1)),
    "rot180": lambda t: t.rot90(2, (-2, -1)),
    "rot270": lambda t: t.rot90(3, (-2, -1)),
    "transpose": lambda t: t.transpose(-2, -1),
    "antitranspose": lambda t: t.rot90(2, (-2, -1)).transpose(-2, -1),
}


def dihedral(images: torch.Tensor, name: str) -> torch.Tensor:
    """One element of the dihedral group of the square, applied to (..., H, W) tensors."""
    return _DIHEDRAL_OPS[name](images)


class RandomDihedral(torch.nn.Module):
    """A uniformly drawn element of the dihedral group (flips and 90-degree rotations)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return dihedral(image, DIHEDRAL[int(torch.randint(len(DIHEDRAL), ()))])


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone sees: the centre ``context`` share of a patch's edge (1 = all of it), resized
    to ``input_size`` and normalized with the mean and std of its timm data config. A share, so the
    tissue a recipe looks at grows with ``patches.size`` (a 224-px patch at 0.33 crops 74 px)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    context: float = 1.0
    interpolation: str = "bilinear"  # of the resize to input_size (the encoder's: src.model.encoders)

    def crop(self, patch_size: int) -> int:
        """Edge of the centre crop taken from a ``patch_size`` patch, in px."""
        return max(1, min(patch_size, round(self.context * patch_size)))


DOWNSAMPLING_WARNED = 4  # a context shrunk this much or more is reported (once per process); the default
# feeds its 96-px patch at 32 px (3x), which scored within 0.005 of 64 px on the embedded default


class DownsamplingWarning(UserWarning):
    """Patches much larger than the backbone's input: detail is thrown away before the model sees it."""


def build_transform(prep: Preprocessing, patch_size: int, train: TrainConfig | None) -> v2.Compose:
    """uint8 CHW patch -> the spot's context (centre crop), augmented when training, resized to the
    backbone's input size and normalized."""
    crop = prep.crop(patch_size)
    steps: list = [v2.CenterCrop(crop)] if crop < patch_size else []
    if train is not None:
        if train.resized_crop > 0:
            steps.append(v2.RandomResizedCrop(crop, scale=(train.resized_crop, 1.0), antialias=True))
        if train.flips:
            steps.append(RandomDihedral())
        if train.color_jitter > 0:
            j = train.color_jitter
            steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(j, 0.5) / 2))
    if prep.input_size != crop:
        if crop >= DOWNSAMPLING_WARNED * prep.input_size:
            warnings.warn(f"model.input_size = {prep.input_size} shrinks the {crop}-px context {crop / prep.input_size:.1f}x "
                          "before the backbone sees it (model.input_size: 0 feeds the backbone's own size)",
                          DownsamplingWarning, stacklevel=2)
        steps.append(v2.Resize(prep.input_size, interpolation=v2.InterpolationMode(prep.interpolation), antialias=True))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(prep.mean, prep.std)]
    return v2.Compose(steps)
