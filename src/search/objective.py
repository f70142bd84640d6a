"""The objective of a study: the CV Spearman of one suggested recipe, with what each trial records
(fold and block scores for the pruner, per-type scores, its smoothing sigma, the floor, the map score and
its floor, its cost) and uploads (a per-type bar chart and its out-of-fold table); and the Ctrl-C handling around it."""
from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from src.core.config import params_from_dict
from src.core.devices import default_device
from src.core.errors import InputError
from src.core.locations import shared_path
from src.core.sections import Params
from src.data.preprocessing.patch_set import PatchSet
from src.engine.cross_validation import CVResult, cross_validate
from src.engine.model_store import save_models
from src.model.feature_cache import FeatureCaches
from src.model.targets import rank_scale, to_abundance_scale
from src.report.plots import per_type_bars
from src.search.pruning import reports
from src.search.space import SearchParam, defaults, suggest
from src.search.storage import WORKER_ATTR, worker_identity

# Failures that mark a trial FAIL and let the study go on (divergence, out of memory, a backbone that
# refuses its input or a cache that does not fit: the other choices of a searched backbone go on).
TRIAL_ERRORS = (RuntimeError, ValueError, ArithmeticError, MemoryError, AssertionError, InputError)


class InterruptFlag:
    """Ctrl-C that cannot be lost and never lands inside Optuna's own bookkeeping.

    Inside a trial's objective (``raising()``) Ctrl-C raises KeyboardInterrupt at once: Optuna marks
    the trial FAIL. Elsewhere (Optuna recording a result, sampling the next trial) it only sets the
    flag, which ``check`` turns into KeyboardInterrupt at the next epoch or trial boundary. The flag
    also survives a KeyboardInterrupt that Python raised inside a finalizer, where it is swallowed."""

    def __init__(self):
        self.requested = False
        self.armed = False

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        if self.armed:
            raise KeyboardInterrupt

    def check(self, *_args) -> None:
        if self.requested:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def raising(self):
        self.check()
        self.armed = True
        try:
            yield
        finally:
            self.armed = False


INTERRUPT = InterruptFlag()


HAND_SET = {"hand_set": True}
DVC_EXPERIMENTS_ATTR = "dvc_experiments"


def dvc_experiment() -> dict | None:
    """The DVC experiment this run belongs to (``dvc exp run`` sets its name and baseline commit)."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"name": name, "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")} if name else None


class Objective:
    """CV Spearman of one suggested recipe (OOF predictions smoothed with the best of tune.sigma_grid);
    a complete trial's fold models go to the model store, where stage train finds the delivered ones.

    ``after_cv(trial, params, result)``, when given, sees every complete trial's CV result with its
    fold models kept (``src.bench search`` scores them on the test slide there)."""

    def __init__(self, base_raw: dict, space: list[SearchParam], patch_set: PatchSet, n_folds: int,
                 artifact_dir: Path, show_progress: bool = False, after_cv=None):
        self.base_raw = base_raw
        base = params_from_dict(base_raw)
        self.reuse = FeatureCaches(shared_path(base.train.cache_dir), default_device())  # across trials
        self.space = space
        self.patch_set = patch_set
        self.n_folds = n_folds
        self.store = FileSystemArtifactStore(str(artifact_dir))
        artifact_dir.mkdir(parents=True, exist_ok=True)
        self.show_progress = show_progress
        self.after_cv = after_cv
        self.worker = worker_identity()
        self.experiment = dvc_experiment()

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER_ATTR, {**self.worker, "trial": trial.number})
        if self.experiment:
            trial.set_user_attr("dvc_experiment", self.experiment["name"])
        try:
            with INTERRUPT.raising():
                return self._run(trial)
        except KeyboardInterrupt:
            if trial.user_attrs.get("hand_set"):  # the search must still start from the hand-set recipe
                trial.study.enqueue_trial(defaults(self.space, self.base_raw), user_attrs=HAND_SET)
            raise

    def _run(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.space, self.base_raw)
        start = time.perf_counter()
        fold_blocks: list[list[float]] = []
        seen: list[float] = []

        def report(fold: int, block_scores: list[float]) -> None:
            INTERRUPT.check()
            fold_blocks.append([round(v, 6) for v in block_scores])
            trial.set_user_attr("fold_blocks", fold_blocks)
            trial.set_user_attr("epochs_run", (fold + 1) * params.train.epochs)
            for step, value in reports(params.tune.pruner, fold, block_scores, seen):
                trial.report(value, step)
            if fold + 1 < self.n_folds and trial.should_prune():
                raise optuna.TrialPruned(f"after fold {fold + 1}: mean block spearman {np.mean(seen):.4f}")

        try:
            result = cross_validate(params, self.patch_set, on_fold=report, show_progress=self.show_progress,
                                    sigmas=params.tune.sigma_grid, keep_models=True, reuse=self.reuse)
            if not np.isfinite(result.score):
                raise FloatingPointError("CV spearman is not finite (training diverged)")
        except TRIAL_ERRORS as err:  # recorded on the trial; Optuna marks it FAIL and goes on
            trial.set_user_attr("fail_reason", f"{type(err).__name__}: {err}"[:500])
            raise
        trial.set_user_attr("fold_spearman", [round(s, 6) for s in result.fold_scores])
        trial.set_user_attr("smoothing_sigma", result.sigma)
        trial.set_user_attr("sigma_scores", {f"{k:g}": round(v, 6) for k, v in result.sigma_scores.items()})
        trial.set_user_attr("per_type_spearman", dict(zip(self.patch_set.targets,
                                                          np.round(np.nan_to_num(result.per_type), 4).tolist())))
        trial.set_user_attr("floor_spearman", round(result.floor, 6))
        trial.set_user_attr("map_spearman", round(result.map_score, 6))
        trial.set_user_attr("map_floor_spearman", round(result.map_floor, 6))
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        self._upload(trial, params, result)
        if params.train.final == "ensemble":  # what stage train delivers for this recipe: no CV run twice
            save_models(params, self.patch_set, result.models, result.epochs_run)
        if self.after_cv is not None:
            self.after_cv(trial, params, result)
        return result.score

    def _upload(self, trial: optuna.Trial, params: Params, result: CVResult) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            bars = Path(tmp) / f"trial{trial.number}_per_type.png"
            per_type_bars(bars, self.patch_set.targets, {"out-of-fold": result.per_type})
            oof = Path(tmp) / f"trial{trial.number}_oof.csv"
            values = to_abundance_scale(result.oof, params.loss.target_transform, params.loss.log_epsilon,
                                        rank_scale(self.patch_set.abundance))
            table = self.patch_set.spots[["slide", "spot", "x", "y"]].assign(fold=result.fold_of)
            pd.concat([table, pd.DataFrame(values, columns=self.patch_set.targets)], axis=1).to_csv(oof, index=False)
            for path in (bars, oof):
                upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)


