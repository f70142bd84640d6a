"""A :class:`~src.data.preprocessing.patch_set.PatchSet` as a torch dataset: what training and
prediction batch."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from src.data.preprocessing.patch_set import PatchSet


class SpotDataset(Dataset):
    """(image, spot inputs, targets, ranks) for the chosen rows of a :class:`PatchSet`; the spot inputs
    are rows of ``spot_inputs`` (every spot's, ``src.model.neighbours.spot_inputs``), by default the
    normalized coordinates."""

    def __init__(self, patch_set: PatchSet, rows: np.ndarray, transform: v2.Compose,
                 targets: np.ndarray | None = None, ranks: np.ndarray | None = None,
                 spot_inputs: np.ndarray | None = None):
        self.images = patch_set.images
        self.rows = np.asarray(rows)
        spot = patch_set.coords() if spot_inputs is None else spot_inputs
        whole = len(self.rows) == len(spot) and np.array_equal(self.rows, np.arange(len(spot)))
        self.spot = torch.from_numpy(spot if whole else spot[self.rows])  # every row: no copy
        n_targets = len(patch_set.targets)
        empty = np.zeros((len(self.rows), n_targets), np.float32)
        self.targets = torch.from_numpy((targets if targets is not None else empty).astype(np.float32))
        self.ranks = torch.from_numpy((ranks if ranks is not None else empty).astype(np.float32))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        image = torch.from_numpy(np.array(self.images[self.rows[i]])).permute(2, 0, 1)  # copy off the memmap
        return self.transform(image), self.spot[i], self.targets[i], self.ranks[i]
