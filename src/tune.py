"""Stage ``tune``: an Optuna study over the recipe, scored by spatial-CV Spearman.

``python -m src.tune --trials N [--study NAME] [--storage URL] [--timeout S] [--set key=value ...]``

The search space is ``tune.space`` in params.yaml; ``src.space.suggest`` turns a trial into a full
config. The hand-set params.yaml recipe is the first trial, so the search never starts worse than it;
a new study then runs the best recipes of earlier studies of the same name (``src.warm_start``).
Each trial scores its out-of-fold predictions with every smoothing sigma of ``tune.sigma_grid`` and
keeps the best, reports each CV fold to the pruner (``src.pruning``), records fold scores, per-type
scores, its sigma, epochs, wall time and the floor, and uploads a per-type bar chart and its OOF
table as artifacts. ``--trials`` is the study's target of finished (complete + pruned) trials:
rerunning after an interruption runs only the missing ones. The stored study name is
``NAME-<hash>`` of the recipe, the training data and the trial code (``src.study_identity``):
changing any of them starts a fresh study. Under ``dvc exp run`` the study records the experiment's
name (user attribute ``dvc_experiments``; each trial: ``dvc_experiment``). Relative storage, artifact
and cache paths lie under the repository root, so queued experiments share them (``src.locations``).
Writes the outputs of ``src.study_outputs``: best params (with the sigma), metrics (naming the
study), per-type CV and optimization history.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.trial import TrialState

from src.config import Params, apply_overrides, params_from_dict, read_raw
from src.data import PatchSet, load_patch_set
from src.devices import check_device, default_device
from src.errors import InputError, exit_on_input_error
from src.locations import shared_path, shared_storage_url
from src.losses import to_abundance_scale
from src.pruning import make_pruner, reports
from src.report import per_type_bars
from src.space import SearchParam, check_space, defaults, parse_space, suggest
from src.splits import fold_count
from src.study_outputs import StageOutputs, trial_counts, write_outputs
from src.study_identity import earlier_versions, library_versions, study_identity, study_name_for, what_changed
from src.storage import (WORKER_ATTR, create_storage, fail_running_trials, is_journal, open_study,
                         reap_dead_local_workers, worker_identity)
from src.train import CVResult, cross_validate
from src.warm_start import enqueue_warm_start

STUDIES_DIR = Path("studies")
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR}/studies.db"
ARTIFACT_DIR = STUDIES_DIR / "artifacts"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Failures that mark a trial FAIL and let the study go on (divergence, out of memory, ...).
TRIAL_ERRORS = (RuntimeError, ValueError, ArithmeticError, MemoryError)


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


def stored_study_name(name: str, base_raw: dict, patch_set: PatchSet) -> str:
    """``name`` plus a hash of what the trials depend on: recipe, training data and trial code."""
    return study_name_for(name, study_identity(base_raw, patch_set.digest()))


HAND_SET = {"hand_set": True}
DVC_EXPERIMENTS_ATTR = "dvc_experiments"


def dvc_experiment() -> dict | None:
    """The DVC experiment this run belongs to (``dvc exp run`` sets its name and baseline commit)."""
    name = os.environ.get("DVC_EXP_NAME")
    return {"name": name, "baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "")} if name else None


def enqueue_defaults(study: optuna.Study, values: dict[str, Any]) -> None:
    """Queue the hand-set recipe as a trial: done once, by the worker that creates the study. It is
    queued again only when a run of it is lost: a killed worker's trial is retried with the same params
    (heartbeat or journal reaping), and a worker interrupted in it queues it before exiting."""
    study.enqueue_trial(values, user_attrs=HAND_SET)


class Objective:
    """CV Spearman of one suggested recipe (OOF predictions smoothed with the best of tune.sigma_grid).

    ``after_cv(trial, params, result)``, when given, sees every complete trial's CV result with its
    fold models kept (``src.bench search`` scores them on the test slide there)."""

    def __init__(self, base_raw: dict, space: list[SearchParam], patch_set: PatchSet, n_folds: int,
                 artifact_dir: Path = ARTIFACT_DIR, show_progress: bool = False, after_cv=None):
        self.base_raw = base_raw
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
                                    sigmas=params.tune.sigma_grid, keep_models=self.after_cv is not None)
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
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        self._upload(trial, params, result)
        if self.after_cv is not None:
            self.after_cv(trial, params, result)
        return result.score

    def _upload(self, trial: optuna.Trial, params: Params, result: CVResult) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            bars = Path(tmp) / f"trial{trial.number}_per_type.png"
            per_type_bars(bars, self.patch_set.targets, {"out-of-fold": result.per_type})
            oof = Path(tmp) / f"trial{trial.number}_oof.csv"
            values = to_abundance_scale(result.oof, params.loss.target_transform, params.loss.log_epsilon)
            table = self.patch_set.spots[["slide", "spot", "x", "y"]].assign(fold=result.fold_of)
            pd.concat([table, pd.DataFrame(values, columns=self.patch_set.targets)], axis=1).to_csv(oof, index=False)
            for path in (bars, oof):
                upload_artifact(artifact_store=self.store, file_path=str(path), study_or_trial=trial)


class StopOnRepeatedFailure:
    """Stop the study after ``limit`` failed trials in a row (a recipe that can never run)."""

    def __init__(self, limit: int = 5):
        self.limit = limit
        self.in_a_row = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.in_a_row = self.in_a_row + 1 if trial.state == TrialState.FAIL else 0
        if self.in_a_row >= self.limit:
            study.stop()


def describe_study(study: optuna.Study, created: bool, name: str, identity: dict,
                   storage: optuna.storages.BaseStorage) -> str:
    """One line: a study resumed, or a new one and why (which of recipe, data, code differ from the
    latest other study of the same name)."""
    if not created:
        done = sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
        return f"study {study.study_name}: resuming ({done} finished trials)"
    others = earlier_versions(storage, name, study.study_name)
    if not others:
        return f"study {study.study_name}: new"
    latest = others[0]
    changed = what_changed(latest.user_attrs, identity) or ["nothing recorded"]
    return f"study {study.study_name}: new; changed since study {latest.study_name}: {', '.join(changed)}"


def run_study(base_raw: dict, patch_set: PatchSet, n_trials: int, study_name: str, storage_url: str,
              timeout_s: float = 0.0, artifact_dir: Path = ARTIFACT_DIR, live: bool = True,
              log=print, after_cv=None) -> optuna.Study:
    """Create or resume the study and run trials until it holds ``n_trials`` finished ones."""
    params = params_from_dict(base_raw)
    space = parse_space(params.tune.space)
    if not space:
        raise InputError("params: tune.space is empty: nothing to search")
    check_space(space, base_raw, patch_set.patch_size)
    check_device(default_device())  # a GPU without torchsort's CUDA op: one error now, not a crash per trial
    hand_set = defaults(space, base_raw)
    n_folds = fold_count(params.cv, patch_set.spots["slide"].to_numpy())
    storage = create_storage(storage_url, params.tune.heartbeat_s)
    identity = study_identity(base_raw, patch_set.digest())
    study, created = open_study(study_name_for(study_name, identity), storage, make_pruner(params, n_folds),
                                params.tune.sampler_seed)
    if created:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_user_attr("versions", library_versions())
        enqueue_defaults(study, hand_set)
        for line in enqueue_warm_start(study, storage, study_name, space, hand_set, params.tune.warm_start):
            log(line)
    log(describe_study(study, created, study_name, identity, storage))
    experiment = dvc_experiment()
    if experiment and experiment not in study.user_attrs.get(DVC_EXPERIMENTS_ATTR, []):
        study.set_user_attr(DVC_EXPERIMENTS_ATTR, study.user_attrs.get(DVC_EXPERIMENTS_ATTR, []) + [experiment])
    if is_journal(storage_url):  # no heartbeat: fail and retry the trials of dead local workers
        reap_dead_local_workers(study)
    if sum(t.state in FINISHED for t in study.get_trials(deepcopy=False)) >= n_trials:
        return study
    objective = Objective(base_raw, space, patch_set, n_folds, artifact_dir, after_cv=after_cv)
    # Failed trials do not count towards the target: run until the study holds n_trials finished
    # ones (other workers' trials included), unless trials keep failing or the timeout passes.
    stop_at_target = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from src.tune_display import StudyMonitor

    with StudyMonitor(n_trials) as monitor:
        monitor.show(study)
        callbacks = [INTERRUPT.check, stop_at_target, StopOnRepeatedFailure()] + ([monitor] if live else [])
        study.optimize(objective, n_trials=None, timeout=timeout_s or None, catch=TRIAL_ERRORS,
                       callbacks=callbacks, gc_after_trial=True)
        monitor.show(study)
    return study


def load_existing_study(base_raw: dict, patch_set: PatchSet, study_name: str, storage_url: str) -> optuna.Study:
    name = stored_study_name(study_name, base_raw, patch_set)
    storage = create_storage(storage_url, params_from_dict(base_raw).tune.heartbeat_s)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise InputError(f"--study {study_name}: {storage_url} holds no study {name} for this recipe") from None


def print_summary(study: optuna.Study, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    counts = trial_counts(study)
    if counts["complete"] == 0:
        console.print(f"study {study.study_name}: no complete trial ({counts})")
        return
    best = study.best_trial
    table = Table(title=f"best trial #{best.number}: cv spearman {best.value:.4f} "
                        f"(floor {best.user_attrs.get('floor_spearman', float('nan')):.4f})",
                  title_justify="left")
    table.add_column("param")
    table.add_column("value", justify="right")
    table.add_column("importance", justify="right")
    try:
        importances = optuna.importance.get_param_importances(study) if counts["complete"] >= 2 else {}
    except (RuntimeError, ValueError):  # too few distinct trials for an importance estimate
        importances = {}
    for name, value in best.params.items():
        imp = importances.get(name)
        table.add_row(name, f"{value:.4g}" if isinstance(value, float) else str(value),
                      f"{imp:.3f}" if imp is not None else "-")
    console.print(table)
    console.print(f"{counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.tune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0],
        epilog="Resume: rerun the same command; finished trials are kept, interrupted ones rerun.")
    parser.add_argument("--trials", type=int, default=None,
                        help="target number of finished (complete + pruned) trials in the study; "
                             "default: tune.trials")
    parser.add_argument("--study", default=None, help="study name (default: tune.study)")
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL: sqlite:///..., postgresql://user@host/db, journal:PATH "
                             f"(default: tune.storage, else {DEFAULT_STORAGE})")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds after which no new trial starts (default: tune.timeout_s; 0 = none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param for this study, e.g. train.epochs=2 (repeatable)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--patches", type=Path, default=Path("data/patches"), help="patch store")
    parser.add_argument("--best-out", type=Path, default=STUDIES_DIR / "best_params.yaml")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/tune.json"))
    parser.add_argument("--cv-per-type", type=Path, default=Path("metrics/cv_per_type.csv"),
                        help="the best trial's out-of-fold Spearman per cell type (CSV)")
    parser.add_argument("--history", type=Path, default=Path("metrics/optimization_history.csv"),
                        help="value and best value so far of every complete trial (CSV)")
    parser.add_argument("--artifacts", type=Path, default=ARTIFACT_DIR,
                        help="artifact store folder (trial pictures and OOF tables); relative storage and "
                             "artifact paths lie under the repository root (DVC_ROOT), also in queued experiments")
    parser.add_argument("--fail-trial", type=int, action="append", default=[], metavar="N",
                        help="mark RUNNING trial N (left by a worker that died without a heartbeat, e.g. "
                             "on journal storage) FAIL, queue its retry and exit (repeatable)")
    return parser


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    base_raw = apply_overrides(read_raw(args.params), args.set)
    params = params_from_dict(base_raw)
    n_trials = params.tune.trials if args.trials is None else args.trials
    if n_trials < 1:
        raise InputError(f"--trials {n_trials}: must be at least 1")
    study_name = args.study or params.tune.study
    storage = shared_storage_url(args.storage or params.tune.storage or DEFAULT_STORAGE)
    timeout = params.tune.timeout_s if args.timeout is None else args.timeout
    patch_set = load_patch_set(args.patches, "train")
    if args.fail_trial:
        fail_running_trials(load_existing_study(base_raw, patch_set, study_name, storage), args.fail_trial)
        return
    INTERRUPT.install()
    try:
        study = run_study(base_raw, patch_set, n_trials, study_name, storage, timeout, shared_path(args.artifacts))
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are kept in the study; rerun the same command to resume")
        raise SystemExit(130) from None
    print_summary(study)
    if trial_counts(study)["complete"] == 0:
        raise InputError(f"study {study_name!r}: no trial completed, so there is no best recipe")
    write_outputs(study, patch_set.targets, StageOutputs(args.best_out, args.metrics, args.cv_per_type, args.history))


if __name__ == "__main__":
    main()
