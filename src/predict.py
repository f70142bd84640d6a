"""Predict cell-type abundances for every Test slide of a user's own file in the competition layout.

``python -m src.predict --model models/model.pt --h5 FILE --out preds.csv``: the file is validated,
each Test slide is stain-normalized to the reference stored in the checkpoint, cropped around its
spots and predicted with the checkpoint's TTA and smoothing. The output has one row per test spot:
``ID`` (row of the concatenated test spot tables), ``slide``, ``x``, ``y``, then one column per cell type.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from src.checkpoint import load_checkpoint
from src.io_utils import write_csv
from src.data import PatchSet
from src.errors import InputError, exit_on_input_error
from src.inference import predict_abundance
from src.patch_store import SlideCrops
from src.slides import open_h5, read_image_uint8, read_spots, slide_refs
from src.stain import StainNormalizer
from src.validate import validate_file


def test_patch_set(h5_path: Path, meta: dict, log=print) -> PatchSet:
    """Normalize and crop every Test slide of ``h5_path`` as the checkpoint's training data was."""
    validate_file(h5_path)
    normalizer = StainNormalizer.from_dict(meta["stain"])
    slides, tables, sizes = [], [], {}
    with open_h5(h5_path) as h5:
        refs = [r for r in slide_refs(h5) if r.split == "Test"]
        if not refs:
            raise InputError(f"{h5_path}: no Test slides under images/Test to predict")
        for ref in refs:
            image = normalizer.transform(read_image_uint8(h5, ref))
            spots = read_spots(h5, ref)
            slides.append((image, spots["x"].to_numpy(), spots["y"].to_numpy(), (0, 0)))
            tables.append(pd.DataFrame({"slide": ref.name, "spot": np.arange(len(spots)),
                                        "x": spots["x"], "y": spots["y"]}))
            sizes[ref.name] = image.shape[:2]
            log(f"normalized {len(spots)} spots of Test/{ref.name}")
    return PatchSet(SlideCrops.from_slides(slides, meta["patch_size"]), pd.concat(tables, ignore_index=True),
                    list(meta["targets"]), sizes, meta["patch_size"])


def predict_file(model_path: Path, h5_path: Path, out: Path, log=print) -> pd.DataFrame:
    model, meta = load_checkpoint(model_path)
    patch_set = test_patch_set(h5_path, meta, log)
    pred = predict_abundance(model, meta, patch_set)
    table = patch_set.spots[["slide", "x", "y"]].copy()
    table.insert(0, "ID", np.arange(len(table)))
    frame = pd.concat([table, pd.DataFrame(pred, columns=meta["targets"])], axis=1)
    write_csv(out, frame)
    return frame


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.predict", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint written by stage train")
    parser.add_argument("--h5", type=Path, required=True, help="HDF5 file in the competition layout")
    parser.add_argument("--out", type=Path, required=True, help="CSV to write")
    args = parser.parse_args(argv)
    frame = predict_file(args.model, args.h5, args.out)
    print(f"wrote {args.out}: {len(frame)} spots x {frame.shape[1] - 4} cell types")


if __name__ == "__main__":
    main()
