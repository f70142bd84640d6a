"""Whole-slide and full-resolution H&E images as scanners and Space Ranger users hold them, read at the
pipeline's resolution in bands written straight to their destination (an HDF5 dataset), so memory is
bounded by a band of one pyramid level (``SOURCE_BAND_BYTES``), never by the slide or the output.

Readers, chosen by what the file is:
- vendor formats (Aperio ``.svs``, Hamamatsu ``.ndpi``/``.vms``, 3DHISTECH ``.mrxs``, Leica ``.scn``,
  Ventana ``.bif``, Philips TIFF, ...): OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel,
  which brings the library);
- every other TIFF (BigTIFF, OME-TIFF, tiled or in strips, pyramids in the main chain or in SubIFDs;
  JPEG, JPEG 2000, LZW, deflate): tifffile, which decodes through imagecodecs;
- PNG and JPEG files: Pillow, whole (they hold no pyramid; memory is the decoded image).

The pixel size comes from the file where it says one: OpenSlide's ``openslide.mpp-x``/``-y``, OME's
``PhysicalSizeX``/``Y``, Aperio's ``MPP`` in the ImageDescription, or the TIFF resolution tags with a
centimetre or inch unit. Values above ``MAX_UM_PER_PX`` are an image editor's 72/96/300 dpi, not a
microscope's, and count as absent.

The pyramid level read is the coarsest one still at least as fine as the target, so a 40x slide is not
decoded at full size to make a 2 µm/px image. Resampling is Lanczos with PIL's exact source boxes, so
bands join without seams.
"""
from __future__ import annotations

import abc
import contextlib
import logging
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from src.core.errors import InputError

BAND_ROWS = 512  # output rows resampled at a time, at most
SOURCE_BAND_BYTES = 16 * 2**20  # and about this much of the level read (620 rows of a 9,000-px-wide level)
LANCZOS_SUPPORT = 3  # source pixels per output pixel on each side of PIL's Lanczos kernel
MAX_UM_PER_PX = 20.0  # coarser "pixel sizes" are editors' default dpi (72 dpi = 353 µm/px), not a scanner's
PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FORMATS = "TIFF/BigTIFF/OME-TIFF, SVS, NDPI, MRXS, SCN, BIF, VMS, PNG or JPEG"


@dataclass(frozen=True)
class Level:
    """One pyramid level: its index, size in pixels and level-0 pixels per pixel of it."""

    index: int
    height: int
    width: int
    downsample: float


@dataclass(frozen=True)
class PixelSize:
    """µm per pixel of level 0 (the mean of x and y) and where it was read."""

    um_per_px: float
    source: str


class SlideImage(abc.ABC):
    """An open image: its levels, its pixel size (None when the file says none) and bands of rows."""

    path: Path
    kind: str  # the reader and format, e.g. "openslide aperio", "tifffile", "pillow"
    levels: list[Level]
    pixel_size: PixelSize | None

    @property
    def width(self) -> int:
        return self.levels[0].width

    @property
    def height(self) -> int:
        return self.levels[0].height

    @abc.abstractmethod
    def read_rows(self, level: Level, first: int, last: int) -> np.ndarray:
        """Rows [first, last) of a level, full width, as (rows, width, 3) uint8."""

    def close(self) -> None:
        pass

    def __enter__(self) -> SlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_image(path: Path) -> SlideImage:
    """The reader that takes ``path``; one line when none does or the file is unreadable."""
    with _quiet_tifffile():
        return _open_image(path)


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs what it finds wrong with a file (a page past its end) before it fails: the one-line
    error that follows says it for the user."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_image(path: Path) -> SlideImage:
    if not path.is_file():
        raise InputError(f"{path}: image not found")
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return _PillowImage(path)
    vendor = _openslide_vendor(path)
    if vendor and vendor != "generic-tiff":
        return _OpenSlideImage(path, vendor)
    if _is_tiff(path):
        return _TiffImage(path)
    if vendor:
        return _OpenSlideImage(path, vendor)
    raise InputError(f"{path}: not an image format the readers take ({FORMATS})")


def choose_level(levels: list[Level], scale: float) -> Level:
    """The coarsest level still at least as fine as ``scale`` (output pixels per level-0 pixel)."""
    fine_enough = [lv for lv in levels if lv.downsample * scale <= 1.01]  # 1% coarser is as fine
    return max(fine_enough, key=lambda lv: lv.downsample) if fine_enough else levels[0]


def resampled_shape(image: SlideImage, scale: float) -> tuple[int, int, int]:
    """(height, width, 3) of the image at ``scale`` output pixels per level-0 pixel."""
    level = choose_level(image.levels, scale)
    return (max(1, round(level.height * scale * level.downsample)),
            max(1, round(level.width * scale * level.downsample)), 3)


def read_resampled(image: SlideImage, scale: float, out=None) -> tuple[np.ndarray, Level]:
    """The image at ``scale`` output pixels per level-0 pixel, as H x W x 3 uint8 written band by band
    into ``out`` (any array-like of :func:`resampled_shape`, e.g. an HDF5 dataset; default a new array),
    and the level read."""
    out = np.empty(resampled_shape(image, scale), np.uint8) if out is None else out
    for top, band in resampled_bands(image, scale):
        out[top : top + len(band)] = band
    return out, choose_level(image.levels, scale)


