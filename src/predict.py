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

from src.core.errors import exit_on_input_error
from src.core.files import write_csv
from src.data.patch_extraction import crop_test_slides
from src.data.stain import StainNormalizer
from src.engine.inference import predict_abundance
from src.model.checkpoint import load_checkpoint


def predict_file(model_path: Path, h5_path: Path, out: Path, log=print) -> pd.DataFrame:
    model, meta = load_checkpoint(model_path)
    patch_set = crop_test_slides(h5_path, StainNormalizer.from_dict(meta["stain"]), meta["patch_size"],
                                 meta["targets"], log)
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
