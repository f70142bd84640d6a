"""How trials meet the pruner, and a replay that measures what a pruner would have cost a study.

A trial reports after each CV fold, never per epoch: a fold's score is only comparable across trials
once its model is trained (per-epoch reports favour recipes that start fast, whatever their end).
``wilcoxon`` (Optuna's WilcoxonPruner, made for per-instance scores such as CV folds) gets the fold's
``src.train.PRUNING_INSTANCES`` validation blocks as instances, paired with the same blocks of the best trial;
``median`` and ``hyperband`` get the running mean of the blocks seen so far, one step per fold.

``replay`` runs a pruner over a finished study's recorded reports, in trial order, as if it had been
active: which trials it would have stopped, how much training that saves, and how many of the stopped
trials would have beaten the best value known when they started (a lost improvement).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from src.core.sections import Params, PrunerName

PRUNERS: tuple[str, ...] = typing.get_args(PrunerName)
WILCOXON_P = 0.1  # one-sided p below which a trial is judged worse than the best (Optuna's default)


class StartupWilcoxonPruner(optuna.pruners.WilcoxonPruner):
    """WilcoxonPruner that waits for ``n_startup_trials`` complete trials, like the median pruner."""

    def __init__(self, n_startup_trials: int, p_threshold: float = WILCOXON_P):
        super().__init__(p_threshold=p_threshold, n_startup_steps=2)
        self.n_startup_trials = n_startup_trials

    def prune(self, study: optuna.study.Study, trial: optuna.trial.FrozenTrial) -> bool:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return len(complete) >= self.n_startup_trials and super().prune(study, trial)


def make_pruner(params: Params, n_folds: int) -> optuna.pruners.BasePruner:
    cfg = params.tune
    if cfg.pruner == "wilcoxon":
        return StartupWilcoxonPruner(cfg.pruner_startup_trials)
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_folds)
    return optuna.pruners.NopPruner()  # none


def reports(pruner_name: str, fold: int, block_scores: list[float], seen: list[float]) -> list[tuple[int, float]]:
    """(step, value) pairs a trial reports after ``fold``; ``seen`` collects all block scores so far.

    Wilcoxon: one step per validation block, numbered in order over the folds (the same numbers in
    every trial of a study, as its folds and blocks are the same). Others: step = folds done (1, 2, ...),
    the resource Hyperband counts."""
    first = len(seen)
    seen.extend(block_scores)
    if pruner_name == "wilcoxon":
        return [(first + b, score) for b, score in enumerate(block_scores)]
    return [(fold + 1, float(np.mean(seen)))]


@dataclass
class ReplayResult:
    pruner: str
    pruned: int  # trials the pruner would have stopped
    folds_saved: float  # share of all trials' folds not trained
    lost: int  # stopped trials whose final value beat the best value the pruned study knew then
    best_pruned: bool  # the study's best trial would have been stopped


def replay(study: optuna.Study, pruner_name: str, params: Params, n_folds: int) -> ReplayResult:
    """Run ``pruner_name`` over ``study``'s complete trials (recorded with ``fold_blocks``), in order.
    Meaningful for a study run without pruning, where every trial has its final value."""
    trials = sorted((t for t in study.get_trials(deepcopy=False)
                     if t.state == TrialState.COMPLETE and "fold_blocks" in t.user_attrs), key=lambda t: t.number)
    pruner = make_pruner(dataclasses.replace(params, tune=dataclasses.replace(params.tune, pruner=pruner_name)),
                         n_folds)
    shadow = optuna.create_study(study_name=study.study_name, direction="maximize", pruner=pruner)  # Hyperband's
    # brackets hash the study name: the replay follows the live study's
    best_overall = max(trials, key=lambda t: t.value).number if trials else -1
    pruned = lost = folds_skipped = 0
    best_known = -np.inf
    best_was_pruned = False
    for t in trials:
        live = shadow.ask()
        seen: list[float] = []
        stopped_after = None
        for fold, blocks in enumerate(t.user_attrs["fold_blocks"]):
            for step, value in reports(pruner_name, fold, blocks, seen):
                live.report(value, step)
            if fold + 1 < len(t.user_attrs["fold_blocks"]) and live.should_prune():
                stopped_after = fold + 1
                break
        if stopped_after is None:
            shadow.tell(live, t.value)
        else:
            shadow.tell(live, state=TrialState.PRUNED)
            pruned += 1
            folds_skipped += len(t.user_attrs["fold_blocks"]) - stopped_after
            lost += t.value > best_known
            best_was_pruned |= t.number == best_overall
        if stopped_after is None:
            best_known = max(best_known, t.value)
    total = sum(len(t.user_attrs["fold_blocks"]) for t in trials)
    return ReplayResult(pruner_name, pruned, folds_skipped / max(1, total), lost, best_was_pruned)
