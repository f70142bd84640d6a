"""The prepared GPU check, dry-run on the CPU: it refuses cleanly without a GPU, and its steps run."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_the_check_says_there_is_no_gpu_and_exits_1():
    run = subprocess.run(["bash", "deploy/gpu_check.sh"], cwd=ROOT, env={**NO_GPU, "PYTHON": sys.executable},
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert run.stderr.strip().count("\n") == 0 and "sees no CUDA device on this machine" in run.stderr
    direct = subprocess.run([sys.executable, "-m", "src.bench.gpu_check"], cwd=ROOT, env=NO_GPU, capture_output=True,
                            text=True)
    assert direct.returncode == 1 and "sees no CUDA device" in direct.stderr and "Traceback" not in direct.stderr


@pytest.mark.slow
def test_every_step_of_the_check_runs_on_the_cpu_at_a_small_scale(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "src.bench.gpu_check", "--allow-cpu", "--work", str(tmp_path), "--size", "300", "--patch", "32",
         "--trials", "2", "--set", "model.backbone=resnet10t", "--set", "model.unfrozen_blocks=1",
         "--set", "tune.space.model.unfrozen_blocks={low: 0, high: 1}", "--set", "simulate.tissue_extent=[0.8, 1.1]",
         "--vit-arg", "depth=2", "--vit-arg", "embed_dim=32", "--vit-arg", "num_heads=2"],
        cwd=ROOT, env=NO_GPU, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for stage in ("simulate", "normalize", "patches", "feature cache build", "study, 2 cached trials",
                  "one uncached trial", "train", "evaluate", "ViT-L/16 (uni preset, random weights): pooled feature cache",
                  "ViT-L/16 study, 2 cached trials"):
        assert f"gpu-check: {stage}" in run.stdout, stage
    assert "projection, python -m src.tune --trials 100" in run.stdout
    assert "projection, the same with model.backbone=uni" in run.stdout
    metrics = json.loads((tmp_path / "out" / "evaluate.json").read_text())
    assert metrics["test_spearman"] > metrics["floor_spearman"]  # the delivered model beats the mean profile
