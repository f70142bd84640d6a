"""Visium slides into the project's layout: in-tissue spots joined with their abundances on barcode,
every slide resampled to one pixel size (the pipeline's resolution), barcodes and cell-type names kept.

A manifest (CSV, one row per slide; paths relative to the manifest's folder) names the slides:

    slide,split,spots,image,abundances,library_id,um_per_px
    A1,train,A1/outs,A1/A1.svs,deconvolution/A1.csv,,
    B1,test,B1.h5ad,B1/B1_fullres.tif,,,0.2738

``spots`` is a Space Ranger ``outs/`` folder or an ``.h5ad``; ``image`` the full-resolution H&E the
positions were measured on, in any format ``src.data.slides.wsi`` reads (scanner files, pyramidal TIFFs);
``abundances`` a CSV (barcodes x cell types) or an ``.h5ad`` whose ``obsm`` holds them (required for
training slides; for test slides it is the truth the evaluation scores against, optional);
``library_id`` picks one library of an ``.h5ad``; ``um_per_px`` (optional) the image's pixel size where
its file has none or a wrong one. Table rows are matched to spots on the barcode, tolerating a missing
``-1`` and a sample prefix or suffix (``src.data.slides.barcodes``); a few unmatched rows are dropped with a
note, a table mostly unmatched is refused.

The image's pixel size is the manifest's, else the file's own (``src.data.slides.wsi``), else the one Space
Ranger's ``spot_diameter_fullres`` implies (a 55 µm spot); where the scalefactors give one it must agree
within 10%, and the hires image divided by ``tissue_hires_scalef`` must give the image's size. All of
that is checked for every row before any image is resampled.

Written (besides ``images/`` and ``spots/`` as every stage reads them): ``barcodes/{split}/{slide}``
(one per spot row), ``fullres/{split}/{slide}`` (the spots' source coordinates, x and y) and the
attributes ``um_per_px`` (file: the pipeline's resolution), ``source``, ``source_um_per_px``, ``scale``,
``pitch`` (the spot lattice's, pipeline px), ``scalefactors`` and ``library_id`` (per slide, on
``fullres/{split}/{slide}``).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.core.files import atomic_path
from src.data.slides.barcodes import match_barcodes
from src.data.slides.layout import NON_TARGET_FIELDS, image_chunks
from src.data.slides.validation import validate_file
from src.data.slides.visium import SpotTable, read_abundances, read_h5ad_spots, read_spaceranger
from src.data.slides.wsi import PixelSize, level0_to_resampled, open_image, read_resampled, resampled_shape
from src.data.spatial import COMPETITION_UM_PER_PX

MANIFEST_COLUMNS = ("slide", "split", "spots", "image")
SLIDE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
RESERVED = NON_TARGET_FIELDS | {"slide", "spot", "barcode", "ID"}


@dataclass(frozen=True)
class SlideSource:
    slide: str
    split: str  # "Train" or "Test"
    spots: Path
    image: Path
    abundances: Path | None
    library_id: str = ""
    um_per_px: float | None = None  # the image's pixel size, where the manifest gives one


@dataclass
class SlidePlan:
    """What the first pass learns of a slide from its tables and its image's header: every check that
    needs no pixels has passed."""

    source: SlideSource
    spots: SpotTable
    keep: np.ndarray  # in-tissue spots kept (those with abundances, when a table is given)
    abundances: pd.DataFrame | None  # rows in the kept spots' order
    notes: list[str]
    image_kind: str
    width: int
    height: int
    pixel_size: PixelSize  # of the full-resolution image, and where it was read


@dataclass
class IngestedSlide:
    source: SlideSource
    shape: tuple[int, int, int]  # of the image written, at the pipeline's resolution
    x: np.ndarray  # pipeline pixels
    y: np.ndarray
    barcodes: np.ndarray
    fullres: np.ndarray  # N x 2 source coordinates
    abundances: pd.DataFrame | None  # rows in spot order
    spots: SpotTable
    scale: float
    pitch: float  # the spot lattice's pitch, pipeline pixels
    source_um_per_px: float
    report: str


def read_manifest(path: Path) -> list[SlideSource]:
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in MANIFEST_COLUMNS:
        if column not in table.columns:
            raise InputError(f"{path}: column '{column}' missing (expected {', '.join(MANIFEST_COLUMNS)}, "
                             "abundances, library_id, um_per_px)")
    if table.empty:
        raise InputError(f"{path}: no slides")
    base, sources, seen = path.parent, [], set()
    for i, row in table.iterrows():
        where = f"{path}: row {i + 1}"
        name, split = row["slide"].strip(), row["split"].strip().lower()
        if not SLIDE_NAME.match(name):
            raise InputError(f"{where}: slide name {name!r} (use letters, digits, '_', '.', '-')")
        if name in seen:
            raise InputError(f"{where}: slide {name} appears twice")
        seen.add(name)
        if split not in ("train", "test"):
            raise InputError(f"{where}: split {row['split']!r} (expected train or test)")
        abundances = row.get("abundances", "").strip()
        if split == "train" and not abundances:
            raise InputError(f"{where}: training slide {name} has no abundances")
        for column in ("spots", "image"):
            if not row[column].strip():
                raise InputError(f"{where}: slide {name} has no {column}")
        paths = {"spots": base / row["spots"].strip(), "image": base / row["image"].strip()}
        if abundances:
            paths["abundances"] = base / abundances
        for column, file in paths.items():
            if not file.exists():
                raise InputError(f"{where}: {column} of slide {name} not found: {file}")
        sources.append(SlideSource(name, split.capitalize(), paths["spots"], paths["image"], paths.get("abundances"),
                                   row.get("library_id", "").strip(),
                                   _pixel_size(where, name, row.get("um_per_px", "").strip())))
    return sources


def _pixel_size(where: str, name: str, text: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{where}: um_per_px of slide {name} is {text!r} (expected a positive number)")
    return value


def plan_slide(source: SlideSource, resolution: float, um_per_px: float | None = None,
               obsm_key: str = "") -> SlidePlan:
    """Read a slide's tables and its image's header and check everything that needs no pixels."""
    spots = read_h5ad_spots(source.spots, source.library_id) if source.spots.suffix == ".h5ad" \
        else read_spaceranger(source.spots)
    keep = np.ones(len(spots.barcodes), bool)
    abundances, notes = None, []
    if source.abundances is not None:
        table = read_abundances(source.abundances, obsm_key)
        table, note = _joined(table, spots, source.abundances)
        notes.append(note)
        keep = pd.Index(spots.barcodes).isin(table.index)
        if not keep.any():
            raise InputError(f"{source.abundances}: no barcode matches an in-tissue spot of {spots.source}")
        abundances = table.loc[spots.barcodes[keep]]
        for name in abundances.columns:
            if name in RESERVED:
                raise InputError(f"{source.abundances}: cell type named '{name}' collides with a column the layout uses")
    with open_image(source.image) as image:
        kind, width, height, from_file = image.kind, image.width, image.height, image.pixel_size
    _check_size(source, spots, width, height)
    x, y = spots.x[keep], spots.y[keep]
    outside = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    if outside.any():
        i = int(np.argmax(outside))
        raise InputError(f"{source.image}: {int(outside.sum())} of {len(x)} spots lie outside the image "
                         f"({width} x {height} px; spot {spots.barcodes[keep][i]} at x={x[i]:.0f}, y={y[i]:.0f}): "
                         "is it the full-resolution image of this slide?")
    given = source.um_per_px or um_per_px
    pixel_size = resolve_pixel_size(source.image, from_file, given, "the manifest's um_per_px"
                                    if source.um_per_px else "--um-per-px", spots)
    if from_file is not None and given is not None and abs(given / from_file.um_per_px - 1) > PIXEL_SIZE_TOLERANCE:
        notes.append(f"pixel size {given:g} um/px as given, not the file's {from_file.um_per_px:g} ({from_file.source})")
    if pixel_size.um_per_px > resolution * 1.01:
        raise InputError(f"{source.image}: {pixel_size.um_per_px:g} um/px ({pixel_size.source}) is coarser than the "
                         f"pipeline's {resolution:g} um/px: use a finer scan, or ingest with --resolution "
                         f"{pixel_size.um_per_px:g} or coarser")
    return SlidePlan(source, spots, keep, abundances, notes, kind, width, height, pixel_size)


PIXEL_SIZE_TOLERANCE = 0.10  # metadata and Space Ranger's scalefactors may differ this much (relative)
SIZE_TOLERANCE = 0.02  # the image's size against the hires image's size / tissue_hires_scalef (rounding)


def resolve_pixel_size(image: Path, from_file: PixelSize | None, given: float | None, given_by: str,
                       spots: SpotTable) -> PixelSize:
    """The full-resolution pixel size: a value given by the user, else the file's own, else the one
    Space Ranger's spot diameter implies; checked against that one within ``PIXEL_SIZE_TOLERANCE``."""
    from_spots = spots.um_per_px
    if given is not None:
        chosen = PixelSize(given, given_by)
    elif from_file is not None:
        chosen = from_file
    elif from_spots is not None:
        return PixelSize(from_spots, f"spot_diameter_fullres {spots.spot_diameter_fullres:g} px = 55 um")
    else:
        raise InputError(f"{image}: no pixel size: the file gives none and the scalefactors of {spots.source} have no "
                         "spot_diameter_fullres; give um_per_px in the manifest (or --um-per-px)")
    if from_spots is not None and abs(chosen.um_per_px / from_spots - 1) > PIXEL_SIZE_TOLERANCE:
        raise InputError(f"{image}: pixel size {chosen.um_per_px:g} um/px ({chosen.source}) and Space Ranger's "
                         f"{from_spots:g} um/px (spot_diameter_fullres {spots.spot_diameter_fullres:g} px in "
                         f"{spots.source}) differ by more than {PIXEL_SIZE_TOLERANCE:.0%}: is this the image the "
                         "spots were placed on?")
    return chosen


