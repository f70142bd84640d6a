"""Comparing runs with `dvc exp`: experiments run directly and from the queue carry their metrics, the
tuned recipe and a link to their study; queued ones keep their studies and reuse one feature cache."""
import json
import os
import shutil
import subprocess
import time

import numpy as np
import optuna
import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.dvc_repo import SMALL, make_repo
from tests.dvc_repo import run_ok as _run

pytestmark = pytest.mark.slow
# One change the study searches (its warm-started recipes may win over it and deliver what the baseline
# did) and one it neither searches nor pretrains with (every trial's head changes, the fold backbones not).
DIRECT = {"alpha05": "loss.alpha=0.5", "coord8": "model.coord_dim=8"}
QUEUED = {"q-epochs2": "train.epochs=2", "q-alpha02": "loss.alpha=0.2"}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory):
    path, env = make_repo(tmp_path_factory.mktemp("experiments") / "repo", SMALL)
    _run(["dvc", "repro"], path, env)
    _run(["git", "add", "-A"], path, env)
    _run(["git", "commit", "-qm", "baseline"], path, env)
    for name, override in DIRECT.items():
        _run(["dvc", "exp", "run", "-n", name, "-S", override], path, env)
    for name, override in QUEUED.items():
        _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", override], path, env)
    _run(["dvc", "queue", "start", "-j", "1"], path, env)
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            status = _run(["dvc", "queue", "status"], path, env)
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(5)
        assert "Failed" not in status, status + _run(["dvc", "queue", "logs", "q-epochs2"], path, env)
    finally:
        _run(["dvc", "queue", "stop", "--kill"], path, env)
    shown = json.loads(_run(["dvc", "exp", "show", "--json"], path, env))
    return path, env, shown


def _rows(shown: list) -> dict[str, dict]:
    """Experiment name (or baseline/workspace rev) -> its data from `dvc exp show --json`."""
    rows = {}
    for baseline in shown:
        rows[baseline["name"] or baseline["rev"]] = baseline["data"]
        for exp in baseline.get("experiments") or []:
            for rev in exp["revs"]:
                rows[rev["name"]] = rev["data"]
    return rows


