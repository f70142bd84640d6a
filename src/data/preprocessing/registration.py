"""Spot misregistration, estimated from the data: a per-slide (dx, dy) that puts the spots back on
the tissue they were measured on.

The competition's training spots are shifted from the tissue by 15-90 px per axis; public solutions
found the corrections by hand. Here, for every candidate shift, cheap local image features (optical
density at three scales, tissue fraction, nuclei and texture) are read at the shifted spot positions
and a ridge regression from them to the spots' abundances is cross-validated over spatial blocks.
The shift whose features explain the abundances best is kept when it clearly beats no shift.

Assumptions: one rigid translation per slide (no rotation or scaling), within ``max_shift`` px per
axis; the abundances depend on the tissue's look at the spot's scale (true of cell-type abundance:
tumour, stroma, immune aggregates, fat and background look different); a slide has a few hundred
spots or more, over tissue that is not uniform. A slide with no such signal keeps (0, 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import ndtri
from scipy.stats import rankdata

from src.data.preprocessing.stain import optical_density
from src.data.spatial import SPOT_RADIUS, balanced_blocks

DOWNSAMPLE = 2  # features are read off a half-resolution image (they are smoothed at >= 6 px anyway)
SCALES_PX = (6.0, 13.0, 26.0)  # Gaussian sigmas: nuclei, spot, neighbourhood
TISSUE_OD = 0.15  # summed optical density above which a pixel is tissue
FAT_CELL_RADIUS = 16.0  # px
NUCLEUS_OD = 0.9  # ... and above which it is (mostly) haematoxylin-dense nucleus
N_FOLDS = 5
MIN_SPOTS = 50  # fewer spots than this: no estimate (the slide keeps (0, 0))
RIDGE = 1.0  # ridge penalty on standardized features, per spot
COARSE_STEP, FINE_STEP = 8, 2  # px: a grid over the whole range, then around its best point
MIN_GAIN = 0.01  # cross-validated R^2 a shift must add over (0, 0) ...
MIN_FOLDS_BETTER = 4  # ... be better in this many of the N_FOLDS spatial folds ...
N_COMPONENTS = 8  # principal components of the abundances that are regressed
N_NULL = 49  # ... and beat the best fit the search finds for this many permutations of the labels


@dataclass(frozen=True)
class Registration:
    offset: tuple[int, int]  # [dx, dy] added to the spots' x, y
    source: str  # "estimated", "set" (params), "none" (test slide or registration off) or why not estimated
    r2: float | None = None  # cross-validated R^2 of image features -> abundances at the offset
    r2_unshifted: float | None = None  # ... and at (0, 0)
    candidate: tuple[int, int] | None = None  # the best shift found, kept or not
    null_r2: float | None = None  # the best R^2 any shift gave permuted labels (chance level)

    @property
    def gain(self) -> float | None:
        return None if self.r2 is None else self.r2 - self.r2_unshifted


def _small_optical_density(rgb: np.ndarray) -> np.ndarray:
    """H' x W' x 3 optical density of a uint8 RGB slide at 1/DOWNSAMPLE resolution."""
    small = np.ascontiguousarray(rgb[::DOWNSAMPLE, ::DOWNSAMPLE])
    return optical_density(small).reshape(small.shape)


def feature_maps(rgb: np.ndarray) -> np.ndarray:
    """H' x W' x F local image features of a uint8 RGB slide, at 1/DOWNSAMPLE resolution."""
    od = _small_optical_density(rgb)
    total = od.sum(axis=2)
    layers = [od[..., c] for c in range(3)] + [(total > TISSUE_OD).astype(np.float32),
                                               (total > NUCLEUS_OD).astype(np.float32)]
    maps = []
    for sigma in SCALES_PX:
        s = sigma / DOWNSAMPLE
        maps += [ndimage.gaussian_filter(layer, s) for layer in layers]
    fine = SCALES_PX[0] / DOWNSAMPLE
    mean = ndimage.gaussian_filter(total, fine)
    maps.append(np.sqrt(np.maximum(ndimage.gaussian_filter(total * total, fine) - mean * mean, 0)))  # texture
    return np.stack(maps, axis=-1)


def sample(maps: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """N x F features at pixel positions (x, y) of the full-resolution slide (bilinear, edges clamped)."""
    coords = np.stack([y / DOWNSAMPLE, x / DOWNSAMPLE])
    return np.stack([ndimage.map_coordinates(maps[..., f], coords, order=1, mode="nearest")
                     for f in range(maps.shape[-1])], axis=1)


def gaussianize(abundance: np.ndarray) -> np.ndarray:
    """Each cell type's values -> normal scores of their ranks across spots (heavy tails and zeros
    weigh nothing special)."""
    ranks = rankdata(abundance, axis=0)
    return ndtri((ranks - 0.5) / len(abundance))


class ShiftScorer:
    """Cross-validated R^2 of a ridge regression from the features at shifted spots to the targets,
    for the real labels and, in the same solve, for ``N_NULL`` random permutations of them (labels
    unrelated to the image: what a search over hundreds of shifts finds by chance)."""

    def __init__(self, maps: np.ndarray, x: np.ndarray, y: np.ndarray, abundance: np.ndarray, seed: int = 0):
        self.maps, self.x, self.y = maps, x.astype(np.float64), y.astype(np.float64)
        targets = _leading_components(gaussianize(abundance), N_COMPONENTS)
        self.n_types = targets.shape[1]
        rng = np.random.default_rng(seed)
        self.targets = np.concatenate([targets] + [targets[rng.permutation(len(targets))] for _ in range(N_NULL)],
                                      axis=1)
        self.folds = balanced_blocks(np.stack([self.x, self.y], axis=1), N_FOLDS)
        self.height, self.width = maps.shape[0] * DOWNSAMPLE, maps.shape[1] * DOWNSAMPLE

    def fold_r2(self, dx: int, dy: int, nulls: bool = True) -> np.ndarray:
        """(1 + N_NULL) x N_FOLDS: R^2 over the targets of each spatial fold's held-out spots;
        row 0 for the real labels, the others for the permuted ones (only row 0 without ``nulls``)."""
        targets = self.targets if nulls else self.targets[:, : self.n_types]
        x = np.clip(self.x + dx, 0, self.width - 1)
        y = np.clip(self.y + dy, 0, self.height - 1)
        features = sample(self.maps, x, y)
        features = np.concatenate([features, features**2], axis=1)
        out = np.empty((targets.shape[1] // self.n_types, N_FOLDS))
        for k in range(N_FOLDS):
            train, val = self.folds != k, self.folds == k
            mu, sd = features[train].mean(0), features[train].std(0) + 1e-6
            # Clipped: a shift that pushes spots past the image edge leaves near-constant features.
            a = np.c_[np.clip((features[train] - mu) / sd, -8, 8), np.ones(train.sum())]
            b = np.c_[np.clip((features[val] - mu) / sd, -8, 8), np.ones(val.sum())]
            penalty = RIDGE * train.sum() * np.eye(a.shape[1])
            penalty[-1, -1] = 0.0  # no penalty on the intercept
            coef = np.linalg.solve(a.T @ a + penalty, a.T @ targets[train])
            residual = ((targets[val] - b @ coef) ** 2).sum(0)
            total = ((targets[val] - targets[train].mean(0)) ** 2).sum(0)
            out[:, k] = 1.0 - residual.reshape(-1, self.n_types).sum(1) / total.reshape(-1, self.n_types).sum(1)
        return out


def _leading_components(targets: np.ndarray, k: int) -> np.ndarray:
    """The targets' projection on their ``k`` leading principal components (most of their variance,
    a fraction of the columns: the permutation test below solves for many label sets at once)."""
    centred = targets - targets.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:k].T


def estimate_offset(rgb: np.ndarray, x: np.ndarray, y: np.ndarray, abundance: np.ndarray,
                    max_shift: int, maps: np.ndarray | None = None) -> Registration:
    """The (dx, dy) within +-max_shift px under which the image best explains the abundances.

    Kept when it adds at least MIN_GAIN cross-validated R^2 over (0, 0), in at least
    MIN_FOLDS_BETTER of the spatial folds, and when its R^2 beats the best R^2 that the same search
    finds for each of N_NULL permutations of the labels (a permutation test at p < 0.02: the
    image must explain these spots' abundances, not just fit noise somewhere among many shifts)."""
    maps = feature_maps(rgb) if maps is None else maps
    scorer = ShiftScorer(maps, x, y, abundance)
    scores: dict[tuple[int, int], np.ndarray] = {}

    def score(shift: tuple[int, int], row: int = 0) -> float:
        if shift not in scores:  # the permuted labels are only needed on the grid
            scores[shift] = scorer.fold_r2(*shift, nulls=shift in on_grid)
        return float(scores[shift][row].mean())

    coarse = range(-max_shift, max_shift + 1, COARSE_STEP) if max_shift > 0 else [0]
    grid = [(dx, dy) for dx in coarse for dy in coarse]
    on_grid = set(grid) | {(0, 0)}
    best = max(grid, key=score)
    for step, reach in ((FINE_STEP, COARSE_STEP), (1, FINE_STEP)):
        around = range(-reach, reach + 1, step)
        candidates = [(best[0] + i, best[1] + j) for i in around for j in around
                      if max(abs(best[0] + i), abs(best[1] + j)) <= max_shift]
        best = max(candidates, key=score)
    base = score((0, 0))
    gain = score(best) - base
    # Compared on the same grid: the refinement around the real best would favour it over the nulls.
    grid_best = max(score(s) for s in grid)
    null_best = max(scores[s][1:].mean(axis=1).max() for s in grid)
    better_folds = int((scores[best][0] > scores[(0, 0)][0]).sum())
    keep = gain >= MIN_GAIN and better_folds >= MIN_FOLDS_BETTER and grid_best > null_best
    chosen = best if keep else (0, 0)
    return Registration(offset=(int(chosen[0]), int(chosen[1])), source="estimated", r2=score(chosen),
                        r2_unshifted=base, candidate=(int(best[0]), int(best[1])),
                        null_r2=null_best)


def tissue_cover(rgb: np.ndarray) -> np.ndarray:
    """Share of a spot's disc (radius 13 px) that is tissue, for a spot centred at each pixel of the
    slide at 1/DOWNSAMPLE resolution."""
    tissue = _small_optical_density(rgb).sum(axis=2) > TISSUE_OD
    # Closing bridges the empty inside of fat cells (about 30 px): adipose tissue is tissue.
    tissue = ndimage.binary_closing(tissue, _disc(FAT_CELL_RADIUS / DOWNSAMPLE)).astype(np.float32)
    disc = _disc(SPOT_RADIUS / DOWNSAMPLE).astype(np.float32)
    return ndimage.convolve(tissue, disc / disc.sum(), mode="constant")


def tissue_fraction(cover: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Share of each spot's disc that is tissue at positions (x, y), from :func:`tissue_cover`."""
    rows = np.clip(np.rint(y / DOWNSAMPLE).astype(int), 0, cover.shape[0] - 1)
    cols = np.clip(np.rint(x / DOWNSAMPLE).astype(int), 0, cover.shape[1] - 1)
    return cover[rows, cols]


def _disc(radius: float) -> np.ndarray:
    r = int(round(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r**2
