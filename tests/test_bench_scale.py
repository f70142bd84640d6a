"""``python -m src.bench scale`` runs every stage command as a user runs it and prints its costs."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_scale_bench_runs_every_stage_at_a_small_scale(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "src.bench", "scale", "--scales", "300x32", "--work", str(tmp_path),
         "--set", "model.backbone=resnet10t", "--set", "model.unfrozen_blocks=1", "--set", "train.epochs=2",
         "--set", "tune.space.model.unfrozen_blocks={low: 0, high: 1}", "--set", "simulate.tissue_extent=[0.8, 1.1]"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    for stage in ("simulate", "validate", "normalize", "patches", "feature cache build", "one cached trial",
                  "retrain", "evaluate"):
        assert f"  {stage}" in run.stdout, stage
    assert (tmp_path / "300px-32" / "out" / "submission.csv").is_file()
