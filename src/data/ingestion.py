"""Visium slides into the project's layout: in-tissue spots joined with their abundances on barcode,
every slide resampled to one pixel size, barcodes and cell-type names kept.

A manifest (CSV, one row per slide; paths relative to the manifest's folder) names the slides:

    slide,split,spots,image,abundances,library_id
    A1,train,A1/outs,A1/A1_fullres.tif,deconvolution/A1.csv,
    B1,test,B1.h5ad,B1/B1_fullres.tif,,

``spots`` is a Space Ranger ``outs/`` folder or an ``.h5ad``; ``abundances`` a CSV (barcodes x cell
types) or an ``.h5ad`` whose ``obsm`` holds them (required for training slides; for test slides it is
the truth the evaluation scores against, optional); ``library_id`` picks one library of an ``.h5ad``.
Table rows are matched to spots on the barcode, tolerating a missing ``-1`` and a sample prefix or
suffix (``src.data.barcodes``); a few unmatched rows are dropped with a note, a table mostly unmatched
is refused.

Written (besides ``images/`` and ``spots/`` as every stage reads them): ``barcodes/{split}/{slide}``
(one per spot row), ``fullres/{split}/{slide}`` (the spots' source coordinates, x and y) and the
attributes ``um_per_px`` (file), ``source``, ``source_um_per_px``, ``scale``, ``scalefactors`` and
``library_id`` (per slide, on ``fullres/{split}/{slide}``).
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
from src.data.barcodes import match_barcodes
from src.data.fullres_image import open_levels, read_resampled
from src.data.slides import NON_TARGET_FIELDS, image_chunks
from src.data.validation import validate_file
from src.data.visium import SpotTable, read_abundances, read_h5ad_spots, read_spaceranger

VISIUM_SPOT_UM = 55.0  # a Visium spot's diameter
COMPETITION_UM_PER_PX = VISIUM_SPOT_UM / 26.0  # the competition's spots: 26 px across for a 55 µm Visium spot
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


@dataclass
class IngestedSlide:
    source: SlideSource
    image: np.ndarray
    x: np.ndarray  # pipeline pixels
    y: np.ndarray
    barcodes: np.ndarray
    fullres: np.ndarray  # N x 2 source coordinates
    abundances: pd.DataFrame | None  # rows in spot order
    spots: SpotTable
    scale: float
    report: str


def read_manifest(path: Path) -> list[SlideSource]:
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in MANIFEST_COLUMNS:
        if column not in table.columns:
            raise InputError(f"{path}: column '{column}' missing (expected {', '.join(MANIFEST_COLUMNS)}, "
                             "abundances, library_id)")
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
        sources.append(SlideSource(name, split.capitalize(), base / row["spots"].strip(), base / row["image"].strip(),
                                   base / abundances if abundances else None, row.get("library_id", "").strip()))
    if not any(s.split == "Train" for s in sources) and not any(s.split == "Test" for s in sources):
        raise InputError(f"{path}: no slides")
    return sources


def ingest_slide(source: SlideSource, um_per_px: float, obsm_key: str = "", log=print) -> IngestedSlide:
    """Read, join, check and resample one slide (nothing is written)."""
    started = time.perf_counter()
    spots = read_h5ad_spots(source.spots, source.library_id) if source.spots.suffix == ".h5ad" \
        else read_spaceranger(source.spots)
    in_tissue = len(spots.barcodes)
    keep = np.ones(in_tissue, bool)
    abundances = None
    notes = []
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
    levels, _ = open_levels(source.image)
    width, height = levels[0].width, levels[0].height
    x, y = spots.x[keep], spots.y[keep]
    outside = (x < 0) | (x >= width) | (y < 0) | (y >= height)
    if outside.any():
        i = int(np.argmax(outside))
        raise InputError(f"{source.image}: {int(outside.sum())} of {len(x)} spots lie outside the image "
                         f"({width} x {height} px; spot {spots.barcodes[keep][i]} at x={x[i]:.0f}, y={y[i]:.0f}): "
                         "is it the full-resolution image of this slide?")
    image, level, _ = read_resampled(source.image, spots.um_per_px / um_per_px, log=lambda _: None)
    scale_x, scale_y = image.shape[1] / width, image.shape[0] / height  # exact for the rounded size
    scale = (scale_x + scale_y) / 2
    out_x = np.clip((x + 0.5) * scale_x - 0.5, 0, image.shape[1] - 1)
    out_y = np.clip((y + 0.5) * scale_y - 0.5, 0, image.shape[0] - 1)
    dropped = in_tissue - int(keep.sum())
    report = (f"{source.split}/{source.slide}: {spots.n_listed} spots listed, {in_tissue} in tissue, "
              f"{int(keep.sum())} kept" + (f" ({dropped} without abundances dropped)" if dropped else "")
              + "".join(f"; {n}" for n in notes)
              + f"; {spots.um_per_px:.3f} -> {um_per_px:.3f} um/px (level {level.index} of {len(levels)}, "
              f"{width} x {height} -> {image.shape[1]} x {image.shape[0]} px) in {time.perf_counter() - started:.1f} s")
    return IngestedSlide(source, image, out_x, out_y, spots.barcodes[keep], np.column_stack([x, y]),
                         abundances, spots, scale, report)


MOST = 0.5  # a table most of whose barcodes match no spot is the wrong table


def _joined(table: pd.DataFrame, spots: SpotTable, path: Path) -> tuple[pd.DataFrame, str]:
    """The table's rows that name a spot of the slide, indexed by the slide's barcodes, and a note: the
    matching rule (``src.data.barcodes``) and how many rows were dropped. Mostly unmatched: one line."""
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


def ingest(manifest: Path, out: Path, truth_out: Path | None = None, um_per_px: float = COMPETITION_UM_PER_PX,
           obsm_key: str = "", log=print) -> list[IngestedSlide]:
    """Every slide of the manifest into one layout file (and the test slides' abundances, when given,
    into a truth file); both appear only once every slide has been read and checked."""
    if not np.isfinite(um_per_px) or um_per_px <= 0:
        raise InputError(f"--um-per-px {um_per_px}: expected a positive number")
    sources = read_manifest(manifest)
    if not any(s.split == "Train" for s in sources):
        log(f"{manifest}: no training slides (a file to predict)")
    slides, cell_types = [], None
    for source in sources:
        slide = ingest_slide(source, um_per_px, obsm_key, log)
        if slide.abundances is not None:
            names = list(slide.abundances.columns)
            if cell_types is None:
                cell_types, first = names, source
            elif set(names) != set(cell_types):
                extra = sorted(set(names) ^ set(cell_types))[0]
                raise InputError(f"{source.abundances}: cell types differ from those of slide {first.slide} "
                                 f"({first.abundances}): '{extra}' is in one table only")
            slide.abundances = slide.abundances[cell_types]
        log(slide.report)
        slides.append(slide)
    truths = [s for s in slides if s.source.split == "Test" and s.abundances is not None]
    if truth_out is not None and not truths:
        raise InputError(f"--truth-out {truth_out}: no test slide has abundances")
    with atomic_path(out) as tmp:
        _write_layout(tmp, slides, um_per_px)
        validate_file(tmp, need_train=False)  # what every stage will check, before the file appears
    if truth_out is not None:
        with atomic_path(truth_out) as tmp:
            with h5py.File(tmp, "w") as h5:
                for s in truths:
                    h5[f"Test/{s.source.slide}/observed"] = s.abundances.to_numpy(np.float64)
                h5.attrs["target_names"] = cell_types
    return slides


def _write_layout(path: Path, slides: list[IngestedSlide], um_per_px: float) -> None:
    with h5py.File(path, "w") as h5:
        h5.attrs["um_per_px"] = um_per_px
        for s in slides:
            key = f"{s.source.split}/{s.source.slide}"
            h5.create_dataset(f"images/{key}", data=s.image, chunks=image_chunks(s.image.shape), compression="lzf")
            fields = [("x", "<f8"), ("y", "<f8")]
            names = list(s.abundances.columns) if s.source.split == "Train" else []
            table = np.zeros(len(s.x), dtype=fields + [(n, "<f8") for n in names])
            table["x"], table["y"] = s.x, s.y
            for n in names:
                table[n] = s.abundances[n].to_numpy()
            h5[f"spots/{key}"] = table
            h5.create_dataset(f"barcodes/{key}", data=s.barcodes.astype(object), dtype=h5py.string_dtype())
            fullres = h5.create_dataset(f"fullres/{key}", data=s.fullres)
            fullres.attrs.update(source=str(s.spots.source), source_um_per_px=s.spots.um_per_px, scale=s.scale,
                                 scalefactors=json.dumps(s.spots.scalefactors), library_id=s.source.library_id)
