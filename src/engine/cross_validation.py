"""Spatial cross-validation of one recipe: a model per fold, out-of-fold predictions with TTA, the
smoothing sigma chosen on them, and per-block fold scores for the pruner."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from src.core.devices import default_device
from src.core.locations import shared_path
from src.core.sections import LossConfig, Params
from src.data.preprocessing.patch_set import PatchSet
from src.data.spatial import balanced_blocks
from src.engine.fit import fit
from src.engine.folds import make_folds
from src.engine.inference import predict
from src.engine.metrics import competition_score, map_per_type, map_score, position_floor, types_mean
from src.engine.pretraining import fold_backbone, with_backbone
from src.engine.smoothing import smooth
from src.model.feature_cache import FeatureCaches
from src.model.network import SpatialCellModel
from src.model.targets import log_abundance, rank_scale


@dataclass
class CVResult:
    oof: np.ndarray  # N x T out-of-fold predictions (target space, TTA, no smoothing)
    fold_of: np.ndarray  # fold of each training spot
    fold_scores: list[float]  # per fold, after smoothing with ``sigma``
    score: float  # competition score of all OOF predictions smoothed with ``sigma``
    sigma: float  # smoothing sigma (px) of ``score``: the best of the sigmas scored
    sigma_scores: dict[float, float]  # CV score of every sigma scored
    floor: float  # training-mean-profile score on the same validation spots
    map_score: float  # map score of the smoothed OOF predictions (src.engine.metrics)
    map_floor: float  # map score of the spots' positions alone, per fold from its training spots
    per_type: np.ndarray  # per-cell-type map score (Spearman across each slide's spots) of the smoothed OOF
    epochs_run: list[int]
    dropped: list[int]  # training spots removed by the buffer, per fold
    seconds: float
    models: list[SpatialCellModel] = field(default_factory=list)  # the fold models, when kept


def delivered_view(oof: np.ndarray, patch_set: PatchSet, loss: LossConfig, sigma: float, truncate: float) -> np.ndarray:
    """OOF predictions as delivered: smoothed with ``sigma`` in target space, then log abundances
    (``src.model.targets.log_abundance``, with the rank scale of all training spots: it sets magnitudes
    only, no order within a spot or across spots, so no score depends on it)."""
    smoothed = smooth(oof, patch_set.xy(), patch_set.slides, sigma, patch_set.pitches(), truncate)
    return log_abundance(smoothed, loss.target_transform, loss.log_epsilon, rank_scale(patch_set.abundance))


def cv_score(oof: np.ndarray, patch_set: PatchSet, fold_of: np.ndarray, loss: LossConfig, sigma: float,
             truncate: float) -> tuple[float, list[float], np.ndarray]:
    """Score smoothed OOF predictions: overall, per fold and per cell type (the map score's per-type
    values; sigma needs no retraining)."""
    truth = patch_set.abundance
    view = delivered_view(oof, patch_set, loss, sigma, truncate)
    folds = [competition_score(view[fold_of == k], truth[fold_of == k]) for k in np.unique(fold_of)]
    return competition_score(view, truth), folds, map_per_type(view, truth, patch_set.slides)


def choose_sigma(oof: np.ndarray, patch_set: PatchSet, fold_of: np.ndarray, loss: LossConfig, sigmas: list[float],
                 truncate: float) -> tuple[float, dict[float, float]]:
    """The smoothing sigma whose smoothed OOF predictions score best (ties: the smaller sigma).

    Smoothing acts after the model, so every sigma is scored on the same predictions for free."""
    truth = patch_set.abundance
    scores = {float(s): competition_score(delivered_view(oof, patch_set, loss, s, truncate), truth)
              for s in sorted(set(sigmas))}
    best = max(scores, key=lambda s: (scores[s], -s))
    return best, scores


PRUNING_INSTANCES = 4  # validation blocks per fold reported to the pruner (WilcoxonPruner's instances)


def instance_scores(pred: np.ndarray, truth: np.ndarray, xy: np.ndarray, slides: np.ndarray) -> list[float]:
    """A fold's score on ``PRUNING_INSTANCES`` contiguous blocks of its validation spots (split evenly
    among its slides): the same blocks in every trial, so trials can be compared block by block."""
    names = list(dict.fromkeys(slides))
    per_slide = max(1, PRUNING_INSTANCES // len(names))
    out = []
    for name in names:
        rows = np.flatnonzero(slides == name)
        blocks = balanced_blocks(xy[rows], min(per_slide, len(rows)))
        out += [competition_score(pred[rows[blocks == b]], truth[rows[blocks == b]]) for b in np.unique(blocks)]
    return out


FoldCallback = Callable[[int, list[float]], None]  # (fold, its validation blocks' scores); may raise


def cross_validate(params: Params, patch_set: PatchSet, on_fold: FoldCallback | None = None,
                   on_epoch: Callable[[int, int, float], None] | None = None, device: torch.device | None = None,
                   show_progress: bool = True, sigmas: list[float] | None = None,
                   keep_models: bool = False, reuse: FeatureCaches | None = None) -> CVResult:
    """Spatial CV: one model per fold (its backbone first trained on the fold's training spots, with
    ``pretrain.epochs`` > 0), TTA predictions for its validation spots, scored after smoothing with the
    best of ``sigmas`` (default: the recipe's own ``infer.smoothing_sigma``). ``reuse``: feature caches
    shared with other CV runs (a study's trials); by default the folds share a fresh set."""
    start = time.perf_counter()
    device = device or default_device()
    if reuse is None and params.train.feature_cache:
        reuse = FeatureCaches(shared_path(params.train.cache_dir), device)
    abundance, xy, slides, coords = patch_set.abundance, patch_set.xy(), patch_set.slides, patch_set.coords()
    folds = make_folds(xy, slides, params.cv, patch_set.patch_size, patch_set.pitches(), patch_set.um_per_px)
    oof = np.zeros_like(abundance)
    fold_of = np.full(len(abundance), -1)
    floor_preds = np.zeros_like(abundance)
    position_preds = np.zeros_like(abundance)
    epochs_run, models = [], []
    for k, fold in enumerate(folds):
        callback = (lambda epoch, score, k=k: on_epoch(k, epoch, score)) if on_epoch else None
        fold_params = with_backbone(params, fold_backbone(params, patch_set, fold.train, device))
        result = fit(fold_params, patch_set, fold.train, fold.val if on_epoch else None, callback, device,
                     show_progress, reuse)
        oof[fold.val] = predict(result.model, patch_set, fold.val, params.infer.tta,
                                params.infer.batch_size, device, cache=result.cache, reuse=reuse)
        fold_of[fold.val] = k
        floor_preds[fold.val] = abundance[fold.train].mean(axis=0)
        position_preds[fold.val] = position_floor(coords[fold.train], abundance[fold.train], coords[fold.val])
        epochs_run.append(result.epochs_run)
        if keep_models:
            models.append(result.model)
        if on_fold is not None:
            on_fold(k, instance_scores(oof[fold.val], abundance[fold.val], xy[fold.val], slides[fold.val]))
    truncate = params.infer.smoothing_truncate
    sigma, sigma_scores = choose_sigma(oof, patch_set, fold_of, params.loss, sigmas or [params.infer.smoothing_sigma],
                                       truncate)
    score, fold_scores, per_type = cv_score(oof, patch_set, fold_of, params.loss, sigma, truncate)
    return CVResult(oof=oof, fold_of=fold_of, fold_scores=fold_scores, score=score, sigma=sigma,
                    sigma_scores=sigma_scores, floor=competition_score(floor_preds, abundance),
                    map_score=types_mean(per_type), map_floor=map_score(position_preds, abundance, slides),
                    per_type=per_type, epochs_run=epochs_run, dropped=[f.dropped for f in folds],
                    seconds=time.perf_counter() - start, models=models)