def _check_size(source: SlideSource, spots: SpotTable, width: int, height: int) -> None:
    """The image must be the one the positions were measured on: Space Ranger's hires image, divided by
    its scale factor, gives that image's size."""
    expected = spots.fullres_size_from_hires
    if expected is None:
        return
    if any(abs(got / want - 1) > SIZE_TOLERANCE for got, want in zip((width, height), expected)):
        raise InputError(f"{source.image}: {width} x {height} px, but the hires image that comes with "
                         f"{spots.source.name} ({spots.hires_size[0]} x {spots.hires_size[1]} px at tissue_hires_scalef "
                         f"{spots.scalefactors['tissue_hires_scalef']:g}) implies {expected[0]:.0f} x "
                         f"{expected[1]:.0f} px: is it the full-resolution image Space Ranger was run on?")


def ingest_slide(plan: SlidePlan, resolution: float, h5: h5py.File) -> IngestedSlide:
    """Resample one planned slide's image to ``resolution`` µm/px, band by band into ``h5``'s
    ``images/``; its spots and their coordinates are returned (written by ``_write_spots``)."""
    started = time.perf_counter()
    source, spots, keep = plan.source, plan.spots, plan.keep
    with open_image(source.image) as handle:
        scale = plan.pixel_size.um_per_px / resolution
        shape = resampled_shape(handle, scale)
        target = h5.create_dataset(f"images/{source.split}/{source.slide}", shape=shape, dtype=np.uint8,
                                   chunks=image_chunks(shape), compression="lzf")
        _, level = read_resampled(handle, scale, out=target)
        n_levels = len(handle.levels)
    scale = (shape[1] / plan.width + shape[0] / plan.height) / 2
    x, y = spots.x[keep], spots.y[keep]
    out_x, out_y = level0_to_resampled(x, y, (plan.height, plan.width), shape)
    in_tissue, kept = len(spots.barcodes), int(keep.sum())
    dropped = in_tissue - kept
    pitch = spots.pitch * scale
    report = (f"{source.split}/{source.slide}: {spots.n_listed} spots listed, {in_tissue} in tissue, {kept} kept"
              + (f" ({dropped} without abundances dropped)" if dropped else "")
              + "".join(f"; {n}" for n in plan.notes)
              + f"; {plan.image_kind}, {plan.pixel_size.um_per_px:.4g} um/px ({plan.pixel_size.source}) -> "
              f"{resolution:.4g} um/px (level {level.index} of {n_levels}, {plan.width} x {plan.height} -> "
              f"{shape[1]} x {shape[0]} px); spot pitch {pitch:.1f} px "
              f"({pitch * resolution:.0f} um) in {time.perf_counter() - started:.1f} s")
    return IngestedSlide(source, shape, out_x, out_y, spots.barcodes[keep], np.column_stack([x, y]),
                         plan.abundances, spots, scale, pitch, plan.pixel_size.um_per_px, report)