def resampled_bands(image: SlideImage, scale: float) -> Iterator[tuple[int, np.ndarray]]:
    """The image at ``scale`` output pixels per level-0 pixel, as (first row, rows x W x 3 uint8)
    bands from top to bottom: the level that fits is read about 16 MB at a time, so memory is
    bounded by the slide's width, not its area. The same bands whoever reads them: a slide streamed
    here equals the slide :func:`read_resampled` returns, pixel for pixel."""
    level = choose_level(image.levels, scale)
    out_h, out_w, _ = resampled_shape(image, scale)
    factor = out_h / level.height  # output pixels per pixel of the level read (exact for the rounded size)
    margin = math.ceil(LANCZOS_SUPPORT / min(factor, 1.0)) + 2
    source_rows = max(2 * margin + 1, SOURCE_BAND_BYTES // (3 * level.width))
    band_rows = max(1, min(BAND_ROWS, math.floor(source_rows * factor)))
    for top in range(0, out_h, band_rows):
        bottom = min(out_h, top + band_rows)
        y0, y1 = top / factor, bottom / factor  # source edges of the output band
        first, last = max(0, math.floor(y0) - margin), min(level.height, math.ceil(y1) + margin)
        band = Image.fromarray(_checked_read(image, level, first, last))
        box = (0.0, y0 - first, float(level.width), min(y1, last) - first)
        yield top, np.asarray(band.resize((out_w, bottom - top), Image.Resampling.LANCZOS, box=box))


def level0_to_resampled(x: np.ndarray, y: np.ndarray, level0: tuple[int, int], shape: tuple[int, ...]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres of level 0 (``level0``: height, width) in the pixels of the image resampled to
    ``shape`` (float, clipped to the image): what ``ingest`` stores and ``predict --wsi`` crops at."""
    scale_x, scale_y = shape[1] / level0[1], shape[0] / level0[0]  # exact for the rounded size
    return (np.clip((np.asarray(x) + 0.5) * scale_x - 0.5, 0, shape[1] - 1),
            np.clip((np.asarray(y) + 0.5) * scale_y - 0.5, 0, shape[0] - 1))


def _checked_read(image: SlideImage, level: Level, first: int, last: int) -> np.ndarray:
    try:
        return image.read_rows(level, first, last)
    except InputError:
        raise
    except Exception as err:  # a decoder's error on a damaged tile: the file, not the code
        raise InputError(f"{image.path}: rows {first}-{last} of level {level.index} cannot be decoded "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else 'no message'}): "
                         "is the file truncated or damaged?") from None


def _as_rgb_uint8(path: Path, band: np.ndarray) -> np.ndarray:
    band = band[..., :3]
    if band.dtype == np.uint8:
        return np.ascontiguousarray(band)
    if band.dtype == np.uint16:
        return np.ascontiguousarray((band.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise InputError(f"{path}: image dtype {band.dtype} (expected uint8 or uint16 RGB)")


def _plausible(um_per_px: float | None, source: str) -> PixelSize | None:
    if um_per_px is None or not np.isfinite(um_per_px) or not 0 < um_per_px <= MAX_UM_PER_PX:
        return None
    return PixelSize(float(um_per_px), source)


# --- OpenSlide -----------------------------------------------------------------------------------------


def _openslide_vendor(path: Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class _OpenSlideImage(SlideImage):
    def __init__(self, path: Path, vendor: str):
        import openslide

        self.path, self.kind = path, f"openslide {vendor}"
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as err:
            raise InputError(f"{path}: OpenSlide cannot read this {vendor} file ({err})") from None
        self.levels = [Level(i, int(h), int(w), float(d)) for i, ((w, h), d)
                       in enumerate(zip(self._slide.level_dimensions, self._slide.level_downsamples))]
        if _is_tiff(path):  # SVS, NDPI, SCN, BIF, Philips: TIFF inside, so a cut copy shows before reading
            import tifffile

            try:
                with tifffile.TiffFile(path) as tif:
                    _check_complete(path, tif)
            except (tifffile.TiffFileError, ValueError, OSError) as err:
                raise InputError(f"{path}: not a readable {vendor} file ({str(err).splitlines()[0][:120]})") from None
        props = self._slide.properties
        mpp = [props.get(f"openslide.mpp-{axis}") for axis in "xy"]
        value = float(np.mean([float(v) for v in mpp])) if all(mpp) else None
        self.pixel_size = _plausible(value, "openslide.mpp-x/y")

    def read_rows(self, level: Level, first: int, last: int) -> np.ndarray:
        top = round(first * level.downsample)  # read_region takes level-0 coordinates
        rgba = np.asarray(self._slide.read_region((0, top), level.index, (level.width, last - first)))
        # premultiplied RGBA, transparent where the scanner wrote nothing: composite over white (glass)
        alpha = rgba[..., 3:4].astype(np.int16)
        return (rgba[..., :3].astype(np.int16) + 255 - alpha).clip(0, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


# --- tifffile ------------------------------------------------------------------------------------------


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head[:2] in (b"II", b"MM") and int.from_bytes(head[2:4], "little" if head[:2] == b"II" else "big") in (42, 43)


class _TiffImage(SlideImage):
    def __init__(self, path: Path):
        import tifffile

        self.path, self.kind = path, "tifffile"
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
            self._axes = series.axes
            shapes = [level.shape for level in series.levels]
            pages = [level.keyframe for level in series.levels]
        except (tifffile.TiffFileError, ValueError, IndexError, KeyError, OSError, struct.error) as err:
            raise InputError(f"{path}: not a readable TIFF image ({str(err).splitlines()[0][:120]})") from None
        axes = self._axes
        rows, cols = axes.find("Y"), axes.find("X")
        colour = axes.find("S") if "S" in axes else axes.find("C")
        if rows < 0 or cols < 0 or colour < 0 or shapes[0][colour] not in (3, 4) or len(axes) != 3:
            self.close()
            raise InputError(f"{path}: image axes {axes} shape {shapes[0]} are not an RGB image (Y, X, 3 samples)")
        for page in pages:
            _check_codec(path, page)
        _check_complete(path, self._tif)
        self._order = [rows, cols, colour]
        base = shapes[0][cols]
        self.levels = [Level(i, int(s[rows]), int(s[cols]), base / s[cols]) for i, s in enumerate(shapes)]
        self.pixel_size = _tiff_pixel_size(self._tif, pages[0])
        self._stores: dict[int, object] = {}

    def read_rows(self, level: Level, first: int, last: int) -> np.ndarray:
        import zarr

        if level.index not in self._stores:
            self._stores[level.index] = self._tif.series[0].aszarr(level=level.index)
        source = zarr.open(self._stores[level.index], mode="r")
        index = [slice(None)] * 3
        index[self._order[0]] = slice(first, last)
        return _as_rgb_uint8(self.path, np.transpose(np.asarray(source[tuple(index)]), self._order))

    def close(self) -> None:
        for store in getattr(self, "_stores", {}).values():
            store.close()
        self._tif.close()


def _check_codec(path: Path, page) -> None:
    """One line for a compression this installation cannot decode (before any slide is processed)."""
    from tifffile import TIFF

    if page.compression == 1:
        return
    try:
        TIFF.DECOMPRESSORS[page.compression]
    except KeyError as err:
        raise InputError(f"{path}: {page.compression.name} compression cannot be decoded here "
                         f"({str(err)[1:-1]})") from None


def _check_complete(path: Path, tif) -> None:
    """A file cut short (an interrupted copy) ends before its last tiles: say so before any reading."""
    size = path.stat().st_size
    for number, page in enumerate(tif.pages):
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if ends and max(ends) > size:
            raise InputError(f"{path}: truncated ({size} bytes; image {number} of the file needs {max(ends)}): "
                             "copy the file again")


def _tiff_pixel_size(tif, page) -> PixelSize | None:
    if tif.is_ome:
        found = _ome_pixel_size(tif.ome_metadata or "")
        if found:
            return found
    description = page.description or ""
    if description.startswith("Aperio"):
        match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
        if match:
            return _plausible(float(match.group(1)), "Aperio MPP")
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit.value) if unit is not None else 2)  # TIFF default: inch
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if per_unit is None or xres is None or yres is None:
        return None
    values = [r.value[0] / r.value[1] if r.value[1] else 0.0 for r in (xres, yres)]
    if min(values) <= 0:
        return None
    return _plausible(float(np.mean([per_unit / v for v in values])),
                      f"TIFF resolution tags ({'inch' if per_unit == 25400.0 else 'centimetre'})")


def _ome_pixel_size(xml: str) -> PixelSize | None:
    factors = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}
    sizes = []
    for axis in "XY":
        match = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', xml)
        unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', xml)
        if not match:
            return None
        sizes.append(float(match.group(1)) * factors.get(unit.group(1) if unit else "µm", float("nan")))
    return _plausible(float(np.mean(sizes)), "OME PhysicalSizeX/Y")


# --- Pillow --------------------------------------------------------------------------------------------


class _PillowImage(SlideImage):
    def __init__(self, path: Path):
        self.path, self.kind = path, "pillow"
        try:
            with Image.open(path) as probe:
                width, height = probe.size
                dpi = probe.info.get("dpi")
        except (OSError, Image.DecompressionBombError) as err:
            raise InputError(f"{path}: not a readable image ({str(err).splitlines()[0][:120]})") from None
        self.levels = [Level(0, height, width, 1.0)]
        self.pixel_size = _plausible(25400.0 / float(dpi[0]), "image dpi") if dpi and dpi[0] else None
        self._pixels: np.ndarray | None = None

    def read_rows(self, level: Level, first: int, last: int) -> np.ndarray:
        if self._pixels is None:
            Image.MAX_IMAGE_PIXELS = None  # a lab's own full-resolution image, not a download
            with Image.open(self.path) as image:
                self._pixels = np.asarray(image.convert("RGB"))
        return self._pixels[first:last]
