"""An H&E whole-slide image as spots to predict: the tissue found, the model's spot lattice laid over
it, and a stain-normalized patch per spot cut while the slide streams past.

:func:`plan_whole_slide` reads the slide's pixel size (or takes the user's), finds the tissue on a
thumbnail (``src.data.slides.tissue``), lays a hexagonal lattice at the model's spot pitch over the
tissue's bounding box and keeps the spots whose disc is mostly tissue. :func:`cut_patches` then reads
the slide twice at the model's resolution in bands (``src.data.slides.wsi.resampled_bands``): once for
the slide's stain sample, once to cut, normalize and write each spot's patch to a file on disk. Memory
is bounded by a band and a batch of patches, whatever the slide's size.

The tissue's bounding box plays the part of a Visium slide's capture area: its pixels are what the
stain is measured on, its size is what spot coordinates are relative to (``x / W, y / H``). Given a
spot table instead of the lattice (:func:`plan_whole_slide` ``spots_fullres``), the box is the whole
slide and the patches are, pixel for pixel, those ``ingest`` + ``predict --h5`` cut.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.data.preprocessing.patch_set import PatchSet
from src.data.preprocessing.patch_store import PatchArray
from src.data.preprocessing.stain import SlideStain, StainNormalizer
from src.data.slides.tissue import Thumbnail, disc_tissue_share, read_thumbnail, tissue_box
from src.data.slides.wsi import PixelSize, level0_to_resampled, open_image, resampled_bands, resampled_shape
from src.data.spatial import hex_lattice

MIN_TISSUE_SHARE = 0.5  # a lattice spot is kept when at least half its disc is tissue
RESOLUTION_TOLERANCE = 1.01  # a slide up to 1% coarser than the model's resolution is as fine
NORMALIZE_BATCH = 256  # patches stain-normalized at a time


@dataclass
class WholeSlidePlan:
    """Where one slide's spots are, at the model's resolution (pipeline px) and at the slide's own."""

    path: Path
    name: str
    pixel_size: PixelSize  # level 0
    scale: float  # pipeline px per level-0 px
    shape: tuple[int, int]  # the whole slide in pipeline px (height, width)
    region: tuple[int, int, int, int]  # top, left, height, width in pipeline px: the tissue's box
    spots: pd.DataFrame  # x, y (pipeline px in the region, integers), x_fullres, y_fullres, tissue_share
    thumbnail: Thumbnail
    notes: list[str] = field(default_factory=list)


def slide_pixel_size(path: Path, from_file: PixelSize | None, given: float | None) -> tuple[PixelSize, list[str]]:
    """The level-0 pixel size: the user's when given (noted if the file says otherwise), else the file's."""
    if given is not None:
        if given <= 0 or not np.isfinite(given):
            raise InputError(f"{path}: --um-per-px {given:g}: expected a positive number")
        notes = [] if from_file is None or abs(given / from_file.um_per_px - 1) <= 0.10 else [
            f"pixel size {given:g} um/px as given, not the file's {from_file.um_per_px:g} ({from_file.source})"]
        return PixelSize(given, "--um-per-px"), notes
    if from_file is None:
        raise InputError(f"{path}: no pixel size: the file records none (no MPP, resolution tags or OME "
                         "PhysicalSize); give it with --um-per-px (or an um_per_px column in the manifest)")
    return from_file, []


