"""Reader of the competition HDF5 layout.

``images/{Train,Test}/S_k``: H x W x 3 RGB, float (0-1) or uint8.
``spots/{Train,Test}/S_k``: structured array with ``x`` (pixel column), ``y`` (pixel row) and, for
Train, one float field per cell type (the competition: C1..C35); Test slides may carry ``Test_Set``.
Slide names are free (``S_k`` in the competition). Files written by ``python -m src.ingest`` also hold
``barcodes/{split}/{slide}`` and ``fullres/{split}/{slide}`` (the spots' source coordinates).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.data.spatial import COMPETITION_UM_PER_PX

SPLITS = ("Train", "Test")
COORDS = ("x", "y")
NON_TARGET_FIELDS = {"x", "y", "Test_Set"}


@dataclass(frozen=True)
class SlideRef:
    """Where one slide lives in the file."""

    split: str  # "Train" or "Test"
    name: str  # e.g. "S_1"

    @property
    def image_key(self) -> str:
        return f"images/{self.split}/{self.name}"

    @property
    def spots_key(self) -> str:
        return f"spots/{self.split}/{self.name}"


def open_h5(path: str | Path) -> h5py.File:
    """Open an HDF5 file read-only, with a one-line error when it is missing or not HDF5."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file") from None


def slide_refs(h5: h5py.File, group: str = "images") -> list[SlideRef]:
    """Slides under ``images/`` (or ``spots/``), Train first, natural order (S_2 before S_10)."""
    refs = []
    for split in SPLITS:
        key = f"{group}/{split}"
        if key in h5:
            names = sorted(h5[key].keys(), key=_natural_key)
            refs.extend(SlideRef(split, n) for n in names)
    return refs


def _natural_key(name: str) -> tuple:
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, -1)


def target_names(fields: tuple[str, ...] | list[str]) -> list[str]:
    """Cell-type columns of a spot table: every field that is not a coordinate or the test-set tag."""
    return [f for f in fields if f not in NON_TARGET_FIELDS]


def read_spots(h5: h5py.File, ref: SlideRef) -> pd.DataFrame:
    """The spot table of one slide as a DataFrame (one row per spot, file order). Float coordinates
    (as spatial tables exported from scanpy/squidpy hold) are rounded to whole pixels."""
    frame = pd.DataFrame(h5[ref.spots_key][()])
    for coord in COORDS:
        frame[coord] = round_coordinates(frame[coord].to_numpy())
    return frame


def round_coordinates(values: np.ndarray) -> np.ndarray:
    """Pixel coordinates as int64: floats are rounded half to even (numpy's rint)."""
    return np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values.astype(np.int64)


def read_barcodes(h5: h5py.File, ref: SlideRef) -> np.ndarray | None:
    """The spots' barcodes (imported Visium slides), or None."""
    key = f"barcodes/{ref.split}/{ref.name}"
    return h5[key].asstr()[()] if key in h5 else None


def read_um_per_px(h5: h5py.File) -> float:
    """The file's resolution: its ``um_per_px`` attribute, or the competition's 2.115 µm/px."""
    value = float(h5.attrs.get("um_per_px", COMPETITION_UM_PER_PX))
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{h5.filename}: attribute um_per_px = {value:g} (expected a positive number)")
    return value


def read_fullres(h5: h5py.File, ref: SlideRef) -> tuple[np.ndarray, dict] | None:
    """The spots' source (full-resolution) coordinates, N x 2 (x, y), and where they come from
    (``source``, ``source_um_per_px``, ``scale``, ``scalefactors``, ``library_id``), or None."""
    key = f"fullres/{ref.split}/{ref.name}"
    if key not in h5:
        return None
    attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in h5[key].attrs.items()}
    if isinstance(attrs.get("scalefactors"), str):
        attrs["scalefactors"] = json.loads(attrs["scalefactors"])
    return h5[key][()], attrs


def read_image_uint8(h5: h5py.File, ref: SlideRef) -> np.ndarray:
    """The slide image as H x W x 3 uint8 (floats 0-1 are scaled by 255 and rounded)."""
    image = h5[ref.image_key][()]
    if image.dtype == np.uint8:
        return image
    return np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


def image_shape(h5: h5py.File, ref: SlideRef) -> tuple[int, int]:
    height, width = h5[ref.image_key].shape[:2]
    return int(height), int(width)


def image_chunks(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """HDF5 chunk shape for an H x W x 3 image: 256 x 256 tiles, never larger than the image."""
    return min(256, shape[0]), min(256, shape[1]), 3
