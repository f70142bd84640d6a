"""Many workers, one study: PostgreSQL, SQLite and journal storages with parallel and killed workers,
and optuna-dashboard reading a study while it runs."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from src import tune
from src.core.config import apply_overrides, read_raw
from src.data.preprocessing.patch_set import load_patch_set
from src.search.space import run_value
from src.search.storage import create_storage
from src.search.study import stored_study_name
from tests.conftest import FAST, ROOT, study_named

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _sets(tmp_path: Path, *extra: str) -> list[str]:
    return [*FAST, "train.feature_cache=true", f"train.cache_dir={tmp_path}/cache", "tune.heartbeat_s=1", *extra]


def _worker_cmd(tiny_patches, tmp_path, storage, trials, *extra) -> list[str]:
    return [sys.executable, "-m", "src.tune", "--trials", str(trials), "--study", tmp_path.name, "--storage", storage,
            "--patches", str(tiny_patches / "patches"), "--params", str(ROOT / "params.yaml"),
            "--best-out", str(tmp_path / "best.yaml"), "--metrics", str(tmp_path / "tune.json"),
            "--cv-per-type", str(tmp_path / "cv.csv"), "--history", str(tmp_path / "history.csv"),
            "--artifacts", str(tmp_path / "artifacts"), "--ensemble-out", str(tmp_path / "ensemble.yaml"),
            *[a for item in _sets(tmp_path, *extra) for a in ("--set", item)]]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # workers share 2 cores


def _start(cmd, tmp_path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _load(storage, tmp_path: Path, *extra: str) -> optuna.Study:
    """The test's study from a storage URL or an opened storage."""
    return study_named(storage, tmp_path.name)


def _storage_url(kind: str, request, tmp_path: Path) -> str:
    if kind == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path}/study.db" if kind == "sqlite" else f"journal:{tmp_path}/study.journal"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "journal"])
def test_three_workers_share_one_study(kind, request, tiny_patches, tmp_path):
    storage = _storage_url(kind, request, tmp_path)
    cmd = _worker_cmd(tiny_patches, tmp_path, storage, 9, "train.epochs=2")  # trials outlast start-up skew
    workers = [_start(cmd, tmp_path) for _ in range(3)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output
    study = _load(storage, tmp_path, "train.epochs=2")
    finished = [t for t in study.trials if t.state in FINISHED]
    assert 9 <= len(finished) <= 11, [(t.number, t.state) for t in study.trials]
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    ran = {t.user_attrs["worker"]["pid"] for t in finished}
    assert ran == {w.pid for w in workers}, "every worker ran trials"
    assert sum(bool(t.user_attrs.get("hand_set")) for t in study.trials) == 1, "the hand-set recipe ran once"
    builds = [line for output in outputs for line in output.splitlines() if "built feature cache" in line]
    folders = [line.split()[3] for line in builds]  # at most one cache per context (2) and unfrozen count (3)
    assert len(folders) == len(set(folders)) <= 6, "each shared feature cache was built once"
    best = study.best_trial
    assert best.value == max(t.value for t in study.trials if t.state == TrialState.COMPLETE)
    record = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert record["trial"] == best.number
    assert record["params"] == {name: run_value(value) for name, value in best.params.items()}  # as trials ran


def _poll(storage: str, tmp_path: Path, extra, until, timeout: float = 300):
    """Load the study repeatedly until ``until(trials)`` holds; the study may not exist yet, or an
    SQLite writer may hold the lock for a moment."""
    deadline, opened = time.time() + timeout, None
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            opened = opened or create_storage(storage, 1)  # one engine for the whole wait
            trials = _load(opened, tmp_path, *extra).get_trials(deepcopy=False)
        except Exception:  # noqa: BLE001 - not created yet or locked: poll again
            continue
        if until(trials):
            return trials
    raise AssertionError("the study never reached the awaited state")


def _mid_trial(trials) -> bool:
    """A trial completed and the next one has trained at least an epoch."""
    return any(t.state == TrialState.COMPLETE for t in trials) and any(
        t.state == TrialState.RUNNING and t.user_attrs.get("epochs_run", 0) >= 1 for t in trials)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "sqlite", "journal"])