def plan_whole_slide(path: Path, model_um_per_px: float, pitch_um: float, um_per_px: float | None = None,
                     name: str | None = None, spots_fullres: np.ndarray | None = None,
                     region_from_tissue: bool | None = None) -> WholeSlidePlan:
    """Find the tissue and lay the spots (or take ``spots_fullres``, N x 2 level-0 px, as they are).

    The region the spots' coordinates are relative to is the tissue's box for the lattice, the whole
    slide for a spot table (as ``ingest`` reads it); ``region_from_tissue`` chooses otherwise."""
    with open_image(path) as image:
        pixel_size, notes = slide_pixel_size(path, image.pixel_size, um_per_px)
        if pixel_size.um_per_px > model_um_per_px * RESOLUTION_TOLERANCE:
            raise InputError(f"{path}: {pixel_size.um_per_px:g} um/px ({pixel_size.source}) is coarser than the "
                             f"model's {model_um_per_px:g} um/px: it cannot show what the model was trained on; "
                             "use a finer scan (or level) of the slide")
        scale = pixel_size.um_per_px / model_um_per_px
        height, width, _ = resampled_shape(image, scale)
        thumbnail = read_thumbnail(image, pixel_size.um_per_px)
        level0 = (image.height, image.width)
    scale_x, scale_y = width / level0[1], height / level0[0]
    region = (0, 0, height, width)
    if region_from_tissue is None:
        region_from_tissue = spots_fullres is None
    if region_from_tissue:
        top, left, bottom, right = tissue_box(thumbnail, path)
        region = (int(np.floor(top * scale_y)), int(np.floor(left * scale_x)))
        region += (min(height, int(np.ceil(bottom * scale_y))) - region[0],
                   min(width, int(np.ceil(right * scale_x))) - region[1])
    if spots_fullres is None:
        lattice = hex_lattice(region[3], region[2], pitch_um / model_um_per_px)
        x, y = np.rint(lattice[:, 0]).astype(np.int64), np.rint(lattice[:, 1]).astype(np.int64)
        x_full = (region[1] + lattice[:, 0] + 0.5) / scale_x - 0.5
        y_full = (region[0] + lattice[:, 1] + 0.5) / scale_y - 0.5
    else:
        x_full, y_full = np.asarray(spots_fullres[:, 0], float), np.asarray(spots_fullres[:, 1], float)
        x, y = (np.rint(v).astype(np.int64) for v in level0_to_resampled(x_full, y_full, level0, (height, width)))
        x, y = np.clip(x - region[1], 0, region[3] - 1), np.clip(y - region[0], 0, region[2] - 1)
    share = disc_tissue_share(thumbnail, x_full, y_full)
    spots = pd.DataFrame({"x": x, "y": y, "x_fullres": x_full, "y_fullres": y_full, "tissue_share": share})
    if spots_fullres is None:
        spots = spots[spots["tissue_share"] >= MIN_TISSUE_SHARE].reset_index(drop=True)
        if spots.empty:
            raise InputError(f"{path}: no tissue found under a single spot (the tissue found covers no {pitch_um:.0f}-um "
                             "lattice spot by half): is it an H&E slide, and is its pixel size right?")
    return WholeSlidePlan(Path(path), name or Path(path).name.split(".")[0], pixel_size, scale, (height, width),
                          region, spots, thumbnail, notes)


def reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Indices into an axis of length ``n`` as ``np.pad(mode="reflect")`` extends it (edge not repeated)."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.mod(index, period)
    return np.where(index >= n, period - index, index)


class CropFile(PatchArray):
    """N x P x P x 3 uint8 patches in a file on disk, read with ``pread`` (nothing mapped, so memory
    stays flat however many patches); indexing returns what an array would (an int one patch, a slice
    or index array a stacked copy). The file is unlinked once open: it takes disk space (N x P² x 3
    bytes) only while this object holds it open."""

    dtype = np.dtype(np.uint8)

    def __init__(self, path: Path, n: int, size: int):
        self.path, self.size = Path(path), int(size)
        self.shape = (int(n), self.size, self.size, 3)
        self._bytes = self.size * self.size * 3
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.unlink(self.path)  # the space is freed when the file is closed, or the process ends, whatever stops it
        os.ftruncate(self._fd, n * self._bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, i: int, patch: np.ndarray) -> None:
        os.pwrite(self._fd, np.ascontiguousarray(patch, np.uint8).tobytes(), int(i) * self._bytes)

    def _crop(self, i: int) -> np.ndarray:
        data = os.pread(self._fd, self._bytes, int(i) * self._bytes)
        return np.frombuffer(data, np.uint8).reshape(self.size, self.size, 3).copy()

    @property
    def nbytes(self) -> int:
        return len(self) * self._bytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _slide_bands(plan: WholeSlidePlan):
    """(first row, rows x W x 3) of the whole slide at the model's resolution, top to bottom."""
    with open_image(plan.path) as image:
        yield from resampled_bands(image, plan.scale)


def _region_bands(plan: WholeSlidePlan):
    """(first region row, rows x region width x 3) of the slide's region, top to bottom."""
    top, left, height, width = plan.region
    for first, band in _slide_bands(plan):
        lo, hi = max(first, top), min(first + len(band), top + height)
        if lo < hi:
            yield lo - top, band[lo - first : hi - first, left : left + width]
        if hi == top + height:
            break


