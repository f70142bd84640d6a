"""The whole-slide prediction benchmark writes a scanner slide with tissue on glass, predicts it with a
checkpoint through the real path and prints its figures."""
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, write_tiny_checkpoint

COLUMNS = ("slide edge (px)", "level 0 (Mpx)", "spots", "plan (s)", "cut (s)", "predict (s)", "total (s)",
           "spots/s whole path", "spots/s model only", "outside the model (%)", "peak memory (MB)")


@pytest.mark.slow
def test_the_wsi_benchmark_predicts_a_slide_and_prints_its_figures(tmp_path):
    model = write_tiny_checkpoint(tmp_path / "model.pt", None, "model.neighbour_radius=1.2")
    run = subprocess.run([sys.executable, "-m", "src.bench", "wsi", "--edges", "3000", "--um-per-px", "0.25",
                          "--model", str(model), "--work", str(tmp_path / "work")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "COLUMNS": "250"}, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Predicting an H&E whole slide at 0.25 um/px" in run.stdout
    for column in COLUMNS:
        assert column in run.stdout, column
    row = next(line for line in run.stdout.splitlines() if line.startswith("│") and "3,000" in line)
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert len(cells) == len(COLUMNS), cells
    figures = dict(zip(COLUMNS, cells))
    assert figures["level 0 (Mpx)"] == "9" and int(figures["spots"].replace(",", "")) > 0, figures
    assert float(figures["total (s)"]) >= float(figures["predict (s)"]) > 0, figures
    assert 0 <= float(figures["outside the model (%)"]) < 100 and float(figures["peak memory (MB)"]) > 50, figures
