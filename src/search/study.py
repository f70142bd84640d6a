"""A study's life cycle: create or resume it under a name tied to its recipe, data and code, queue the
hand-set recipe and warm-start recipes, run trials to the target count, reopen it later."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from src.core.config import params_from_dict
from src.core.devices import check_device, default_device
from src.core.errors import InputError
from src.data.preprocessing.patch_set import PatchSet
from src.engine.folds import fold_count
from src.search.display import StudyMonitor
from src.search.identity import earlier_versions, library_versions, study_identity, study_name_for, what_changed
from src.search.objective import DVC_EXPERIMENTS_ATTR, HAND_SET, INTERRUPT, TRIAL_ERRORS, Objective, dvc_experiment
from src.search.pruning import make_pruner
from src.search.space import check_space, defaults, parse_space, values_of
from src.search.storage import create_storage, is_journal, open_study, reap_dead_local_workers
from src.search.warm_start import enqueue_warm_start

STUDIES_DIR = Path("studies")
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR}/studies.db"
ARTIFACT_DIR = STUDIES_DIR / "artifacts"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def stored_study_name(name: str, base_raw: dict, patch_set: PatchSet) -> str:
    """``name`` plus a hash of what the trials depend on: recipe, training data and trial code."""
    return study_name_for(name, study_identity(base_raw, patch_set.digest()))


def enqueue_defaults(study: optuna.Study, values: dict[str, Any]) -> None:
    """Queue the hand-set recipe as a trial: done once, by the worker that creates the study. It is
    queued again only when a run of it is lost: a killed worker's trial is retried with the same params
    (heartbeat or journal reaping), and a worker interrupted in it queues it before exiting."""
    study.enqueue_trial(values, user_attrs=HAND_SET)


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


def scale_notes(space: list, base_raw: dict, patch_set: PatchSet) -> list[str]:
    """A line for each searched encoder that sees the patches at another scale than it was trained at."""
    from src.model.encoders import PRESETS, scale_note

    model = params_from_dict(base_raw).model
    crop = max(1, min(patch_set.patch_size, round(model.context * patch_set.patch_size)))
    notes = []
    for backbone in values_of(space, "model.backbone", base_raw):
        encoder = PRESETS.get(backbone)
        if encoder is not None and encoder.input_size:
            notes.append(scale_note(encoder, crop, encoder.input_size, patch_set.um_per_px))
    return [n for n in notes if n]


def run_study(base_raw: dict, patch_set: PatchSet, n_trials: int, study_name: str, storage_url: str,
              timeout_s: float = 0.0, artifact_dir: Path = ARTIFACT_DIR, live: bool = True,
              log=print, after_cv=None) -> optuna.Study:
    """Create or resume the study and run trials until it holds ``n_trials`` finished ones."""
    params = params_from_dict(base_raw)
    space = parse_space(params.tune.space)
    if not space:
        raise InputError("params: tune.space is empty: nothing to search")
    check_space(space, base_raw, patch_set.patch_size)
    for line in scale_notes(space, base_raw, patch_set):
        log(line)
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
        for line in enqueue_warm_start(study, storage, study_name, identity["data"], space, hand_set,
                                       params.tune.warm_start):
            log(line)
    log(describe_study(study, created, study_name, identity, storage))
    experiment = dvc_experiment()
    if experiment and experiment not in study.user_attrs.get(DVC_EXPERIMENTS_ATTR, []):
        study.set_user_attr(DVC_EXPERIMENTS_ATTR, study.user_attrs.get(DVC_EXPERIMENTS_ATTR, []) + [experiment])
    if is_journal(storage_url):  # no heartbeat: fail and retry the trials of dead local workers
        reap_dead_local_workers(study, storage)
    if sum(t.state in FINISHED for t in study.get_trials(deepcopy=False)) >= n_trials:
        return study
    objective = Objective(base_raw, space, patch_set, n_folds, artifact_dir, after_cv=after_cv)
    # Failed trials do not count towards the target: run until the study holds n_trials finished
    # ones (other workers' trials included), unless trials keep failing or the timeout passes.
    stop_at_target = optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    one_line_failures()
    with StudyMonitor(n_trials) as monitor:
        monitor.show(study)
        callbacks = [INTERRUPT.check, stop_at_target, StopOnRepeatedFailure()] + ([monitor] if live else [])
        study.optimize(objective, n_trials=None, timeout=timeout_s or None, catch=TRIAL_ERRORS,
                       callbacks=callbacks, gc_after_trial=True)
        monitor.show(study)
    return study


class _WithoutTraceback(logging.Filter):
    """A failed trial is one line (its error, also in the trial's fail_reason): Optuna logs the traceback
    of every error it catches, which would read as the study's end."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], TRIAL_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


def one_line_failures() -> None:
    for handler in logging.getLogger("optuna").handlers:
        if not any(isinstance(f, _WithoutTraceback) for f in handler.filters):
            handler.addFilter(_WithoutTraceback())


def load_existing_study(base_raw: dict, patch_set: PatchSet, study_name: str, storage_url: str
                        ) -> tuple[optuna.Study, optuna.storages.BaseStorage]:
    name = stored_study_name(study_name, base_raw, patch_set)
    storage = create_storage(storage_url, params_from_dict(base_raw).tune.heartbeat_s)
    try:
        return optuna.load_study(study_name=name, storage=storage), storage
    except KeyError:
        raise InputError(f"--study {study_name}: {storage_url} holds no study {name} for this recipe") from None