def test_every_experiment_shows_its_metrics_and_tuned_recipe(experiments):
    _, _, shown = experiments
    rows = _rows(shown)
    assert set(DIRECT) | set(QUEUED) <= set(rows), sorted(rows)
    for name, data in rows.items():
        evaluate = data["metrics"]["metrics/evaluate.json"]["data"]
        for key in ("cv_spearman", "test_spearman", "floor_spearman", "skill"):
            assert isinstance(evaluate[key], float), (name, key)
        tune = data["metrics"]["metrics/tune.json"]["data"]
        assert tune["study"].startswith("default-") and tune["cv_spearman"] == evaluate["cv_spearman"]
        assert isinstance(tune["biased_upward"]["best_trial_cv_spearman"], float)  # named as what it is
        best = data["params"]["studies/best_params.yaml"]["data"]
        assert best["study"] == tune["study"] and set(best["params"]) >= {"loss.alpha", "model.fusion"}
        # which was delivered, the best trial or an ensemble of trials, is a column of its own
        assert best["delivered"] == tune["delivered"] and best["delivered"].startswith(("best trial", "ensemble"))
        assert tune["delivered_members"] == (1 if best["delivered"].startswith("best trial") else
                                             best["delivered"].count("("))
    assert rows["alpha05"]["params"]["params.yaml"]["data"]["loss"]["alpha"] == 0.5
    assert rows["q-epochs2"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 2


def test_metrics_diff_between_two_experiments_gives_numbers(experiments):
    path, env, _ = experiments
    # --all: the tiny recipe's models barely leave the mean profile, so two experiments may tie on the
    # test slide's 45 spots; the diff still gives both numbers
    diff = json.loads(_run(["dvc", "metrics", "diff", "alpha05", "coord8", "--all", "--json"], path, env))
    evaluate = diff["metrics/evaluate.json"]
    assert isinstance(evaluate["test_spearman"]["old"], float) and isinstance(evaluate["test_spearman"]["new"], float)


def test_queued_experiments_keep_their_studies_and_share_one_feature_cache(experiments):
    path, _, shown = experiments
    rows = _rows(shown)
    storage = f"sqlite:///{path}/studies/studies.db"
    studies = {name: optuna.load_study(study_name=name, storage=storage)
               for name in optuna.get_all_study_names(storage)}
    for name in (*DIRECT, *QUEUED):
        study = studies[rows[name]["metrics"]["metrics/tune.json"]["data"]["study"]]
        assert name in [e["name"] for e in study.user_attrs["dvc_experiments"]], name
        assert any(t.user_attrs.get("dvc_experiment") == name for t in study.trials), name
    assert len(studies) >= 1 + len(DIRECT) + len(QUEUED)  # the baseline's and one per changed recipe
    # Every run, queued ones included, read the one cache folder. No experiment changed what the
    # backbone's pretraining depends on, so all share one backbone per fold (2 folds), and one feature
    # cache per cut, context and fold backbone, each built once, all of the same data and variants.
    assert len(list((path / "cache" / "features" / "backbones").glob("*.pt"))) == 2
    keys = [json.loads(m.read_text())["key"] for m in (path / "cache" / "features").glob("*/meta.json")]
    assert keys and len({(k["cut"], k["context"], k["weights"]) for k in keys}) == len(keys), keys
    per_cut = {}
    for k in keys:
        per_cut.setdefault((k["cut"], k["context"]), set()).add(k["weights"])
    assert all(len(weights) <= 2 for weights in per_cut.values()), per_cut
    assert len({json.dumps({f: v for f, v in k.items() if f not in ("cut", "context", "weights")}, sort_keys=True)
                for k in keys}) == 1, keys
    assert not list((path / ".dvc" / "tmp" / "exps").glob("*/studies/*.db"))  # nothing left in the copies


def test_make_exps_shows_results_and_the_tuned_recipe_without_the_search_space(experiments):
    path, env, shown = experiments
    table = _run(["make", "-s", "exps"], path, env)
    header = " ".join(table.splitlines()[:4])
    rows = _rows(shown).values()
    for column in ("test_spearman", "skill", "cv_spearman"):  # results, where any row differs (--only-changed)
        values = {r["metrics"]["metrics/evaluate.json"]["data"][column] for r in rows}
        assert (column in table) == (len(values) > 1), (column, values)
    for column in ("cv_spearman", "params.loss.alpha", "alpha05", "q-epochs2"):
        assert column in table, column
    assert "tune.space" not in header and "src/" not in header and "data/patches" not in header


def test_dvc_plots_diff_of_two_experiments_renders_in_headless_chromium(experiments, tmp_path):
    """The page `dvc plots diff` writes, with the offline vega copy set-up keeps, drawn by a real browser:
    per-type CV and test bars and the optimization history for both experiments, and their pictures."""
    template = ROOT / ".venv" / "share" / "vega" / "offline.html"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or not template.is_file():
        message = "chromium or the offline vega copy is missing (make test installs both)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    path, env, _ = experiments
    out = tmp_path / "plots"
    _run(["dvc", "plots", "diff", "alpha05", "coord8", "-o", str(out), "--html-template", str(template)], path, env)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
             f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files",
             "--virtual-time-budget=15000"]
    page = f"file://{out / 'index.html'}"
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="marks"') == 3, dom[-2000:]  # vega drew all three charts
    for rev in ("alpha05", "coord8"):
        for picture in ("plots_maps_S_3.png", "plots_per_type_spearman.png"):  # a map per test slide
            assert f'src="static/{rev}_{picture}"' in dom, picture
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1400,1800", f"--screenshot={shot}", page], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels[:900].std() > 20  # bars and axes, not a blank page
