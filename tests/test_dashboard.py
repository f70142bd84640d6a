"""optuna-dashboard serves a study made here: trials, values and artifacts over HTTP, and in Chromium."""
import json
import os
import shutil
import subprocess

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, upload_artifact

from tests.helpers import http_get, start_dashboard


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dash")
    storage = f"sqlite:///{folder}/studies.db"
    store = FileSystemArtifactStore(str(folder / "artifacts"))
    (folder / "artifacts").mkdir()
    study = optuna.create_study(study_name="dash-study", storage=storage, direction="maximize")

    def objective(trial):
        x = trial.suggest_float("loss.alpha", 0, 1)
        table = folder / f"oof{trial.number}.csv"
        table.write_text(f"spot,C1\n0,{x}\n")
        upload_artifact(artifact_store=store, file_path=str(table), study_or_trial=trial)
        return 1 - (x - 0.3) ** 2

    study.optimize(objective, n_trials=3)
    proc, base = start_dashboard(storage, folder / "artifacts")
    yield base, study, folder
    proc.terminate()
    proc.wait(timeout=10)


def test_dashboard_api_lists_the_study_trials_values_and_artifacts(dashboard):
    base, study, folder = dashboard
    studies = json.loads(http_get(f"{base}/api/studies"))["study_summaries"]
    summary = next(s for s in studies if s["study_name"] == "dash-study")
    detail = json.loads(http_get(f"{base}/api/studies/{summary['study_id']}?after=0"))
    trials = detail["trials"]
    assert len(trials) == 3
    assert [t["values"][0] for t in trials] == pytest.approx([t.value for t in study.trials])
    for trial in trials:
        assert len(trial["artifacts"]) == 1
        artifact = trial["artifacts"][0]
        body = http_get(f"{base}/artifacts/{summary['study_id']}/{trial['trial_id']}/{artifact['artifact_id']}")
        assert body == (folder / f"oof{trial['number']}.csv").read_bytes()


def test_dashboard_page_lists_the_study_in_headless_chromium(dashboard, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        message = "chromium is not installed (make test installs it where apt-get is available)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs it: a missing browser is a broken set-up, not a skip
        pytest.skip(message)
    base, _, _ = dashboard
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         f"--user-data-dir={tmp_path}", "--virtual-time-budget=20000", "--dump-dom", f"{base}/dashboard"],
        capture_output=True, text=True, timeout=120,
    )
    assert "dash-study" in result.stdout, result.stderr[-2000:]
