"""The competition score, the map score, and their reference points.

Competition score: for each spot, the Spearman correlation between its predicted and true abundances
across cell types; averaged over spots (as every public solution computes it). A spot whose
prediction or truth is constant has no defined correlation and counts as 0 (it ranks nothing). It
only asks for the order of the cell types within each spot.

Map score: for each cell type, the Spearman correlation across the spots of a slide (what a map of
that type shows; HEST-Benchmark scores genes the same way), averaged over slides and then over cell
types. A type whose truth is constant on a slide has nothing to map there and is left out; a
prediction constant on a slide counts as 0. It asks for values that compare across spots, which
within-spot ranks are not.

Floors: the competition score of the training mean profile (what ignores the image), and the map
score of the spots' positions alone (the mean log abundance of the nearest training spots by
relative position, the coordinates every model also sees): the mean profile is constant across
spots and maps nothing.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata
from sklearn.neighbors import KNeighborsRegressor

from src.model.targets import ABUNDANCE_FLOOR


def spot_spearman(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman across cell types, one value per spot (N x T inputs -> N)."""
    a = rankdata(pred, axis=1)
    b = rankdata(true, axis=1)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (a * b).sum(axis=1) / denom
    return np.where(denom > 0, corr, 0.0)


def competition_score(pred: np.ndarray, true: np.ndarray) -> float:
    return float(spot_spearman(pred, true).mean())


def map_per_type(pred: np.ndarray, true: np.ndarray, slides: np.ndarray) -> np.ndarray:
    """Per cell type, the Spearman across the spots of each slide, averaged over slides (T values;
    nan where the truth is constant on every slide)."""
    slides = np.asarray(slides)
    per_slide = []
    for slide in dict.fromkeys(slides):
        rows = slides == slide
        scores = spot_spearman(pred[rows].T, true[rows].T)  # columns as "spots": across spots, per type
        per_slide.append(np.where(np.ptp(true[rows], axis=0) > 0, scores, np.nan))
    with warnings.catch_warnings():  # a type constant on every slide: nan, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(np.array(per_slide), axis=0)


def map_score(pred: np.ndarray, true: np.ndarray, slides: np.ndarray) -> float:
    """The map score: ``map_per_type`` averaged over the cell types that vary somewhere."""
    return types_mean(map_per_type(pred, true, slides))


def types_mean(per_type: np.ndarray) -> float:
    """The mean of per-type scores over the cell types that have one (nan when none has)."""
    return float(np.nanmean(per_type)) if np.isfinite(per_type).any() else float("nan")


POSITION_NEIGHBOURS = 50


def position_floor(train_coords: np.ndarray, train_abundance: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """What the spots' positions alone predict: the mean log abundance of the ``POSITION_NEIGHBOURS``
    training spots nearest in relative position (x / W, y / H) (N x T, log scale)."""
    k = min(POSITION_NEIGHBOURS, len(train_coords))
    model = KNeighborsRegressor(n_neighbors=k).fit(train_coords, np.log(train_abundance + ABUNDANCE_FLOOR))
    return model.predict(coords)


def floor_score(train_abundance: np.ndarray, true: np.ndarray) -> float:
    """Score of predicting the training mean profile for every spot (the floor to beat)."""
    profile = np.tile(train_abundance.mean(axis=0), (len(true), 1))
    return competition_score(profile, true)


def skill(score: float, floor: float, ceiling: float) -> float:
    """(score - floor) / (ceiling - floor): 0 at the floor, 1 at the noise ceiling."""
    return float((score - floor) / (ceiling - floor)) if ceiling > floor else float("nan")
