"""Checks of a file in the competition HDF5 layout (``python -m src.validate PATH`` prints a summary).

Each check raises :class:`~src.core.errors.InputError` with one line naming file, slide, field and value.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from src.core.errors import InputError
from src.data.slides.layout import COORDS, SPLITS, SlideRef, open_h5, slide_refs, target_names

IMAGE_CHUNK_ROWS = 256  # rows read at a time when scanning float images (bounded memory)


@dataclass(frozen=True)
class SlideSummary:
    ref: SlideRef
    height: int
    width: int
    dtype: str
    n_spots: int
    targets: tuple[str, ...]
    target_mean: float  # mean abundance over spots and cell types (nan for Test)
    target_max: float
    zero_fraction: float
    target_min: float  # smallest abundance (nan for Test)
    coordinate_rounding: float  # largest |x - round(x)|, |y - round(y)| (float coordinates); 0 for integers


def validate_file(path: str | Path, need_train: bool = True) -> list[SlideSummary]:
    """Validate the whole file; return one summary per slide (Train first). A file to predict
    (``need_train=False``) may hold Test slides only."""
    path = Path(path)
    with open_h5(path) as h5:
        for group in ("images", "spots"):
            if group not in h5:
                raise InputError(f"{path}: group '{group}' missing (expected images/ and spots/)")
        _check_pairing(path, h5)
        refs = slide_refs(h5, "images")
        if need_train and not any(r.split == "Train" for r in refs):
            raise InputError(f"{path}: no Train slides under images/Train")
        if not refs:
            raise InputError(f"{path}: no slides under images/Train or images/Test")
        summaries = [_check_slide(path, h5, ref) for ref in refs]
    train_targets = {s.ref.name: s.targets for s in summaries if s.ref.split == "Train"}
    if not train_targets:
        return summaries
    first_name, first = next(iter(train_targets.items()))
    for name, targets in train_targets.items():
        if targets != first:
            extra = sorted(set(targets) ^ set(first)) or ["(order differs)"]
            raise InputError(
                f"{path}: spots/Train/{name}: target columns differ from {first_name} "
                f"(field {extra[0]})"
            )
    return summaries


def _check_pairing(path: Path, h5: h5py.File) -> None:
    for split in SPLITS:
        images = set(h5[f"images/{split}"].keys()) if f"images/{split}" in h5 else set()
        spots = set(h5[f"spots/{split}"].keys()) if f"spots/{split}" in h5 else set()
        for name in sorted(images - spots):
            raise InputError(f"{path}: slide {split}/{name} has an image but no spots/{split}/{name}")
        for name in sorted(spots - images):
            raise InputError(f"{path}: slide {split}/{name} has spots but no images/{split}/{name}")


def _check_slide(path: Path, h5: h5py.File, ref: SlideRef) -> SlideSummary:
    where = f"{path}: {ref.image_key}"
    image = h5[ref.image_key]
    if not isinstance(image, h5py.Dataset):
        raise InputError(f"{where}: expected an image dataset, found a group")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"{where}: image shape {image.shape} is not H x W x 3")
    height, width = int(image.shape[0]), int(image.shape[1])
    if height == 0 or width == 0:
        raise InputError(f"{where}: empty image {image.shape}")
    _check_image_values(where, image)

    where = f"{path}: {ref.spots_key}"
    spots_ds = h5[ref.spots_key]
    if not isinstance(spots_ds, h5py.Dataset) or spots_ds.dtype.names is None:
        raise InputError(f"{where}: expected a structured array with fields x, y, ...")
    fields = tuple(spots_ds.dtype.names)
    for coord in COORDS:
        if coord not in fields:
            raise InputError(f"{where}: field '{coord}' missing (fields: {', '.join(fields)})")
    spots = spots_ds[()]
    if len(spots) == 0:
        raise InputError(f"{where}: slide has zero spots")
    rounding = _check_coordinates(where, spots, height, width)

    targets = tuple(target_names(fields)) if ref.split == "Train" else ()
    if ref.split == "Train" and not targets:
        raise InputError(f"{where}: no target (cell-type) fields besides x, y")
    values = np.empty((len(spots), 0))
    if targets:
        values = np.stack([_numeric(where, spots, t) for t in targets], axis=1)
        _check_targets(where, values, targets)
    return SlideSummary(
        ref=ref,
        height=height,
        width=width,
        dtype=str(image.dtype),
        n_spots=len(spots),
        targets=targets,
        target_mean=float(values.mean()) if values.size else float("nan"),
        target_max=float(values.max()) if values.size else float("nan"),
        zero_fraction=float((values == 0).mean()) if values.size else float("nan"),
        target_min=float(values.min()) if values.size else float("nan"),
        coordinate_rounding=rounding,
    )


def _check_image_values(where: str, image: h5py.Dataset) -> None:
    if image.dtype == np.uint8:
        return
    if image.dtype.kind != "f":
        raise InputError(f"{where}: image dtype {image.dtype} (expected float 0-1 or uint8)")
    for start in range(0, image.shape[0], IMAGE_CHUNK_ROWS):
        block = image[start : start + IMAGE_CHUNK_ROWS]
        bad = ~np.isfinite(block)
        if bad.any():
            row, col, _ = np.argwhere(bad)[0]
            raise InputError(f"{where}: pixel (row {start + row}, col {col}) is {block[bad][0]}")
        out = (block < 0) | (block > 1)
        if out.any():
            row, col, _ = np.argwhere(out)[0]
            value = block[row, col][(block[row, col] < 0) | (block[row, col] > 1)][0]
            raise InputError(
                f"{where}: pixel (row {start + row}, col {col}) value {value:g} outside 0-1"
            )


def _numeric(where: str, spots: np.ndarray, name: str) -> np.ndarray:
    column = spots[name]
    if column.dtype.kind not in "iuf":
        raise InputError(f"{where}: field '{name}' has non-numeric dtype {column.dtype}")
    return column.astype(np.float64)


def _check_coordinates(where: str, spots: np.ndarray, height: int, width: int) -> float:
    """Coordinates must lie in the image and be distinct once rounded to whole pixels (as every
    stage reads them); returns the largest rounding (0 for integer coordinates)."""
    x, y = _numeric(where, spots, "x"), _numeric(where, spots, "y")
    for name, values, limit in (("x", x, width), ("y", y, height)):
        bad = ~np.isfinite(values)
        bad[~bad] = (np.rint(values[~bad]) < 0) | (np.rint(values[~bad]) >= limit)
        if bad.any():
            i = int(np.argmax(bad))
            raise InputError(
                f"{where}: spot {i} field '{name}' = {values[i]:g} outside the image "
                f"(0..{limit - 1})"
            )
    pairs = np.stack([np.rint(x), np.rint(y)], axis=1)
    _, first_index, counts = np.unique(pairs, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        i = int(first_index[np.argmax(counts > 1)])
        j = int(np.flatnonzero((pairs == pairs[i]).all(axis=1))[1])
        rounded = " once rounded to whole pixels" if (x != np.rint(x)).any() or (y != np.rint(y)).any() else ""
        raise InputError(f"{where}: spots {i} and {j} share the coordinates x={pairs[i, 0]:g}, "
                         f"y={pairs[i, 1]:g}{rounded} (duplicate spot coordinates)")
    return float(max(np.abs(x - np.rint(x)).max(), np.abs(y - np.rint(y)).max()))


def _check_targets(where: str, values: np.ndarray, targets: tuple[str, ...]) -> None:
    checks = (
        (np.isnan(values), "is NaN"),
        (np.isinf(values), "is infinite"),
        (values < 0, "is a negative abundance"),
    )
    for bad, what in checks:
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise InputError(
                f"{where}: spot {row} field '{targets[col]}' = {values[row, col]:g} {what}"
            )
