"""The truth file: every test spot's observed abundances (the labels the pipeline never trains on) and,
for simulated data, their noise-free expectation. Written by ``src.data.simulators.compartments.write_layout`` and,
for imported slides whose test abundances are known, by ``python -m src.ingest --truth-out``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.data.slides.layout import open_h5, slide_refs


def read_truth(path: Path, spots: pd.DataFrame, targets: list[str], split: str = "Test"
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """(observed, noise-free expected) abundance of each row of ``spots`` from a truth file, which
    must describe the same slides, spot counts and cell types as the data. ``expected`` is None when
    the file has none (real labels)."""
    if not path.is_file():
        raise InputError(f"{path}: truth file not found (set data.truth to \"\" for data without one)")
    observed = np.zeros((len(spots), len(targets)))
    expected = np.zeros_like(observed)
    has_expected = True
    with open_h5(path) as truth:
        for slide in spots["slide"].unique():
            key = f"{split}/{slide}"
            if f"{key}/observed" not in truth:
                raise InputError(f"{path}: no truth for slide {key} (is data.truth the truth of data.h5?)")
            rows = (spots["slide"] == slide).to_numpy()
            slide_observed = truth[f"{key}/observed"][()]
            has_expected = has_expected and f"{key}/expected" in truth
            slide_expected = truth[f"{key}/expected"][()] if has_expected else slide_observed
            if slide_observed.shape[0] != rows.sum() or slide_expected.shape[0] != rows.sum():
                raise InputError(f"{path}: slide {key} has {slide_observed.shape[0]} spots in the truth file but "
                                 f"{rows.sum()} in the data (is data.truth the truth of data.h5?)")
            if slide_observed.ndim != 2 or slide_observed.shape[1] != len(targets):
                n = slide_observed.shape[1] if slide_observed.ndim == 2 else 0
                raise InputError(f"{path}: slide {key} has {n} cell types in the truth file but "
                                 f"{len(targets)} in the data")
            index = spots["spot"].to_numpy()[rows]
            observed[rows], expected[rows] = slide_observed[index], slide_expected[index]
    return observed, (expected if has_expected else None)


def check_truth_file(path: Path, h5_path: Path) -> None:
    """``data.truth`` must exist and describe the Test slides of ``data.h5`` (names, spot counts)."""
    if not path.is_file():
        raise InputError(f"params: data.truth = {str(path)!r}: file not found (set data.truth to \"\" for data "
                         "without one, such as the competition's file)")
    with open_h5(h5_path) as h5, open_h5(path) as truth:
        for ref in (r for r in slide_refs(h5, "spots") if r.split == "Test"):
            key = f"Test/{ref.name}/observed"
            if key not in truth:
                raise InputError(f"params: data.truth = {str(path)!r}: no truth for slide Test/{ref.name} of "
                                 f"{h5_path} (is it the truth of data.h5? set data.truth to \"\" for none)")
            if truth[key].shape[0] != h5[ref.spots_key].shape[0]:
                raise InputError(f"params: data.truth = {str(path)!r}: slide Test/{ref.name} has {truth[key].shape[0]} "
                                 f"spots in the truth file but {h5[ref.spots_key].shape[0]} in {h5_path}")