MOST = 0.5  # a table most of whose barcodes match no spot is the wrong table


def _joined(table: pd.DataFrame, spots: SpotTable, path: Path) -> tuple[pd.DataFrame, str]:
    """The table's rows that name a spot of the slide, indexed by the slide's barcodes, and a note: the
    matching rule (``src.data.slides.barcodes``) and how many rows were dropped. Mostly unmatched: one line."""
    found = match_barcodes(list(table.index), list(spots.all_barcodes))
    if found.matched < MOST * len(table):
        example = table.index[np.argmax(found.spot < 0)]
        raise InputError(f"{path}: {len(table) - found.matched} of {len(table)} barcodes match no spot of "
                         f"{spots.source} (e.g. table {example!r}, slide {spots.all_barcodes[0]!r}): is it this "
                         "slide's table?")
    rows = found.spot >= 0
    joined = table[rows].set_axis(pd.Index(spots.all_barcodes[found.spot[rows]]), axis=0)
    note = f"barcodes matched {found.rule}"
    if not rows.all():
        note += (f", {int((~rows).sum())} of {len(table)} table rows match no spot and were dropped "
                 f"(first: {table.index[np.argmax(~rows)]})")
    return joined, note


def ingest(manifest: Path, out: Path, truth_out: Path | None = None, resolution: float = COMPETITION_UM_PER_PX,
           um_per_px: float | None = None, obsm_key: str = "", log=print) -> list[IngestedSlide]:
    """Every slide of the manifest into one layout file (and the test slides' abundances, when given,
    into a truth file). Every slide's tables and image header are read and checked before any image is
    resampled; the files appear only once every slide has been read."""
    for value, flag in ((resolution, "--resolution"), (um_per_px, "--um-per-px")):
        if value is not None and (not np.isfinite(value) or value <= 0):
            raise InputError(f"{flag} {value}: expected a positive number")
    sources = read_manifest(manifest)
    if not any(s.split == "Train" for s in sources):
        log(f"{manifest}: no training slides (a file to predict)")
    plans, cell_types = [], None
    for source in sources:
        plan = plan_slide(source, resolution, um_per_px, obsm_key)
        if plan.abundances is not None:
            names = list(plan.abundances.columns)
            if cell_types is None:
                cell_types, first = names, source
            elif set(names) != set(cell_types):
                extra = sorted(set(names) ^ set(cell_types))[0]
                raise InputError(f"{source.abundances}: cell types differ from those of slide {first.slide} "
                                 f"({first.abundances}): '{extra}' is in one table only")
            plan.abundances = plan.abundances[cell_types]
        plans.append(plan)
    if truth_out is not None and not any(p.source.split == "Test" and p.abundances is not None for p in plans):
        raise InputError(f"--truth-out {truth_out}: no test slide has abundances")
    slides = []
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["um_per_px"] = resolution
            for plan in plans:
                slide = ingest_slide(plan, resolution, h5)
                _write_spots(h5, slide)
                log(slide.report)
                slides.append(slide)
        validate_file(tmp, need_train=False)  # what every stage will check, before the file appears
    truths = [s for s in slides if s.source.split == "Test" and s.abundances is not None]
    if truth_out is not None:
        with atomic_path(truth_out) as tmp:
            with h5py.File(tmp, "w") as h5:
                for s in truths:
                    h5[f"Test/{s.source.slide}/observed"] = s.abundances.to_numpy(np.float64)
                h5.attrs["target_names"] = cell_types
    return slides


def _write_spots(h5: h5py.File, s: IngestedSlide) -> None:
    key = f"{s.source.split}/{s.source.slide}"
    fields = [("x", "<f8"), ("y", "<f8")]
    names = list(s.abundances.columns) if s.source.split == "Train" else []
    table = np.zeros(len(s.x), dtype=fields + [(n, "<f8") for n in names])
    table["x"], table["y"] = s.x, s.y
    for n in names:
        table[n] = s.abundances[n].to_numpy()
    h5[f"spots/{key}"] = table
    h5.create_dataset(f"barcodes/{key}", data=s.barcodes.astype(object), dtype=h5py.string_dtype())
    fullres = h5.create_dataset(f"fullres/{key}", data=s.fullres)
    fullres.attrs.update(source=str(s.spots.source), source_um_per_px=s.source_um_per_px, scale=s.scale,
                         pitch=s.pitch, scalefactors=json.dumps(s.spots.scalefactors), library_id=s.source.library_id)