def measure_stain(plan: WholeSlidePlan, normalizer: StainNormalizer) -> SlideStain:
    """The slide's stain, measured on the same sample of its region's pixels ``normalizer.transform``
    would take of the region in memory."""
    if normalizer.method == "none":
        return SlideStain(None, None, None)
    width = plan.region[3]
    index = normalizer.sample_index(plan.region[2] * width)
    parts = []
    for first, band in _region_bands(plan):
        pixels = band.reshape(-1, 3)
        if index is None:
            parts.append(pixels.copy())
            continue
        start, stop = first * width, (first + len(band)) * width
        chosen = index[np.searchsorted(index, start) : np.searchsorted(index, stop)]
        parts.append(pixels[chosen - start])
    return normalizer.measure(np.concatenate(parts))


def cut_patches(plan: WholeSlidePlan, normalizer: StainNormalizer, patch_size: int, targets: list[str],
                work_dir: Path, um_per_px: float, progress: Callable[[int], None] | None = None) -> PatchSet:
    """Every planned spot's stain-normalized patch, centred on it as stage ``patches`` centres them,
    written to ``work_dir``; a :class:`PatchSet` over them. Patches are cut from the whole slide (what
    lies beyond the tissue's box is read, not mirrored), reflect-padded only at the slide's own edges
    as stage ``patches`` pads its slides."""
    stain = measure_stain(plan, normalizer)
    top, left, region_height, region_width = plan.region
    height, width = plan.shape
    half = patch_size // 2
    spots = plan.spots
    first_row, first_col = spots["y"].to_numpy() + top - half, spots["x"].to_numpy() + left - half
    offsets = np.arange(patch_size)
    lowest, highest = np.empty(len(spots), np.int64), np.empty(len(spots), np.int64)
    for start in range(0, len(spots), 4096):  # the rows each patch reads (reflected at the edges): their range
        rows = reflect(first_row[start : start + 4096, None] + offsets, height)
        lowest[start : start + 4096], highest[start : start + 4096] = rows.min(axis=1), rows.max(axis=1)
    order = np.argsort(highest, kind="stable")
    crops = CropFile(Path(work_dir) / "patches.u8", len(spots), patch_size)
    try:
        _cut(plan, normalizer, stain, crops, first_row, first_col, lowest, highest, order, progress)
    except BaseException:
        crops.close()
        raise
    table = spots.assign(slide=plan.name, spot=np.arange(len(spots)))
    front = ["slide", "spot", "x", "y"]
    table = table[front + [c for c in table.columns if c not in front]]
    return PatchSet(crops, table, list(targets), {plan.name: (region_height, region_width)}, patch_size, um_per_px)


def _cut(plan: WholeSlidePlan, normalizer: StainNormalizer, stain: SlideStain, crops: CropFile,
         first_row: np.ndarray, first_col: np.ndarray, lowest: np.ndarray, highest: np.ndarray, order: np.ndarray,
         progress: Callable[[int], None] | None) -> None:
    """Stream the slide's bands, keeping only the rows patches still need, and write each patch as soon
    as its rows have passed (normalized in batches: the stain acts pixel by pixel)."""
    height, width = plan.shape
    size = crops.size
    offsets = np.arange(size)
    buffer, buffer_top, next_spot = np.zeros((0, width, 3), np.uint8), 0, 0
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        stack = np.concatenate([p for _, p in pending])  # (n * P) x P x 3
        done = normalizer.apply(stack, stain) if normalizer.method != "none" else stack
        for j, (i, _) in enumerate(pending):
            crops.write(i, done[j * size : (j + 1) * size])
        if progress is not None:
            progress(len(pending))
        pending.clear()

    for first, band in _slide_bands(plan):
        end = first + len(band)
        if next_spot < len(order) and int(lowest[order[next_spot:]].min()) >= end:
            buffer, buffer_top = np.zeros((0, width, 3), np.uint8), end  # no patch needs these rows
            continue
        buffer = np.concatenate([buffer, band]) if len(buffer) else band
        buffer_top = first if len(buffer) == len(band) else buffer_top
        while next_spot < len(order) and highest[order[next_spot]] < end:
            i = order[next_spot]
            rows = reflect(first_row[i] + offsets, height) - buffer_top
            pending.append((i, buffer[rows][:, reflect(first_col[i] + offsets, width)]))
            next_spot += 1
            if len(pending) >= NORMALIZE_BATCH:
                flush()
        keep_from = min(int(lowest[order[next_spot:]].min()), end) if next_spot < len(order) else end
        if keep_from > buffer_top:
            buffer = buffer[keep_from - buffer_top :]
            buffer_top = keep_from
        if next_spot == len(order):
            break
    flush()
