"""Whole-slide files written as scanners write them, for the simulator's lab export and the import
benchmark: pyramidal TIFFs with JPEG tiles and resolution tags (levels in the main IFD chain, as
OpenSlide and tifffile read them), and Aperio SVS files (the same tiles, a thumbnail after level 0,
a label and a macro image, ``MPP`` in the ImageDescription).

Levels are given as tile iterators, so a slide larger than memory can be written tile by tile.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

TILE = 256
JPEG_QUALITY = 90
APERIO = "Aperio Image Library v12.0.15"


def array_tiles(image: np.ndarray) -> Iterator[np.ndarray]:
    """An in-memory image's tiles in row-major order (edge tiles padded with white)."""
    height, width = image.shape[:2]
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            part = image[top:top + TILE, left:left + TILE]
            tile[:part.shape[0], :part.shape[1]] = part
            yield tile


def procedural_tiles(height: int, width: int, pixel: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
    """Tiles of an image defined by ``pixel(rows, cols) -> (..., 3) uint8``: never held whole."""
    for top in range(0, height, TILE):
        for left in range(0, width, TILE):
            rows, cols = np.mgrid[top:top + TILE, left:left + TILE]
            yield pixel(rows, cols)


def pyramid_of(image: np.ndarray, min_size: int = TILE) -> list[np.ndarray]:
    """Level 0 and halved levels (box filter) while the level stays above ``min_size`` px."""
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_size and len(levels) < 6:
        previous = Image.fromarray(levels[-1])
        levels.append(np.asarray(previous.resize((previous.width // 2, previous.height // 2), Image.Resampling.BOX)))
    return levels


def write_pyramidal_tiff(path: Path, levels: list[tuple[int, int, Iterator[np.ndarray]]], um_per_px: float) -> None:
    """A BigTIFF pyramid: JPEG tiles, each level's resolution tags in pixels per centimetre."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    base_width = levels[0][1]
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, (height, width, tiles) in enumerate(levels):
            level_um = um_per_px * base_width / width
            tif.write(tiles, shape=(height, width, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                      compression="jpeg", compressionargs={"level": JPEG_QUALITY}, subfiletype=1 if i else 0,
                      resolution=(1e4 / level_um, 1e4 / level_um), resolutionunit="CENTIMETER", metadata=None)


def write_svs(path: Path, levels: list[tuple[int, int, Iterator[np.ndarray]]], um_per_px: float,
              thumbnail: np.ndarray, label: np.ndarray | None = None) -> None:
    """An Aperio SVS: level 0, a thumbnail in strips, the reduced levels, a label and a macro image."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = levels[0][:2]
    head = f"{APERIO}\r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE})"
    jpeg = {"compression": "jpeg", "compressionargs": {"level": JPEG_QUALITY}, "photometric": "rgb", "metadata": None}
    label = label if label is not None else np.full((300, 300, 3), 240, np.uint8)
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as tif:
        for i, (level_h, level_w, tiles) in enumerate(levels):
            if i == 0:
                description = (f"{head} JPEG/RGB Q={JPEG_QUALITY}|AppMag = {10 / um_per_px:.0f}|"
                               f"Filename = {path.stem}|MPP = {um_per_px:.4f}")
            else:
                description = f"{head} -> {level_w}x{level_h} JPEG/RGB Q={JPEG_QUALITY}"
            tif.write(tiles, shape=(level_h, level_w, 3), dtype=np.uint8, tile=(TILE, TILE),
                      description=description, **jpeg)  # Aperio marks no level as reduced
            if i == 0:
                tif.write(thumbnail, description=f"{APERIO}\r\n{width}x{height} -> "
                          f"{thumbnail.shape[1]}x{thumbnail.shape[0]} - ", **jpeg)
        tif.write(label, description=f"{APERIO}\r\nlabel {label.shape[1]}x{label.shape[0]}", subfiletype=1,
                  photometric="rgb", compression="lzw", metadata=None)
        tif.write(thumbnail, description=f"{APERIO}\r\nmacro {thumbnail.shape[1]}x{thumbnail.shape[0]}",
                  subfiletype=9, **jpeg)


def write_image_pyramid(path: Path, image: np.ndarray, um_per_px: float) -> None:
    """An in-memory image as a scanner file: SVS for a ``.svs`` path, else a pyramidal JPEG TIFF."""
    levels = [(lv.shape[0], lv.shape[1], array_tiles(lv)) for lv in pyramid_of(image)]
    if path.suffix.lower() == ".svs":
        thumb = Image.fromarray(image)
        thumb.thumbnail((768, 768))
        write_svs(path, levels, um_per_px, np.asarray(thumb))
    else:
        write_pyramidal_tiff(path, levels, um_per_px)
