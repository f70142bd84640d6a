"""Where the tissue is on a whole-slide image, found on a low-resolution copy of it.

scikit-image's thresholds and morphology do the work (it is already a dependency, BSD-licensed and
maintained; LazySlide, MIT, wraps much the same steps behind a larger stack). The rule is the one
slide-scale tools use: stained tissue absorbs light, glass does not. A pixel's summed optical
density is thresholded by Otsu's method, kept between a floor (faint glass, dust) and the project's
tissue threshold (so a slide that is all tissue is not split in two by Otsu), then closed (the
empty inside of fat cells is tissue), cleared of specks smaller than a spot and of holes smaller
than a few spots.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from src.core.errors import InputError
from src.data.slides.wsi import SlideImage, read_resampled
from src.data.spatial import SPOT_DIAMETER_UM, SPOT_PITCH_UM

THUMBNAIL_UM_PER_PX = 4.0  # the tissue is found at this resolution, or coarser for very large slides
THUMBNAIL_MAX_SIDE = 4096  # px: bounds the thumbnail's memory whatever the slide's size (50 MB)
OD_FLOOR, OD_CEILING = 0.05, 0.15  # summed optical density: Otsu's threshold is kept between these
FAT_CELL_UM = 35.0  # closing radius: bridges adipocytes' empty insides
HOLE_SPOTS = 4.0  # holes smaller than this many spot areas are filled


@dataclass(frozen=True)
class Thumbnail:
    """A whole slide at low resolution, with its tissue mask."""

    image: np.ndarray  # H x W x 3 uint8
    tissue: np.ndarray  # H x W bool
    um_per_px: float
    scale: float  # thumbnail pixels per level-0 pixel


def read_thumbnail(image: SlideImage, um_per_px: float) -> Thumbnail:
    """The slide at :data:`THUMBNAIL_UM_PER_PX` (coarser when its longest side would exceed
    :data:`THUMBNAIL_MAX_SIDE`), read from the pyramid level that fits, with its tissue."""
    longest_um = max(image.width, image.height) * um_per_px
    target = max(THUMBNAIL_UM_PER_PX, longest_um / THUMBNAIL_MAX_SIDE, um_per_px)
    rgb, _ = read_resampled(image, um_per_px / target)
    real = um_per_px * image.width / rgb.shape[1]
    return Thumbnail(rgb, tissue_mask(rgb, real), real, rgb.shape[1] / image.width)


def tissue_mask(rgb: np.ndarray, um_per_px: float) -> np.ndarray:
    """Boolean tissue mask of a low-resolution H x W x 3 uint8 image at ``um_per_px``."""
    from skimage import filters, morphology

    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0).sum(axis=2)
    od = filters.gaussian(od, sigma=max(0.5, 8.0 / um_per_px), preserve_range=True)
    try:
        threshold = filters.threshold_otsu(od)
    except ValueError:  # a single grey level
        threshold = OD_CEILING
    tissue = od > float(np.clip(threshold, OD_FLOOR, OD_CEILING))
    tissue = morphology.closing(tissue, morphology.disk(max(1, round(FAT_CELL_UM / um_per_px))))
    spot_area = np.pi * (SPOT_DIAMETER_UM / 2 / um_per_px) ** 2
    tissue = morphology.remove_small_objects(tissue, max_size=max(1, int(spot_area)))
    return morphology.remove_small_holes(tissue, max_size=max(1, int(HOLE_SPOTS * spot_area)))


def disc_tissue_share(thumbnail: Thumbnail, x: np.ndarray, y: np.ndarray, diameter_um: float = SPOT_DIAMETER_UM
                      ) -> np.ndarray:
    """Share of each spot's disc (centres in level-0 px) that is tissue on the thumbnail's mask, from
    a fixed set of points spread over the disc (so the answer does not depend on the mask's resolution)."""
    radius = diameter_um / 2 / thumbnail.um_per_px
    ring = [(0.0, 0.0)] + [(r * np.cos(a), r * np.sin(a)) for r in (0.45, 0.9)
                           for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)]
    height, width = thumbnail.tissue.shape
    share = np.zeros(len(x))
    for dx, dy in ring:
        cols = np.clip(np.rint((x + 0.5) * thumbnail.scale - 0.5 + dx * radius), 0, width - 1).astype(int)
        rows = np.clip(np.rint((y + 0.5) * thumbnail.scale - 0.5 + dy * radius), 0, height - 1).astype(int)
        share += thumbnail.tissue[rows, cols]
    return share / len(ring)


def tissue_box(thumbnail: Thumbnail, path, margin_um: float = SPOT_PITCH_UM) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) in level-0 px of the tissue's bounding box with a margin; one line
    when there is no tissue."""
    rows, cols = np.nonzero(thumbnail.tissue)
    if not len(rows):
        raise InputError(f"{path}: no tissue found (nothing absorbs light on its {thumbnail.tissue.shape[1]} x "
                         f"{thumbnail.tissue.shape[0]} px thumbnail at {thumbnail.um_per_px:.3g} um/px): is it an "
                         "H&E slide, and is its pixel size right?")
    margin = margin_um / thumbnail.um_per_px  # thumbnail px
    to_level0 = 1.0 / thumbnail.scale
    top = max(0.0, (rows.min() - margin) * to_level0)
    left = max(0.0, (cols.min() - margin) * to_level0)
    bottom = (rows.max() + 1 + margin) * to_level0
    right = (cols.max() + 1 + margin) * to_level0
    return int(top), int(left), int(np.ceil(bottom)), int(np.ceil(right))
