"""A split of the patch store (or of a user's file) as arrays (its torch dataset: ``src.model.dataset``)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.data.preprocessing.patch_store import META_FILE, SlideCrops, crops_file, slide_file, spots_file
from src.data.spatial import COMPETITION_UM_PER_PX, slide_pitches


@dataclass
class PatchSet:
    """Patches of one split with their spot table; ``images`` reads as N x P x P x 3 uint8 (crops of
    memory-mapped slides, :class:`~src.data.preprocessing.patch_store.SlideCrops`, or any such array)."""

    images: SlideCrops | np.ndarray
    spots: pd.DataFrame  # slide, spot, x, y, then targets or Test_Set
    targets: list[str]  # cell-type columns
    slide_sizes: dict[str, tuple[int, int]]  # slide -> (height, width)
    patch_size: int
    um_per_px: float = COMPETITION_UM_PER_PX  # the slides' resolution
    _cache: dict[str, str] = field(default_factory=dict, init=False, repr=False, compare=False)

    def images_digest(self) -> str:
        """Content hash of the patch pixels (computed once per PatchSet: ~1 s per GB stored)."""
        if "images" not in self._cache and isinstance(self.images, SlideCrops):
            self._cache["images"] = self.images.digest()
        if "images" not in self._cache:
            h = hashlib.blake2b(digest_size=16)
            for start in range(0, len(self.images), 512):
                h.update(np.ascontiguousarray(self.images[start : start + 512]).tobytes())
            h.update(str(self.images.shape).encode())
            self._cache["images"] = h.hexdigest()
        return self._cache["images"]

    def digest(self) -> str:
        """Content hash of everything a trial reads: pixels, spot table (labels included), cell types,
        slide sizes and patch size. Equal digests, equal data."""
        if "all" not in self._cache:
            h = hashlib.blake2b(digest_size=16)
            h.update(self.images_digest().encode())
            h.update(json.dumps([list(map(str, self.spots.columns)), self.targets,
                                 sorted((k, list(v)) for k, v in self.slide_sizes.items()), self.patch_size]).encode())
            h.update(pd.util.hash_pandas_object(self.spots, index=True).to_numpy().tobytes())
            self._cache["all"] = h.hexdigest()
        return self._cache["all"]

    @property
    def abundance(self) -> np.ndarray:
        return self.spots[self.targets].to_numpy(np.float64)

    @property
    def slides(self) -> np.ndarray:
        """Each spot's slide name (N)."""
        return self.spots["slide"].to_numpy()

    def coords(self) -> np.ndarray:
        """Per-slide normalized spot coordinates (x / W, y / H) in [0, 1], N x 2 float32."""
        heights = self.spots["slide"].map(lambda s: self.slide_sizes[s][0]).to_numpy(np.float64)
        widths = self.spots["slide"].map(lambda s: self.slide_sizes[s][1]).to_numpy(np.float64)
        return np.stack([self.spots["x"] / widths, self.spots["y"] / heights], axis=1).astype(np.float32)

    def xy(self) -> np.ndarray:
        return self.spots[["x", "y"]].to_numpy(np.float64)

    def pitches(self) -> dict[str, float]:
        """Each slide's spot pitch in its pixels, measured on its lattice (``src.data.spatial``)."""
        if "pitches" not in self._cache:
            self._cache["pitches"] = slide_pitches(self.xy(), self.slides, self.um_per_px)
        return self._cache["pitches"]

    def slide_image(self, name: str) -> np.ndarray | None:
        """The pixels of slide ``name`` as the patches were cut from it (H x W x 3 uint8, a view), or None
        when the patches are a plain array (or the slide has no spot)."""
        rows = np.flatnonzero(self.slides == name)
        if not isinstance(self.images, SlideCrops) or not len(rows):
            return None
        row = int(rows[0])
        padded = self.images.slides[self.images.index[row, 0]]
        height, width = self.slide_sizes[name]
        pad = (padded.shape[0] - height) // 2  # the same reflect padding on every side
        return padded[pad : pad + height, pad : pad + width]


def has_split(folder: str | Path, split: str) -> bool:
    """Whether the patch store holds slides of ``split`` ("train" or "test"): a file with Train slides
    only has no test split."""
    meta = Path(folder) / META_FILE
    if not meta.is_file():
        raise InputError(f"{meta}: not found (run `dvc repro patches` first)")
    return bool(json.loads(meta.read_text()).get("crops", {}).get(split))


def load_patch_set(folder: str | Path, split: str = "train") -> PatchSet:
    """One split of the patch store written by stage ``patches``."""
    folder = Path(folder)
    for path in (crops_file(folder, split), spots_file(folder, split), folder / META_FILE):
        if not path.is_file():
            raise InputError(f"{path}: not found (run `dvc repro patches` first)")
    meta = json.loads((folder / META_FILE).read_text())
    names = meta.get("crops", {}).get(split, [])
    for name in names:
        if not slide_file(folder, split, name).is_file():
            raise InputError(f"{slide_file(folder, split, name)}: not found (run `dvc repro patches`)")
    try:
        images = SlideCrops.load(folder, split, names, int(meta["size"]))
    except (ValueError, IndexError) as err:
        raise InputError(f"{crops_file(folder, split)}: does not fit the slides of {folder} ({err})") from None
    spots = pd.read_csv(spots_file(folder, split))
    if len(images) != len(spots):
        raise InputError(f"{crops_file(folder, split)}: {len(images)} patches but {len(spots)} rows in "
                         f"{spots_file(folder, split)}")
    sizes = {name: (s["height"], s["width"]) for name, s in meta["slides"].items()}
    return PatchSet(images, spots, list(meta["targets"]), sizes, int(meta["size"]),
                    float(meta.get("um_per_px", COMPETITION_UM_PER_PX)))
