"""The figures the competition's data is known by, for any set of slides' abundances.

Public notebooks printed these for the real training data (README "Embedded default"); the embedded
default is calibrated against them (``python -m src.bench data`` prints them, ``tests/test_synthetic.py``
asserts them).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from src.engine.metrics import competition_score


def floor(train: np.ndarray, held_out: np.ndarray) -> float:
    """Score of the training mean profile predicted for every held-out spot."""
    return competition_score(np.tile(train.mean(0), (len(held_out), 1)), held_out)


def abundance_statistics(train: dict[str, np.ndarray], test: np.ndarray | None = None,
                         test_expected: np.ndarray | None = None) -> dict:
    """``train``: slide -> N x T abundances; ``test``: the test slides' labels (and their noise-free
    expectation, for simulated data) when known."""
    observed = np.concatenate(list(train.values()))
    means = np.array([a.mean(0) for a in train.values()])
    slide_ratio = means.max(0) / means.min(0)
    ratio = observed.mean(0) / np.median(observed, 0)
    ranks = rankdata(observed, axis=1).std(axis=0)
    out = {
        "training_spots": len(observed),
        "min": float(observed.min()), "max": float(observed.max()),
        "decades": float(np.log10(observed.max() / observed.min())) if observed.min() > 0 else float("inf"),
        "zero_fraction": float((observed == 0).mean()),
        "cells_per_spot": float(observed.sum(axis=1).mean()),
        "mean_median_ratio": (float(ratio.min()), float(ratio.max())),
        "types_median_below_1e-3": int((np.median(observed, 0) < 1e-3).sum()),
        "per_slide_floors": {name: floor(np.concatenate([o for n, o in train.items() if n != name]), a)
                             for name, a in train.items()},
        "slide_ratio_max": float(slide_ratio.max()),
        "types_slide_ratio_over_10": int((slide_ratio >= 10).sum()),
        "n_types": observed.shape[1],
        "rank_sd": (float(ranks.min()), float(ranks.max())),
        "types_rank_sd_over_9": int((ranks >= 9).sum()),
        "types_rank_sd_under_5": int((ranks <= 5).sum()),
    }
    if test is not None:
        out["test_spots"] = len(test)
        out["test_floor"] = floor(observed, test)
        if test_expected is not None:
            out["test_ceiling"] = competition_score(test_expected, test)
    return out
