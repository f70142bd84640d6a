"""A throwaway git + DVC repository holding this project's pipeline, with its params shrunk for tests."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

SMALL = {  # tiny slides, backbone and patches: a whole `dvc repro` in about a minute
    "simulate": {"size": 240, "n_train": 2, "n_test": 1},
    "stain": {"fit_pixels": 20000},
    "patches": {"size": 32},
    "model": {"backbone": "resnet10t", "input_size": 32, "context": 1.0, "unfrozen_blocks": 1, "hidden": 64},
    "train": {"epochs": 1, "batch_size": 16},
    "pretrain": {"epochs": 1},
    "cv": {"n_folds": 2},
    "infer": {"tta": ["identity", "hflip"]},
    "tune": {"trials": 2},
}


def run_ok(args, cwd, env) -> str:
    """Run a command; fail the test with its output unless it exits 0; stdout + stderr."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def make_repo(repo: Path, small: dict) -> tuple[Path, dict]:
    """A git + DVC repo at ``repo`` with this project's stages, code and plot template, params shrunk."""
    repo.mkdir(parents=True)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore", ".dvcignore", "data/.gitignore", "Makefile"):
        (repo / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, repo / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in small.items():
        params[section].update(values)
    params["tune"]["space"]["model"]["context"] = {"choices": [1.0]}  # the small recipe: one crop, one cache
    params["tune"]["space"]["train"]["epochs"] = {"low": 1, "high": 2}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1")
    run_ok(["git", "init", "-q"], repo, env)
    run_ok(["dvc", "init", "-q"], repo, env)
    shutil.copytree(ROOT / ".dvc" / "plots", repo / ".dvc" / "plots")
    return repo, env
