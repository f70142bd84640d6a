"""The scale-out recipes in deploy/: the local multi-worker script and the Slurm array script run
here for real (Slurm's srun stood in by a pass-through); the Kubernetes Job is checked against the
tune CLI it runs."""
import os
import stat
import subprocess
import sys

import pytest
import yaml
from optuna.trial import TrialState

from src import tune
from src.core.config import apply_overrides, read_raw
from tests.conftest import FAST, ROOT, study_named

DEPLOY = ROOT / "deploy"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _tune_args(tiny_patches, tmp_path) -> list[str]:
    sets = [*FAST, "train.feature_cache=true", f"train.cache_dir={tmp_path}/cache"]
    return ["--study", "deploy", "--patches", str(tiny_patches / "patches"), "--params", str(ROOT / "params.yaml"),
            "--best-out", str(tmp_path / "best.yaml"), "--metrics", str(tmp_path / "tune.json"),
            "--cv-per-type", str(tmp_path / "cv.csv"), "--history", str(tmp_path / "history.csv"),
            "--artifacts", str(tmp_path / "artifacts"), "--ensemble-out", str(tmp_path / "ensemble.yaml"),
            *[a for item in sets for a in ("--set", item)]]


def _finished(storage: str) -> list:
    study = study_named(storage, "deploy")
    return [t for t in study.trials if t.state in FINISHED]


@pytest.mark.slow
def test_local_workers_script_runs_two_workers_on_one_journal_study(tiny_patches, tmp_path):
    storage = f"journal:{tmp_path}/study.journal"
    env = {**os.environ, "WORKERS": "2", "TRIALS": "4", "LOG_DIR": str(tmp_path / "logs"), "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(DEPLOY / "local-workers.sh"), storage, *_tune_args(tiny_patches, tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker 0: pid" in result.stdout and "worker 1: pid" in result.stdout, result.stdout
    finished = _finished(storage)
    assert 4 <= len(finished) <= 5
    assert len({t.user_attrs["worker"]["pid"] for t in finished}) == 2
    assert (tmp_path / "best.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["worker-0.log", "worker-1.log"]


@pytest.mark.slow
def test_slurm_array_task_runs_a_worker(postgres_url, tiny_patches, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"  # inside an allocation srun starts the task; here it just runs it
    srun.write_text('#!/bin/sh\nwhile [ "${1#-}" != "$1" ]; do shift; done\nexec "$@"\n')  # drop srun options
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
           "SLURM_CPUS_PER_TASK": "1", "TMPDIR": str(tmp_path), "TRIALS": "2", "OPTUNA_STORAGE": postgres_url,
           "PYTHON": sys.executable}
    script = str(DEPLOY / "slurm-tune-array.sbatch")
    result = subprocess.run(["bash", script, *_tune_args(tiny_patches, tmp_path)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_finished(postgres_url)) == 2
    missing = subprocess.run(["bash", script], env={k: v for k, v in env.items() if k != "OPTUNA_STORAGE"},
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "set OPTUNA_STORAGE" in missing.stderr


def test_slurm_directives_request_one_gpu_per_array_task():
    directives = [line.split(None, 1)[1] for line in (DEPLOY / "slurm-tune-array.sbatch").read_text().splitlines()
                  if line.startswith("#SBATCH")]
    assert "--gres=gpu:1" in directives and any(d.startswith("--array=") for d in directives)


def test_kubernetes_job_runs_the_tune_cli_with_the_shared_storage():
    job = yaml.safe_load((DEPLOY / "k8s-tune-job.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["parallelism"] == job["spec"]["completions"] >= 2
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "src.tune"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in container["env"]}
    assert env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"]["key"] == "url"
    args = [a.replace("$(OPTUNA_STORAGE)", "postgresql://u@h/db") for a in container["args"]]
    parsed = tune.build_parser().parse_args(args)  # every argument is one the CLI takes
    assert parsed.storage == "postgresql://u@h/db" and parsed.trials >= 1
    apply_overrides(read_raw(ROOT / "params.yaml"), parsed.set)  # and every --set is a real param
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(parsed.patches).startswith(tuple(mounts)) and str(parsed.artifacts).startswith(tuple(mounts))