def test_a_worker_killed_mid_trial_is_failed_retried_and_the_study_finishes(kind, request, tiny_patches, tmp_path):
    storage = _storage_url(kind, request, tmp_path)
    extra = ("train.epochs=2", "tune.pruner=none")
    cmd = _worker_cmd(tiny_patches, tmp_path, storage, 4, *extra)
    victim = _start(cmd, tmp_path)
    trials = _poll(storage, tmp_path, extra, _mid_trial)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    trials = _load(storage, tmp_path, *extra).get_trials(deepcopy=False)
    completed = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    killed = next(t for t in trials if t.state == TrialState.RUNNING)
    assert killed.user_attrs["worker"]["pid"] == victim.pid
    time.sleep(3)  # past the grace period (2 x tune.heartbeat_s = 2 s): nobody is left to fail it
    assert _load(storage, tmp_path, *extra).trials[killed.number].state == TrialState.RUNNING

    survivor = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert survivor.returncode == 0, survivor.stdout + survivor.stderr
    study = _load(storage, tmp_path, *extra)
    assert study.trials[killed.number].state == TrialState.FAIL
    retries = [t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number]
    assert len(retries) == 1 and retries[0].state in FINISHED and retries[0].params == killed.params
    assert retries[0].user_attrs["worker"]["pid"] != victim.pid
    assert all(study.trials[n].value == v for n, v in completed.items()), "no completed trial lost"
    assert sum(t.state in FINISHED for t in study.trials) == 4
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    if kind == "journal":  # no heartbeat: the new worker saw the dead local process instead
        assert f"trial {killed.number}: its worker" in survivor.stdout


def test_journal_trials_of_dead_local_workers_are_reaped_others_failed_by_hand(tmp_path, capsys, tiny_patches):
    """JournalStorage has no heartbeat: a worker fails the RUNNING trials of dead processes on its own
    host; a trial held by another host stays RUNNING until `--fail-trial N`."""
    from src.search.storage import reap_dead_local_workers, worker_identity

    storage = f"journal:{tmp_path}/study.journal"
    raw = apply_overrides(read_raw(ROOT / "params.yaml"), list(FAST))
    patch_set = load_patch_set(tiny_patches / "patches", "train")
    study_storage = create_storage(storage, 1)
    study = optuna.create_study(study_name=stored_study_name("j", raw, patch_set),
                                storage=study_storage, direction="maximize")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    me = worker_identity()
    attrs = {"local dead": {**me, "pid": int(dead.stdout)}, "local alive": me, "other host": {**me, "host": "gpu-node-7"},
             "retry of a dead one, just started": {**me, "pid": int(dead.stdout), "trial": -1}}
    trials = {}
    for name, worker in attrs.items():
        trial = study.ask({"loss.alpha": optuna.distributions.FloatDistribution(0, 1)})
        trial.set_user_attr("worker", {"trial": trial.number, **worker})
        trials[name] = trial.number
    assert reap_dead_local_workers(study, study_storage, log=lambda _: None) == [trials["local dead"]]
    states = {name: study.trials[n].state for name, n in trials.items()}
    assert states == {"local dead": TrialState.FAIL, "local alive": TrialState.RUNNING,
                      "other host": TrialState.RUNNING, "retry of a dead one, just started": TrialState.RUNNING}

    args = ["--storage", storage, "--study", "j", "--params", str(ROOT / "params.yaml"),
            "--patches", str(tiny_patches / "patches"),
            *[a for item in FAST for a in ("--set", item)]]
    tune.main([*args, "--fail-trial", str(trials["other host"])])
    study = study_named(storage, "j")
    assert study.trials[trials["other host"]].state == TrialState.FAIL
    queued = [t for t in study.trials if t.state == TrialState.WAITING]
    assert sorted(RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in queued) == \
        sorted([trials["local dead"], trials["other host"]])
    with pytest.raises(SystemExit) as exit_info:  # a finished trial cannot be failed
        tune.main([*args, "--fail-trial", str(trials["other host"])])
    assert exit_info.value.code == 2
    assert "trial is FAIL, not RUNNING" in capsys.readouterr().err


