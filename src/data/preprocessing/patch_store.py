"""Patches as crops of the slides they come from, read as one N x P x P x 3 uint8 array.

Spots sit about 25 px apart, so 224-px patches overlap about 90-fold and 400-px ones about 290-fold:
storing every patch would take 90-290 times the pixels of the slides. The store keeps each slide once,
reflect-padded so that every patch lies inside it, and a crop table (slide, top, left) per patch; a
patch is a view of its slide. What it holds grows with the slides, not with the patch size.

On disk (stage ``patches``, folder ``data/patches``):
``{split}_slides/{slide}.npy``  each normalized slide once, reflect-padded (H x W x 3 uint8, memory-mapped on load)
``{split}_crops.npy``           N x 3 int32: slide (its place in ``meta.json``'s ``crops``), top row, left column
``{split}_spots.csv``           one row per patch: slide, spot (row in the slide's table), x, y, then the
                                cell-type columns (train) or the remaining fields such as Test_Set (test)
``meta.json``                   patch size, each slide's offset and how it was found, cell-type names, slide
                                sizes, slide order per split
"""
from __future__ import annotations

import abc
import hashlib
from pathlib import Path

import numpy as np

META_FILE = "meta.json"


def crops_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_crops.npy"


def spots_file(folder: Path, split: str) -> Path:
    return folder / f"{split}_spots.csv"


def slide_file(folder: Path, split: str, slide: str) -> Path:
    return folder / f"{split}_slides" / f"{slide}.npy"


def pad_for(size: int, offset: tuple[int, int]) -> int:
    """Reflect padding that holds every ``size``-px patch centred on a pixel of the slide, shifted by ``offset``."""
    return size // 2 + max(abs(int(offset[0])), abs(int(offset[1]))) + 1


def padded_slide(image: np.ndarray, size: int, offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, int]:
    pad = pad_for(size, offset)
    return np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect"), pad


def crop_corners(x: np.ndarray, y: np.ndarray, size: int, offset: tuple[int, int], pad: int) -> np.ndarray:
    """(top, left) in the padded slide of the patch centred on (x + dx, y + dy): centre pixel at index
    ``size // 2``, as in the seed's ``img[y-h:y+h, x-h:x+h]``. N x 2."""
    half = size // 2
    return np.stack([np.asarray(y) + offset[1] + pad - half, np.asarray(x) + offset[0] + pad - half], axis=1)


class PatchArray(abc.ABC):
    """N x P x P x 3 patches read one at a time (``_crop``): indexing returns what an array would (an
    integer one patch, a slice or index array a stacked copy)."""

    ndim = 4
    size: int
    dtype: np.dtype

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of patches."""

    @abc.abstractmethod
    def _crop(self, i: int) -> np.ndarray:
        """Patch ``i`` (0 <= i < len) as P x P x 3."""

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._crop(range(len(self))[key])
        if isinstance(key, tuple):
            raise TypeError(f"{type(self).__name__} takes one index (patches), not a tuple")
        rows = np.arange(len(self))[key]
        out = np.empty((len(rows), self.size, self.size, 3), self.dtype)
        for j, i in enumerate(rows):
            out[j] = self._crop(i)
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class SlideCrops(PatchArray):
    """N x P x P x 3 uint8 patches as crops of padded slides: indexing returns the same arrays an
    N x P x P x 3 array would (an integer a view, a slice or index array a stacked copy)."""

    def __init__(self, slides: list[np.ndarray], index: np.ndarray, size: int):
        self.slides = slides
        self.dtype = slides[0].dtype if slides else np.dtype(np.uint8)
        self.index = np.asarray(index, dtype=np.int32).reshape(-1, 3)
        self.size = int(size)
        self.shape = (len(self.index), self.size, self.size, 3)
        if len(self.index):
            heights, widths = (np.array([s.shape[k] for s in slides])[self.index[:, 0]] for k in (0, 1))
            top, left = self.index[:, 1], self.index[:, 2]
            outside = np.flatnonzero((top < 0) | (left < 0) | (top + self.size > heights) | (left + self.size > widths))
            if len(outside):
                number, t, l = self.index[outside[0]]
                raise ValueError(f"patch {outside[0]}: a {self.size}-px crop at ({t}, {l}) leaves slide {number} "
                                 f"({heights[outside[0]]} x {widths[outside[0]]})")

    @classmethod
    def from_slides(cls, slides: list[tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]],
                    size: int) -> SlideCrops:
        """In memory, from (image, x, y, offset) per slide."""
        padded, index = [], []
        for number, (image, x, y, offset) in enumerate(slides):
            slide, pad = padded_slide(image, size, offset)
            padded.append(slide)
            corners = crop_corners(x, y, size, offset, pad)
            index.append(np.column_stack([np.full(len(corners), number), corners]))
        return cls(padded, np.concatenate(index) if index else np.zeros((0, 3)), size)

    @classmethod
    def load(cls, folder: Path, split: str, slide_names: list[str], size: int) -> SlideCrops:
        slides = [np.load(slide_file(folder, split, name), mmap_mode="r") for name in slide_names]
        return cls(slides, np.load(crops_file(folder, split)), size)

    def __len__(self) -> int:
        return len(self.index)

    def _crop(self, i: int) -> np.ndarray:
        number, top, left = self.index[i]
        return self.slides[number][top : top + self.size, left : left + self.size]

    @property
    def nbytes(self) -> int:
        """What the store holds (the padded slides and the crop table), not N x P x P x 3."""
        return sum(s.nbytes for s in self.slides) + self.index.nbytes

    def digest(self) -> str:
        """Content hash of every patch: the slides' pixels, the crop table and the patch size."""
        h = hashlib.blake2b(digest_size=16)
        for slide in self.slides:
            h.update(str(slide.shape).encode())
            for start in range(0, len(slide), 256):
                h.update(np.ascontiguousarray(slide[start : start + 256]).tobytes())
        h.update(self.index.tobytes())
        h.update(str(self.size).encode())
        return h.hexdigest()
