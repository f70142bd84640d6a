"""A slide's full-resolution H&E image (TIFF / BigTIFF, pyramidal or not) resampled to the pipeline's
resolution, in bands of rows so memory stays bounded by the output and a band of the source.

The pyramid level read is the coarsest one that is still at least as fine as the target, so a
40x whole-slide image is not decoded at full size to make a 2 µm/px slide. Resampling is Lanczos
with PIL's exact source boxes, so bands join without seams.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from src.core.errors import InputError

BAND_ROWS = 512  # output rows resampled at a time, at most
SOURCE_BAND_ROWS = 1024  # and about this many rows of the level read (memory: a band of a 25k-px-wide slide is 77 MB)
LANCZOS_SUPPORT = 3  # source pixels per output pixel on each side of PIL's Lanczos kernel


@dataclass(frozen=True)
class Level:
    """One pyramid level of a TIFF series: its index, shape (rows, columns) and axes."""

    index: int
    height: int
    width: int
    downsample: float  # level-0 pixels per pixel of this level


def open_levels(path: Path) -> tuple[list[Level], str]:
    """The pyramid levels of the image's first series (level 0 first) and its axes string."""
    import tifffile

    if not path.is_file():
        raise InputError(f"{path}: image not found")
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            shapes = [level.shape for level in series.levels]
    except (tifffile.TiffFileError, ValueError, IndexError) as err:
        raise InputError(f"{path}: not a readable TIFF image ({err})") from None
    rows, cols = axes.find("Y"), axes.find("X")
    colour = axes.find("S") if "S" in axes else axes.find("C")
    if rows < 0 or cols < 0 or colour < 0 or shapes[0][colour] not in (3, 4) or len(axes) != 3:
        raise InputError(f"{path}: image axes {axes} shape {shapes[0]} are not an RGB image (Y, X, 3 samples)")
    base = shapes[0][cols]
    levels = [Level(i, int(s[rows]), int(s[cols]), base / s[cols]) for i, s in enumerate(shapes)]
    return levels, axes


def choose_level(levels: list[Level], scale: float) -> Level:
    """The coarsest level still at least as fine as ``scale`` (output pixels per level-0 pixel)."""
    fine_enough = [lv for lv in levels if lv.downsample * scale <= 1.01]  # 1% coarser is as fine
    return max(fine_enough, key=lambda lv: lv.downsample) if fine_enough else levels[0]


def read_resampled(path: Path, scale: float, log=print) -> tuple[np.ndarray, Level, list[Level]]:
    """The image at ``scale`` output pixels per level-0 pixel, as H x W x 3 uint8, with the level read."""
    import tifffile
    import zarr

    levels, axes = open_levels(path)
    level = choose_level(levels, scale)
    out_h = max(1, round(level.height * scale * level.downsample))
    out_w = max(1, round(level.width * scale * level.downsample))
    factor = out_h / level.height  # output pixels per pixel of the level read (exact for the rounded size)
    log(f"{path.name}: reading level {level.index} of {len(levels)} ({level.width} x {level.height} px, "
        f"{level.downsample:g}x below full resolution) -> {out_w} x {out_h} px")
    with tifffile.TiffFile(path) as tif:
        store = tif.series[0].aszarr(level=level.index)
        source = zarr.open(store, mode="r")
        order = [axes.index("Y"), axes.index("X"), axes.index("S") if "S" in axes else axes.index("C")]
        out = np.empty((out_h, out_w, 3), np.uint8)
        margin = math.ceil(LANCZOS_SUPPORT / min(factor, 1.0)) + 2
        band_rows = max(1, min(BAND_ROWS, math.floor(SOURCE_BAND_ROWS * factor)))
        for top in range(0, out_h, band_rows):
            bottom = min(out_h, top + band_rows)
            y0, y1 = top / factor, bottom / factor  # source edges of the output band
            first, last = max(0, math.floor(y0) - margin), min(level.height, math.ceil(y1) + margin)
            band = _as_rgb_uint8(path, np.transpose(np.asarray(source[_rows(order, first, last)]), order))
            image = Image.fromarray(band)
            box = (0.0, y0 - first, float(level.width), min(y1, last) - first)
            out[top:bottom] = np.asarray(image.resize((out_w, bottom - top), Image.Resampling.LANCZOS, box=box))
        store.close()
    return out, level, levels


def _rows(order: list[int], first: int, last: int) -> tuple:
    index = [slice(None)] * 3
    index[order[0]] = slice(first, last)
    return tuple(index)


def _as_rgb_uint8(path: Path, band: np.ndarray) -> np.ndarray:
    band = band[..., :3]
    if band.dtype == np.uint8:
        return np.ascontiguousarray(band)
    if band.dtype == np.uint16:
        return np.ascontiguousarray((band.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise InputError(f"{path}: image dtype {band.dtype} (expected uint8 or uint16 RGB)")
