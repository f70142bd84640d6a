"""Predict cell-type abundances for every Test slide of a file in the project's layout (the
competition's file, or slides imported with ``python -m src.ingest``); the file needs no Train slides.

``python -m src.predict --model models/model.pt --h5 FILE --out submission.csv [--table preds.csv] [--h5ad preds.h5ad]``

The checkpoint holds everything needed (weights, preprocessing, the reference stain, TTA and σ). Each
Test slide is stain-normalized to that reference, cropped around its spots and predicted. ``--out``:
one row per test spot, ``ID`` (row of the concatenated test spot tables), ``slide``, ``x``, ``y``, then
one column per cell type. ``--table``: the same with the spots' barcodes and source coordinates when
the file was imported. ``--h5ad``: an AnnData file with the predictions in ``obsm["predicted_abundance"]``
(and as ``X``), the coordinates in ``obsm["spatial"]`` and each slide's hires and lowres image with its
scalefactors under ``uns["spatial"]``, as squidpy and scanpy draw them. ``--maps DIR``: one spatial map
per slide (``DIR/<slide>.png``: the most variable predicted cell types on the tissue, with colour bars).
Every value is an abundance on the training table's scale, comparable across spots and slides.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import InputError, exit_on_input_error
from src.core.files import write_csv
from src.data.preprocessing.patch_extraction import crop_test_slides
from src.data.preprocessing.patch_set import PatchSet
from src.data.preprocessing.stain import StainNormalizer
from src.data.slides.layout import open_h5, read_fullres, read_um_per_px, slide_refs
from src.data.slides.prediction_files import SlideSource, write_prediction_csv, write_prediction_h5ad
from src.data.spatial import SPOT_DIAMETER_UM
from src.engine.inference import predict_abundance
from src.model.checkpoint import load_checkpoint
from src.report.plots import spatial_map

RESOLUTION_TOLERANCE = 0.01  # relative: a slide at another resolution shows the tissue at another size


def check_resolution(h5_path: Path, model_um_per_px: float) -> None:
    """The slides must be at the resolution the model was trained at (their patches cover the same tissue)."""
    if not h5_path.is_file():
        return  # crop_test_slides says so
    with open_h5(h5_path) as h5:
        um_per_px = read_um_per_px(h5)
    if abs(um_per_px / model_um_per_px - 1) > RESOLUTION_TOLERANCE:
        raise InputError(f"{h5_path}: slides at {um_per_px:g} um/px, but the model was trained at "
                         f"{model_um_per_px:g} um/px: import them again with `python -m src.ingest ... "
                         f"--resolution {model_um_per_px:g}`")


def predict_file(model_path: Path, h5_path: Path, out: Path, table: Path | None = None,
                 h5ad: Path | None = None, maps: Path | None = None, log=print) -> pd.DataFrame:
    for extra, suffix in ((table, ".csv"), (h5ad, ".h5ad")):
        if extra is not None and extra.suffix != suffix:
            raise InputError(f"{extra}: expected a {suffix} file name")
    model, meta = load_checkpoint(model_path)
    check_resolution(h5_path, meta["um_per_px"])
    patch_set = crop_test_slides(h5_path, StainNormalizer.from_dict(meta["stain"]), meta["patch_size"],
                                 meta["targets"], log)
    pred = predict_abundance(model, meta, patch_set)
    names = meta["targets"]
    spots = patch_set.spots
    frame = spots[["slide", "x", "y"]].copy()
    frame.insert(0, "ID", np.arange(len(frame)))
    frame = pd.concat([frame, pd.DataFrame(pred, columns=names)], axis=1)
    if h5ad is not None:
        write_prediction_h5ad(h5ad, spots, pred, names, _slide_sources(h5_path, patch_set))
    if table is not None:
        write_prediction_csv(table, spots, pred, names)
    if maps is not None:
        maps.mkdir(parents=True, exist_ok=True)
        for slide, rows in spots.groupby("slide", sort=False).indices.items():
            spatial_map(maps / f"{slide}.png", spots[["x", "y"]].to_numpy()[rows], pred[rows], names, None, slide,
                        patch_set.slide_image(slide))
    write_csv(out, frame)
    return frame


def _slide_sources(h5_path: Path, patch_set: PatchSet) -> dict[str, SlideSource]:
    """Each test slide's image (as predicted) and how its pixels relate to the source's."""
    with open_h5(h5_path) as h5:
        um_per_px = read_um_per_px(h5)
        out = {}
        for ref in (r for r in slide_refs(h5) if r.split == "Test"):
            attrs = (read_fullres(h5, ref) or (None, {}))[1]
            out[ref.name] = SlideSource(image=patch_set.slide_image(ref.name), scale=float(attrs.get("scale", 1.0)),
                                        spot_diameter=SPOT_DIAMETER_UM / um_per_px, library_id=attrs.get("library_id", ""),
                                        scalefactors=attrs.get("scalefactors", {}))
    return out


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint written by stage train")
    parser.add_argument("--h5", type=Path, required=True, help="HDF5 file in the project's layout (Test slides)")
    parser.add_argument("--out", type=Path, required=True, help="submission CSV to write (ID, slide, x, y, cell types)")
    parser.add_argument("--table", type=Path, default=None, help="CSV with barcodes and cell-type names to write")
    parser.add_argument("--h5ad", type=Path, default=None, help="AnnData file to write (predictions in obsm)")
    parser.add_argument("--maps", type=Path, default=None, help="folder for one spatial map per slide (PNG)")
    args = parser.parse_args(argv)
    frame = predict_file(args.model, args.h5, args.out, args.table, args.h5ad, args.maps)
    written = ", ".join(str(p) for p in (args.out, args.table, args.h5ad, args.maps) if p is not None)
    print(f"wrote {written}: {len(frame)} spots x {frame.shape[1] - 4} cell types")


if __name__ == "__main__":
    main()
