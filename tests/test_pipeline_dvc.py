"""The DVC pipeline end to end in a throwaway repo: repro, no-op repro, partial rerun, push/pull."""
import filecmp
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.dvc_repo import SMALL, make_repo
from tests.dvc_repo import run_ok as _run

pytestmark = pytest.mark.slow

STAGES = ("simulate", "normalize", "patches", "tune", "train", "evaluate")
ALWAYS = ["truth"]  # the truth file's record runs on every repro (DVC has no optional dependency)


def _ran(output: str) -> list[str]:
    """The stages a repro ran, sorted (independent stages run in no fixed order)."""
    return sorted(re.findall(r"Running stage '(\w+)'", output))


def _files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("pipeline") / "repo", SMALL)


def test_repro_then_noop_then_only_changed_stages(repo):
    path, env = repo
    first = _run(["dvc", "repro"], path, env)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in first
    assert (path / "data/patches/train_crops.npy").is_file()
    metrics = json.loads((path / "metrics/evaluate.json").read_text())
    assert {"cv_spearman", "test_spearman", "floor_spearman", "ceiling_spearman", "skill"} <= set(metrics)
    submission = (path / "outputs/submission.csv").read_text().splitlines()
    assert submission[0].startswith("ID,C1,") and len(submission) > 10

    second = _run(["dvc", "repro"], path, env)
    assert _ran(second) == ALWAYS

    # A lab's own truth file, then the same file replaced in place with other labels: the test scores are
    # computed again (evaluate depends on the file's content, not only on its name in params.yaml).
    import shutil

    import h5py
    shutil.copy(path / "data/simulated_truth.h5", path / "data/labels.h5")
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["data"]["truth"] = "data/labels.h5"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_run(["dvc", "repro"], path, env)) == sorted(ALWAYS + ["normalize", "evaluate"])  # normalize checks it
    assert json.loads((path / "metrics/evaluate.json").read_text())["test_spearman"] == metrics["test_spearman"]
    with h5py.File(path / "data/labels.h5", "r+") as h5:
        observed = h5["Test/S_3/observed"]
        observed[...] = observed[()][:, ::-1]  # other labels: the cell types in reverse
    assert _ran(_run(["dvc", "repro"], path, env)) == sorted(ALWAYS + ["evaluate"])
    assert json.loads((path / "metrics/evaluate.json").read_text())["test_spearman"] != metrics["test_spearman"]
    params["data"]["truth"] = "data/simulated_truth.h5"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    params = yaml.safe_load((path / "params.yaml").read_text())
    params["stain"]["method"] = "macenko"
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], path, env)
    assert "Running stage 'simulate'" not in third
    for stage in STAGES[1:]:  # everything downstream of the normalized slides
        assert f"Running stage '{stage}'" in third

    params["train"]["epochs"] = 2  # not read by the data stages
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = _run(["dvc", "repro"], path, env)
    for stage in ("simulate", "normalize", "patches"):
        assert f"Running stage '{stage}'" not in fourth
    for stage in ("tune", "train", "evaluate"):
        assert f"Running stage '{stage}'" in fourth


def test_patches_push_to_a_remote_and_pull_byte_identical_into_a_fresh_clone(repo, tmp_path):
    path, env = repo
    _run(["dvc", "repro"], path, env)
    remote = tmp_path / "remote"
    _run(["dvc", "remote", "add", "-d", "team", str(remote)], path, env)
    _run(["git", "add", "-A"], path, env)
    _run(["git", "commit", "-qm", "pipeline"], path, env)
    _run(["dvc", "push"], path, env)

    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(path), str(clone)], tmp_path, env)
    assert not (clone / "data/patches").exists()
    _run(["dvc", "pull"], clone, env)
    for folder in ("data/patches", "data/normalized"):
        files = _files(path / folder)
        assert files and files == _files(clone / folder)
        for name in files:
            assert filecmp.cmp(path / folder / name, clone / folder / name, shallow=False), name
    status = _run(["dvc", "status"], clone, env)
    assert status.split() == ["truth:", "always", "changed"], status


def test_truthless_data_the_way_the_readme_says_then_a_noop_repro(repo, tmp_path):
    """A file without a truth file, as the competition's: `dvc add` it, point data.h5 at it, set
    data.truth to "", `dvc repro`: every stage runs, every declared output exists, the metrics are the
    CV figures, the shifted training slide is registered; a second `dvc repro` runs nothing."""
    from src.core.sections import SimulateConfig
    from src.data.simulators.compartments import simulate, write_layout

    path, env = repo
    cfg = SimulateConfig(seed=3, n_train=2, n_test=1, size=400, pitch=25.0, n_types=35, tissue_extent=[0.8, 1.1],
                         offsets=[[-30, 20], [0, 0]])
    slides, names = simulate(cfg)
    write_layout(slides, names, path / "data" / "mine.h5", tmp_path / "truth_kept_elsewhere.h5", cfg.seed)
    _run(["dvc", "add", "data/mine.h5"], path, env)
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["data"] = {"h5": "data/mine.h5", "truth": ""}
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    first = _run(["dvc", "repro"], path, env)
    for stage in ("normalize", "patches", "tune", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((path / "metrics/evaluate.json").read_text())
    assert set(metrics) == {"cv_spearman", "cv_floor_spearman", "cv_map_spearman", "cv_map_floor_spearman",
                            "n_test_spots"}
    assert metrics["cv_spearman"] > metrics["cv_floor_spearman"] > 0  # the delivered model beats the mean profile
    for output in ("plots/maps/S_3.png", "plots/per_type_spearman.png", "metrics/per_type.csv",
                   "metrics/cv_per_type.csv", "outputs/submission.csv", "studies/best_params.yaml"):
        assert (path / output).is_file(), output
    assert len((path / "outputs/submission.csv").read_text().splitlines()) == metrics["n_test_spots"] + 1
    meta = json.loads((path / "data/patches/meta.json").read_text())
    assert max(abs(a - b) for a, b in zip(meta["offsets"]["S_1"], [-30, 20])) <= 12, meta["registration"]["S_1"]
    assert meta["registration"]["S_1"]["source"] == "estimated"
    assert "Train/S_1: offset [" in first

    second = _run(["dvc", "repro"], path, env)
    assert _ran(second) == ALWAYS
    _run(["git", "check-ignore", "-q", "data/mine.h5"], path, env)  # the data file is DVC's, not git's
    assert (path / "data/mine.h5.dvc").is_file()


def test_a_clone_at_another_path_reproduces_the_committed_pipeline_byte_for_byte(tmp_path):
    """What a newcomer meets: clone a repo whose pipeline ran and was committed, at another path, and
    `dvc repro`: the study is not run again (its outputs are committed), the model is trained again
    without a study, and it writes the same bytes, so `git status` stays clean."""
    first, env = make_repo(tmp_path / "first" / "repo", SMALL)
    _run(["dvc", "repro"], first, env)
    _run(["git", "add", "-A"], first, env)
    _run(["git", "commit", "-qm", "pipeline"], first, env)
    clone = tmp_path / "elsewhere" / "a-clone"
    _run(["git", "clone", "-q", str(first), str(clone)], tmp_path, env)
    ran = _run(["dvc", "repro"], clone, env)
    assert "Stage 'tune' didn't change, skipping" in ran and "Running stage 'train'" in ran
    assert filecmp.cmp(first / "models/model.pt", clone / "models/model.pt", shallow=False)
    assert _run(["git", "status", "--porcelain"], clone, env) == ""
