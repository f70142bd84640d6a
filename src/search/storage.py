"""Where a study lives, and the workers that share it.

A study is shared through Optuna's own storages: any SQLAlchemy URL (``sqlite:///...`` for one worker,
``postgresql://...`` for many processes and hosts) or ``journal:PATH`` (Optuna's JournalStorage with
the file backend: many processes on one machine, no server).

Killed workers:

- RDB storages (SQLite, PostgreSQL, ...) run Optuna's heartbeat. A trial whose worker has been silent
  for ``2 x tune.heartbeat_s`` is marked FAIL by the next worker that starts a trial, and
  ``RetryHeartbeatStaleTrialCallback`` queues a copy with the same params, which that worker runs.
- JournalStorage has no heartbeat: a killed worker's trial stays RUNNING. Every trial records the
  worker that runs it (host, pid, process start time), so a worker starting on the same host marks the
  RUNNING trials of dead local processes FAIL and queues their retries the same way. A trial left by a
  worker on another host is failed by hand: ``python -m src.tune --fail-trial N``.
"""
from __future__ import annotations

import copy
import hashlib
import os
import random
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import psutil
import sqlalchemy.exc
from optuna.trial import FrozenTrial, TrialState

from src.core.errors import InputError

MAX_RETRY = 3  # a trial whose worker dies is retried at most this many times
WORKER_ATTR = "worker"
SCHEMA_ATTEMPTS = 5


def is_journal(url: str) -> bool:
    return url.startswith("journal:")


def create_storage(url: str, heartbeat_s: int) -> optuna.storages.BaseStorage:
    """Optuna storage for a URL: SQLAlchemy URLs get a heartbeat that fails and retries the trials of
    killed workers; ``journal:PATH`` is a lock-file journal (no heartbeat)."""
    if is_journal(url):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:").removeprefix("//"))
        if not path.name:
            raise InputError(f"--storage {url}: expected journal:PATH to a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        db = url.removeprefix("sqlite:///")
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        # optuna-dashboard reading the file holds SQLite's lock for a moment: wait for it instead of
        # failing the trial with "database is locked".
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True  # a server restart or idle timeout must not fail a trial
    try:
        return _open_rdb(url, engine_kwargs, heartbeat_s)
    except Exception as err:  # SQLAlchemy raises many kinds for a bad URL or an unreachable server
        raise _cannot_open(url, err) from None


def _open_rdb(url: str, engine_kwargs: dict, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """Workers started together on an empty database all create Optuna's tables; PostgreSQL lets one
    win and gives the others a unique violation. Once the tables exist, opening succeeds: retry."""
    for _ in range(SCHEMA_ATTEMPTS - 1):
        try:
            return _rdb_storage(url, engine_kwargs, heartbeat_s)
        except sqlalchemy.exc.DBAPIError as err:
            if not (isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)):
                raise
            time.sleep(0.2 + random.random())
    return _rdb_storage(url, engine_kwargs, heartbeat_s)


def _rdb_storage(url: str, engine_kwargs: dict, heartbeat_s: int) -> optuna.storages.RDBStorage:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
        )


def _cannot_open(url: str, err: Exception) -> InputError:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else "no detail"
    return InputError(f"--storage {url}: cannot open ({type(err).__name__}: {detail})")


def open_study(name: str, storage: optuna.storages.BaseStorage, pruner: optuna.pruners.BasePruner,
               seed: int) -> tuple[optuna.Study, bool]:
    """Create the study, or join it when another worker already has. Returns (study, created).

    The creator samples with ``seed``, so a single-worker study is reproducible. A joining worker
    (another process, or a resumed run) gets a seed of its own: workers seeded alike would propose the
    same random start-up trials."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=seed))
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    n_trials = len(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
    study = optuna.load_study(study_name=name, storage=storage, pruner=pruner,
                              sampler=optuna.samplers.TPESampler(seed=joining_seed(seed, n_trials)))
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise InputError(f"study {name!r} in the storage does not maximize: pick another --study")
    return study, False


def joining_seed(seed: int, n_trials: int) -> int:
    me = worker_identity()
    text = f"{seed}:{n_trials}:{me['host']}:{me['pid']}:{me['started']}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def worker_identity() -> dict[str, Any]:
    """What a trial records about the process running it (user attribute ``worker``, to which the
    trial adds its own number): host, pid and process start time (which tells a reused pid apart),
    and the GPU it was given."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": process_start(pid),
            "device": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def process_start(pid: int) -> float:
    """When ``pid`` started: clock ticks since boot on Linux (immune to wall-clock steps), else the
    wall-clock start time. Raises psutil.NoSuchProcess when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return float(stat.rpartition(")")[2].split()[19])  # field 22, starttime
    except FileNotFoundError:
        raise psutil.NoSuchProcess(pid) from None
    except (OSError, IndexError, ValueError):
        return round(psutil.Process(pid).create_time(), 2)


def describe(worker: dict) -> str:
    return f"{worker.get('host', '?')}:{worker.get('pid', '?')}"


def _left_by_dead_local_worker(trial: FrozenTrial) -> bool:
    """True when the RUNNING ``trial`` was started by a process on this host that no longer exists (a
    reused pid with another start time counts as gone). A retry copies the failed trial's attributes,
    so the ``worker`` attribute counts only when it names this trial."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(worker, dict) or worker.get("trial") != trial.number:
        return False
    if worker.get("host") != socket.gethostname() or not isinstance(worker.get("pid"), int):
        return False
    try:
        return process_start(worker["pid"]) != worker.get("started")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.AccessDenied:
        return False


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, trial: FrozenTrial) -> int:
    """The storage's id of a trial (Optuna's public storage API; FrozenTrial keeps its own private)."""
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                           trial.number)


def fail_and_retry(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: FrozenTrial) -> bool:
    """Mark a RUNNING trial FAIL and queue its retry, exactly as Optuna's heartbeat does for RDB
    storages. False when another worker got there first."""
    stored = trial_id(storage, study, trial)
    try:
        if not storage.set_trial_state_values(stored, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        failed = copy.deepcopy(storage.get_trial(stored))  # the callback edits its attributes
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, failed)
    return True


def reap_dead_local_workers(study: optuna.Study, storage: optuna.storages.BaseStorage,
                            log: Callable[[str], None] = print) -> list[int]:
    """Fail and retry the RUNNING trials whose worker process on this host is gone (the journal's
    stand-in for a heartbeat). Returns the numbers of the trials failed here."""
    reaped = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _left_by_dead_local_worker(trial) and fail_and_retry(study, storage, trial):
            worker = describe(trial.user_attrs[WORKER_ATTR])
            log(f"trial {trial.number}: its worker {worker} is gone; marked FAIL and queued again")
            reaped.append(trial.number)
    return reaped


def fail_running_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, numbers: list[int],
                        log: Callable[[str], None] = print) -> None:
    """``--fail-trial``: fail and retry trials a dead worker left RUNNING (journal storage, other hosts)."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    for number in numbers:
        trial = by_number.get(number)
        if trial is None:
            raise InputError(f"--fail-trial {number}: study {study.study_name!r} has no trial {number}")
        if trial.state != TrialState.RUNNING:
            raise InputError(f"--fail-trial {number}: trial is {trial.state.name}, not RUNNING")
    for number in numbers:
        if fail_and_retry(study, storage, by_number[number]):
            log(f"trial {number}: marked FAIL and queued again")
