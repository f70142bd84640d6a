"""``python -m src.bench search`` end to end on tiny simulated slides: data built by the stage entry
points, the hand-set recipe and every complete trial scored on the test slide, what train would
deliver scored from those predictions, the table printed, a rerun scored without training."""
import json
from dataclasses import asdict

import numpy as np
import pytest

from src.bench.search import bench_search
from src.bench.search_results import Delivery, SeedResult, load_result, print_stored_results
from src.core.errors import InputError
from tests.conftest import FAST, ROOT

TINY_DATA = ["simulate.size=240", "simulate.n_train=2", "simulate.n_test=1", "simulate.tissue_extent=[0.8, 1.1]",
             "stain.fit_pixels=20000", "patches.size=32", "tune.warm_start=0"]


@pytest.mark.slow
def test_search_bench_scores_hand_set_and_trials_on_the_test_slide_of_both_families(tmp_path, capsys):
    results = bench_search(["compartments", "cells"], [3], ROOT / "params.yaml", [*TINY_DATA, *FAST, "train.epochs=2"],
                           tmp_path, trials=3, replay=True)
    assert [r.family for r in results] == ["compartments", "cells"]
    for r in results:
        assert r.hand_set > r.floor and r.tuned > r.floor  # both recipes beat the training mean profile on the test slide
        assert r.ceiling > r.tuned and 0 < r.skill < 1
        assert r.ceiling > r.plain > r.floor - 0.2  # the plain peer trained and was scored on the same slide
        assert r.n_complete == 3 and r.n_pruned == 0  # --replay: unpruned, every trial scored on the test slide
        assert np.isfinite(r.correlation)  # three distinct trials ranked by CV and by the test slide
        assert {x.pruner for x in r.replay} == {"wilcoxon", "median", "hyperband"}
        assert (tmp_path / f"{r.family}-seed3" / "patches" / "meta.json").is_file()  # rerunning reuses the data
        d = r.delivered
        assert d.budget == 3 and d.delivered in ("single", "ensemble") and 1 <= d.members <= 3
        assert d.delivered_test == (d.ensemble_test if d.delivered == "ensemble" else d.best_trial_test)
        assert d.best_trial_test == pytest.approx(r.tuned, abs=1e-6)  # the saved predictions score as the trial did
        assert r.gain == pytest.approx(d.delivered_test - r.hand_set)
        assert -1 < r.map_floor < r.map_ceiling <= 1 and -1 < d.delivered_test_map < 1 and -1 < d.delivered_cv_map < 1
    out = capsys.readouterr().out
    assert ("hand-set recipe vs what the search delivers, on the test slide (3 trials per study; defaults chosen on "
            "family compartments)") in out
    assert "compartments (defaults chosen here, 1 data sets): mean gain" in out
    assert "cells (held out, 1 data sets): mean gain" in out
    assert "beats the plain ResNet-18" in out
    gain = results[1].gain  # per budget the study reached: here only its whole size
    assert f"cells after 3 trials: mean gain {gain:+.4f}, worst {gain:+.4f}, delivered beats hand-set {int(gain > 0)} of 1" in out

    again = bench_search(["cells"], [3], ROOT / "params.yaml", [*TINY_DATA, *FAST, "train.epochs=2"], tmp_path,
                         trials=3, replay=True)  # the finished study, its predictions and the peer are reused
    assert again[0].delivered == results[1].delivered and again[0].plain == results[1].plain


def test_report_prints_a_finished_runs_rows_from_its_work_folder(tmp_path, capsys):
    def row(family, hand_set, at_16, at_40):
        deliveries = [Delivery(budget=b, best_trial=3, best_trial_test=t, cv_best_trial=0.7, ensemble_test=t,
                               cv_ensemble=0.71, nested_single=0.69, nested_ensemble=0.7, members=2,
                               delivered="single", delivered_test=t, delivered_cv=0.69, delivered_cv_map=0.3,
                               delivered_test_map=0.35) for b, t in ((16, at_16), (40, at_40))]
        return SeedResult(family=family, seed=5, hand_set=hand_set, tuned=at_40, plain=0.65, correlation=0.8,
                          n_complete=30, n_pruned=10, best_trial=3, floor=0.5, ceiling=0.9, minutes=1.0,
                          deliveries=deliveries, map_floor=0.05, map_ceiling=0.8)

    for family, r in (("compartments", row("compartments", 0.70, 0.72, 0.73)), ("cells", row("cells", 0.60, 0.64, 0.62))):
        (tmp_path / f"{family}-seed5").mkdir()
        (tmp_path / f"{family}-seed5" / "result.json").write_text(json.dumps(asdict(r)))
        assert load_result(tmp_path / f"{family}-seed5" / "result.json") == r
    print_stored_results(tmp_path, ["compartments", "cells"], [5])
    out = capsys.readouterr().out
    assert "(40 trials per study; defaults chosen on family compartments)" in out
    assert "cells (held out, 1 data sets): mean gain +0.0200" in out  # the whole study: 0.62 - 0.60
    assert "cells after 16 trials: mean gain +0.0400, worst +0.0400, delivered beats hand-set 1 of 1" in out
    assert "compartments after 40 trials: mean gain +0.0300" in out
    assert "mean map score 0.3500 (floor 0.0500)" in out and "0.3000 / 0.3500" in out
    with pytest.raises(InputError, match="cells-seed6/result.json: no result"):
        print_stored_results(tmp_path, ["cells"], [6])