@pytest.mark.slow
def test_dashboard_reads_a_running_sqlite_study_without_breaking_it(tiny_patches, tmp_path):
    from tests.helpers import http_get, start_dashboard

    storage = f"sqlite:///{tmp_path}/study.db"
    extra = ("train.epochs=2",)
    tuner = _start(_worker_cmd(tiny_patches, tmp_path, storage, 6, *extra), tmp_path)
    _poll(storage, tmp_path, extra, lambda trials: len(trials) > 0)
    dashboard, base = start_dashboard(storage, tmp_path / "artifacts")
    reads, errors = 0, []
    try:
        while tuner.poll() is None:  # read the study as the dashboard's page does, all through the study
            try:
                summaries = json.loads(http_get(f"{base}/api/studies"))["study_summaries"]
                for summary in summaries:
                    http_get(f"{base}/api/studies/{summary['study_id']}?after=0")
                reads += 1
            except OSError as err:
                errors.append(repr(err))
            time.sleep(0.05)
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=10)
    output = tuner.communicate(timeout=60)[0]
    assert tuner.returncode == 0, output
    assert "database is locked" not in output
    study = _load(storage, tmp_path, *extra)
    assert sum(t.state in FINISHED for t in study.trials) == 6
    assert not [t for t in study.trials if t.state in (TrialState.FAIL, TrialState.RUNNING)]
    assert reads >= 20 and not errors, (reads, errors[:3])


@pytest.mark.parametrize("url, message", [
    ("postgresql://postgres@127.0.0.1:1/optuna", "cannot open (OperationalError"),
    ("mysql+nodriver://u@h/db", "cannot open (NoSuchModuleError"),
    ("journal:", "expected journal:PATH to a file"),
])
def test_an_unusable_storage_is_a_one_line_error_and_writes_nothing(url, message, tiny_patches, tmp_path, capsys):
    args = ["--storage", url, "--params", str(ROOT / "params.yaml"), "--patches", str(tiny_patches / "patches"),
            "--best-out", str(tmp_path / "best.yaml"), "--metrics", str(tmp_path / "tune.json"),
            "--cv-per-type", str(tmp_path / "cv.csv"), "--history", str(tmp_path / "history.csv"),
            "--artifacts", str(tmp_path / "artifacts"), "--ensemble-out", str(tmp_path / "ensemble.yaml"),
            *[a for item in FAST for a in ("--set", item)]]
    with pytest.raises(SystemExit) as exit_info:
        tune.main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def _open_storage_in_worker(url, barrier, results):
    barrier.wait(timeout=120)
    try:
        create_storage(url, 60)
        results.put("ok")
    except SystemExit as err:  # noqa: BLE001 - report, do not hang the parent
        results.put(f"exit {err.code}")
    except Exception as err:  # noqa: BLE001
        results.put(f"{type(err).__name__}: {err}")


def test_workers_opening_an_empty_postgresql_database_at_once_all_get_the_storage(postgres_url):
    """They race to create Optuna's tables; PostgreSQL fails all but one, and those retry."""
    import multiprocessing

    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("CREATE DATABASE race"))
    engine.dispose()
    url = postgres_url.rsplit("/", 1)[0] + "/race"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    workers = [ctx.Process(target=_open_storage_in_worker, args=(url, barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=180) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == ["ok"] * 4, outcomes
    assert optuna.get_all_study_names(create_storage(url, 60)) == []


def test_relative_storage_artifacts_and_cache_lie_under_the_repository_root_in_dvc_copies(monkeypatch, tmp_path):
    """DVC runs queued experiments in temporary copies and sets DVC_ROOT to the repository itself."""
    from src.core.locations import shared_path, shared_storage_url

    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp123"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert shared_storage_url("sqlite:///studies/studies.db") == f"sqlite:///{tmp_path}/repo/studies/studies.db"
    assert shared_storage_url("journal:studies/s.journal") == f"journal:{tmp_path}/repo/studies/s.journal"
    assert shared_path("cache/features") == tmp_path / "repo" / "cache" / "features"
    for fixed in ("sqlite:////abs/s.db", "sqlite:///:memory:", "postgresql://u@h/db", "journal:/abs/j", "journal:"):
        assert shared_storage_url(fixed) == fixed
    monkeypatch.delenv("DVC_ROOT")
    assert shared_path("cache/features") == copy / "cache" / "features"  # outside DVC: the working directory
