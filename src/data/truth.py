"""The truth file of simulated data: every spot's observed abundances (the Test slides' hidden
labels) and their noise-free expectation, written by ``src.data.simulation.write_layout``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.data.slides import open_h5


def read_truth(path: Path, spots: pd.DataFrame, targets: list[str], split: str = "Test"
               ) -> tuple[np.ndarray, np.ndarray]:
    """(observed, noise-free expected) abundance of each row of ``spots`` from a truth file, which
    must describe the same slides, spot counts and cell types as the data."""
    if not path.is_file():
        raise InputError(f"{path}: truth file not found (set data.truth to \"\" for data without one)")
    observed = np.zeros((len(spots), len(targets)))
    expected = np.zeros_like(observed)
    with open_h5(path) as truth:
        for slide in spots["slide"].unique():
            key = f"{split}/{slide}"
            if f"{key}/observed" not in truth or f"{key}/expected" not in truth:
                raise InputError(f"{path}: no truth for slide {key} (is data.truth the truth of data.h5?)")
            rows = (spots["slide"] == slide).to_numpy()
            slide_observed, slide_expected = truth[f"{key}/observed"][()], truth[f"{key}/expected"][()]
            if slide_observed.shape[0] != rows.sum() or slide_expected.shape[0] != rows.sum():
                raise InputError(f"{path}: slide {key} has {slide_observed.shape[0]} spots in the truth file but "
                                 f"{rows.sum()} in the data (is data.truth the truth of data.h5?)")
            if slide_observed.ndim != 2 or slide_observed.shape[1] != len(targets):
                n = slide_observed.shape[1] if slide_observed.ndim == 2 else 0
                raise InputError(f"{path}: slide {key} has {n} cell types in the truth file but "
                                 f"{len(targets)} in the data")
            index = spots["spot"].to_numpy()[rows]
            observed[rows], expected[rows] = slide_observed[index], slide_expected[index]
    return observed, expected
