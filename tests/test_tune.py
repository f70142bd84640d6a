"""The Optuna study: space parsing, suggest, enqueue, pruning, failures, resume, dashboard."""
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import optuna
import pytest
import torch
import yaml
from optuna.trial import FixedTrial, TrialState

from src.core.config import apply_overrides, read_raw
from src.core.errors import InputError
from src.data.preprocessing.patch_set import load_patch_set
from src.engine.cross_validation import cross_validate
from src.search import objective
from src.search.objective import InterruptFlag
from src.search.space import defaults, parse_space, suggest
from src.search.study import enqueue_defaults, run_study, stored_study_name
from tests.conftest import FAST, ROOT


def base_raw(*overrides):
    return apply_overrides(read_raw(ROOT / "params.yaml"), [*FAST, *overrides])


@pytest.fixture(scope="module")
def train_set(tiny_patches):
    return load_patch_set(tiny_patches / "patches", "train")


@pytest.mark.parametrize("key, spec, message", [
    ("loss.alfa", {"low": 0, "high": 1}, "tune.space.loss.alfa: unknown field"),
    ("optim.lr", {"low": 0, "high": 1}, "unknown section 'optim'"),
    ("stain.method", {"choices": ["macenko"]}, "stain.* cannot be searched"),
    ("loss.alpha", {"low": 1, "high": 0}, "low <= high"),
    ("loss.alpha", {"low": 0}, "a range needs low and high"),
    ("loss.alpha", {"low": 0, "high": 1, "scale": 2}, "a range needs low and high"),
    ("train.lr_head", {"low": 0, "high": 1, "log": True}, "log ranges need low > 0"),
    ("model.unfrozen_blocks", {"low": 0.5, "high": 3}, "integer field"),
    ("train.lr_head", {"low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}, "log and step = 0.0001 together"),
    ("train.epochs", {"low": 1, "high": 8, "log": True, "step": 2}, "only with step 1"),
    ("train.epochs", {"low": 1, "high": 8, "step": 0.5}, "step = 0.5: expected a positive integer"),
    ("loss.alpha", {"low": 0, "high": 1, "step": 0}, "step = 0: expected a positive number"),
    ("loss.alpha", {"low": 0, "high": 1, "log": "yes"}, "log = 'yes': expected true or false"),
    ("model.fusion", {"low": 0, "high": 1}, "a name field needs {choices"),
    ("model.fusion", {"choices": [1, 2]}, "choice 1 is not a valid name"),
    ("model.fusion", {"choices": ["product", "sum"]},
     "choice 'sum' is not a valid value (model.fusion = 'sum': choose product, concat, film, gated, none)"),
    ("loss.alpha", {"low": 0, "high": 1.5}, "range end 1.5 is not a valid value (loss.alpha = 1.5: must be <= 1)"),
    ("model.backbone", {"choices": [3]}, "choice 3 is not a valid str"),
    ("model.fusion", {"choices": []}, "non-empty list"),
    ("infer.tta", {"choices": ["identity"]}, "not a valid"),
    ("infer.smoothing_sigma", {"low": 0, "high": 60}, "cannot be searched: every trial scores its out-of-fold"),
    ("cv.n_folds", {"low": 2, "high": 5}, "cannot be searched: the CV is the yardstick"),
    ("train.color_jitter", {"low": 0, "high": 0.2}, "cannot be searched: the feature cache fixes"),
    ("train.final", {"choices": ["ensemble", "retrain"]}, "cannot tell ensemble from retrain"),
])
def test_space_errors_name_the_key(key, spec, message):
    section, field = key.split(".")
    with pytest.raises(InputError, match=re.escape(message)):
        parse_space({section: {field: spec}})
    with pytest.raises(InputError, match="tune.space.loss: expected field: spec entries"):
        parse_space({"loss": 0.5})


def test_hand_set_value_outside_the_space_is_an_error():
    raw = base_raw()
    space = parse_space({"loss": {"alpha": {"low": 0.0, "high": 0.5}}})
    with pytest.raises(InputError, match="loss.alpha = 0.85 lies outside tune.space.loss.alpha"):
        defaults(space, raw)


def test_suggest_builds_typed_configs_and_fixed_trial_rebuilds_them():
    raw = base_raw()
    space = parse_space(raw["tune"]["space"])
    values = {"loss.alpha": 0.3, "model.unfrozen_blocks": 2, "train.lr_head": 0.002, "train.lr_backbone": 1e-4,
              "model.fusion": "film", "train.weight_decay": 1e-3, "model.context": 0.5, "train.epochs": 2,
              "model.dropout": 0.1, "loss.target_transform": "rank", "model.neighbour_radius": 1.2}
    params = suggest(FixedTrial(values), space, raw)
    assert params.loss.alpha == 0.3 and params.model.unfrozen_blocks == 2 and params.model.fusion == "film"
    assert params.model.neighbour_radius == 1.2
    assert params.loss.target_transform == "rank" and params.model.context == 0.5 and params.train.epochs == 2
    assert params.model.backbone == "resnet10t"  # unsearched values come from params.yaml
    # loss.log_epsilon acts only on log targets: a rank trial has none (FixedTrial would raise otherwise)
    assert "loss.log_epsilon" not in values and params.loss.log_epsilon == raw["loss"]["log_epsilon"]


def test_conditional_params_are_sampled_only_where_they_act():
    raw = base_raw("tune.pruner=none")
    space = parse_space(raw["tune"]["space"])
    names = [p.name for p in space]
    assert names.index("model.unfrozen_blocks") < names.index("train.lr_backbone")  # parents first
    assert names.index("loss.target_transform") < names.index("loss.log_epsilon")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        suggest(trial, space, raw)
        study.tell(trial, 0.0)
    for t in study.trials:
        assert ("train.lr_backbone" in t.params) == (t.params["model.unfrozen_blocks"] > 0), t.params
        assert ("loss.log_epsilon" in t.params) == (t.params["loss.target_transform"] == "log"), t.params
    assert {t.params["model.unfrozen_blocks"] for t in study.trials} >= {0, 1}
    hand_frozen = base_raw("model.unfrozen_blocks=0", "loss.target_transform=rank")
    assert {"train.lr_backbone", "loss.log_epsilon"}.isdisjoint(defaults(space, hand_frozen))


def test_space_values_no_trial_can_honour_are_an_error_before_the_study(tmp_path, train_set):
    with pytest.raises(InputError, match=r"model.context"):
        _study(tmp_path, base_raw("tune.space.model.context={choices: [1.0, 1.5]}"), 1, train_set)
    with pytest.raises(InputError, match="model.unfrozen_blocks up to 9 .* but resnet10t has 5 blocks"):
        _study(tmp_path, base_raw("tune.space.model.unfrozen_blocks.high=9"), 1, train_set)
    assert not (tmp_path / "s.db").exists() or not optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/s.db")


def test_every_searched_param_changes_what_is_trained_or_scored(train_set):
    raw = base_raw("tune.space.model.backbone={choices: [resnet10t, convnext_atto]}")  # + a backbone list
    space = parse_space(raw["tune"]["space"])
    assert {p.name for p in space} >= {"model.context", "model.backbone", "train.epochs", "loss.log_epsilon"}
    hand_set = defaults(space, raw)
    for p in space:
        a, b = (p.choices[0], p.choices[1]) if p.kind == "categorical" else (p.low, p.high)
        results = [cross_validate(suggest(FixedTrial({**hand_set, p.name: v}), space, raw), train_set,
                                  show_progress=False) for v in (a, b)]
        assert (results[0].score != results[1].score or not np.allclose(results[0].oof, results[1].oof)), p.name


def _study(tmp_path, raw, n_trials, train_set, **kwargs):
    return run_study(raw, train_set, n_trials, "t", f"sqlite:///{tmp_path}/s.db",
                          artifact_dir=tmp_path / "artifacts", live=False, **kwargs)


def test_hand_set_recipe_is_the_first_trial_and_artifacts_are_uploaded(tmp_path, train_set):
    raw = base_raw("tune.pruner=none")
    study = _study(tmp_path, raw, 2, train_set)
    first = study.trials[0]
    assert first.params == defaults(parse_space(raw["tune"]["space"]), raw)
    assert first.user_attrs["hand_set"] is True
    for key in ("fold_spearman", "per_type_spearman", "floor_spearman", "seconds", "epochs_run"):
        assert key in first.user_attrs, key
    assert len(first.user_attrs["fold_spearman"]) == 2
    assert len(list((tmp_path / "artifacts").iterdir())) == 4  # a picture and an OOF table per trial
    again = _study(tmp_path, raw, 2, train_set)  # target reached: nothing more runs
    assert len(again.trials) == 2


def _fail_on_call(monkeypatch, n: int, error: BaseException) -> None:
    """The ``n``-th trial's training raises ``error``; the others train as usual."""
    real, calls = objective.cross_validate, {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(objective, "cross_validate", wrapped)


def test_hand_set_trial_is_queued_by_the_creator_and_again_only_when_interrupted(tmp_path, train_set, monkeypatch):
    _fail_on_call(monkeypatch, 1, KeyboardInterrupt())  # Ctrl-C inside the hand-set trial
    raw = base_raw("tune.pruner=none")
    with pytest.raises(KeyboardInterrupt):
        _study(tmp_path, raw, 2, train_set)
    for _ in range(2):  # two workers joining the study at once must not queue it again
        study = _study(tmp_path, raw, 0, train_set)
    hand_set = [t for t in study.trials if t.user_attrs.get("hand_set")]
    assert [t.state for t in hand_set] == [TrialState.FAIL, TrialState.WAITING]
    study = _study(tmp_path, raw, 2, train_set)
    hand_set = [t for t in study.trials if t.user_attrs.get("hand_set")]
    assert [t.state for t in hand_set] == [TrialState.FAIL, TrialState.COMPLETE]
    assert hand_set[1].params == defaults(parse_space(raw["tune"]["space"]), raw)
    assert sum(t.state == TrialState.COMPLETE for t in study.trials) == 2


@pytest.mark.parametrize("pruner", ["median", "wilcoxon"])
def test_pruning_prunes_a_hopeless_trial_after_its_first_fold(tmp_path, train_set, pruner):
    raw = base_raw("train.epochs=2", "tune.pruner_startup_trials=1", f"tune.pruner={pruner}",
                   "loss.target_transform=log1p")  # a first trial that learns on the tiny slides
    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name=stored_study_name("t", raw, train_set), storage=storage,
                                direction="maximize")
    space = parse_space(raw["tune"]["space"])
    hand_set = defaults(space, raw)
    enqueue_defaults(study, hand_set)
    # Nothing learns: weights stay at their random start, far below the first trial's running score.
    study.enqueue_trial({**hand_set, "train.lr_head": 1e-4, "train.lr_backbone": 1e-5, "model.fusion": "gated",
                         "loss.target_transform": "rank", "loss.alpha": 0.0})
    result = run_study(raw, train_set, 2, "t", storage, artifact_dir=tmp_path / "a", live=False)
    states = [t.state for t in result.trials]
    assert states == [TrialState.COMPLETE, TrialState.PRUNED], [(t.state, t.intermediate_values) for t in result.trials]
    assert result.trials[1].user_attrs["epochs_run"] == 2  # one fold of two, 2 epochs
    assert len(result.trials[1].user_attrs["fold_blocks"]) == 1


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, train_set, monkeypatch):
    _fail_on_call(monkeypatch, 2, RuntimeError("CUDA out of memory (simulated)"))
    study = _study(tmp_path, base_raw("tune.pruner=none"), 3, train_set)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 3
    failed = next(t for t in study.trials if t.state == TrialState.FAIL)
    assert "out of memory" in failed.user_attrs.get("fail_reason", "")


def test_study_name_changes_with_what_a_trial_computes_and_only_that(train_set):
    def name(*overrides, patch_set=train_set):
        return stored_study_name("s", base_raw(*overrides), patch_set)

    a = name()
    run_only = ("tune.trials=40", "tune.timeout_s=5", "tune.storage=journal:x", "tune.heartbeat_s=5",
                "train.cache_dir=/scratch/f", "train.num_workers=4", "train.compile=true", "infer.batch_size=7",
                "data.truth=''", "data.h5=elsewhere.h5", "stain.method=macenko", "patches.size=128")
    assert a == name(*run_only)  # upstream params act through the patch store's content
    for recipe in ("tune.space.loss.alpha.high=0.9", "tune.sampler_seed=5", "train.epochs=3", "loss.alpha=0.5",
                   "infer.smoothing_sigma=0.4", "cv.n_folds=3", "model.fusion=gated"):
        assert a != name(recipe), recipe
    relabelled = replace(train_set, spots=train_set.spots.assign(C1=train_set.spots["C1"] * 2))
    repixelled = replace(train_set, images=np.ascontiguousarray(train_set.images[::-1]))
    assert a != name(patch_set=relabelled) and a != name(patch_set=repixelled)
    assert a == name(patch_set=replace(train_set))  # the same content, another object


def test_code_digest_follows_the_code_a_trial_runs_not_its_comments(tmp_path):
    import shutil

    from src.search.identity import code_digest, trial_modules

    src = tmp_path / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    base = code_digest(src)
    run = set(trial_modules(src))
    assert {"src.engine.fit", "src.model.network", "src.model.losses", "src.model.feature_cache", "src.search.space",
            "src.engine.metrics", "src.model.fusion", "src.data.preprocessing.patch_set"} <= run
    not_run = {"src.search.storage", "src.search.display", "src.bench.search", "src.predict", "src.evaluate",
               "src.data.preprocessing.normalization", "src.data.preprocessing.stain", "src.data.preprocessing.registration", "src.data.preprocessing.patch_extraction",
               "src.data.slides.validation", "src.data.simulators.compartments"}
    assert not not_run & run  # the data stages reach a trial only through the patch store's content
    fusion = src / "model" / "fusion.py"
    text = fusion.read_text()
    fusion.write_text(text.replace('"""Element-wise product', '"""Product, element-wise', 1)
                      .replace("import torch\n", "import torch  # a comment\n", 1))
    assert code_digest(src) == base  # docstrings and comments: same study
    fusion.write_text(text.replace("return image * coord", "return image * coord * 2.0", 1))
    assert code_digest(src) != base  # behaviour: a new study
    fusion.write_text(text)
    (src / "data" / "registration.py").write_text("X = 1\n")  # not run by a trial
    assert code_digest(src) == base


def test_dvc_tune_stage_depends_on_every_module_a_trial_runs():
    from src.search.identity import trial_modules

    deps = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["tune"]["deps"])
    files = {"src/" + m.split(".", 1)[1].replace(".", "/") + ".py" for m in trial_modules()}
    missing = {f for f in files if f not in deps and not any(f.startswith(d + "/") for d in deps)}
    assert not missing, missing


def test_new_data_starts_a_new_study_that_runs_trials_and_says_why(tmp_path, train_set):
    raw = base_raw("tune.pruner=none")
    lines = []
    first = _study(tmp_path, raw, 1, train_set, log=lines.append)
    assert lines[-1] == f"study {first.study_name}: new"
    again = _study(tmp_path, raw, 1, train_set, log=lines.append)
    assert again.study_name == first.study_name and lines[-1].endswith("resuming (1 finished trials)")
    relabelled = replace(train_set, spots=train_set.spots.assign(C2=train_set.spots["C2"][::-1].to_numpy()))
    second = _study(tmp_path, raw, 1, relabelled, log=lines.append)
    assert second.study_name != first.study_name
    assert sum(t.state == TrialState.COMPLETE for t in second.trials) == 1  # measured anew, not reused
    assert lines[-1] == (f"study {second.study_name}: new; changed since study {first.study_name}: "
                         "the training data (patch store)")
    assert second.user_attrs["data"] == relabelled.digest() and "torch" in second.user_attrs["versions"]


def test_best_params_rebuild_the_best_config(tmp_path):
    from src.search.recipe import params_for_best

    raw = base_raw()
    best = tmp_path / "best.yaml"
    values = defaults(parse_space(raw["tune"]["space"]), raw) | {"model.fusion": "concat", "loss.alpha": 0.2}
    best.write_text(yaml.safe_dump({"study": "t", "trial": 3, "cv_spearman": 0.8, "params": values}))
    params = params_for_best(best, raw)
    assert params.model.fusion == "concat" and params.loss.alpha == 0.2
    best.write_text(yaml.safe_dump({"params": {"loss.alpha": 0.2}}))
    with pytest.raises(InputError, match="no value for searched param"):
        params_for_best(best, raw)
    best.write_text(yaml.safe_dump({"params": {**values, "loss.alpha": 1.5}}))
    with pytest.raises(InputError, match=r"loss.alpha = 1.5 lies outside tune.space.loss.alpha"):
        params_for_best(best, raw)


def test_ctrl_c_raises_inside_a_trial_and_waits_for_the_boundary_elsewhere():
    flag = InterruptFlag()
    flag._handle(signal.SIGINT, None)  # Optuna recording a result: must not be cut short
    assert flag.requested
    with pytest.raises(KeyboardInterrupt):  # the next boundary (callback, epoch, trial start) raises
        flag.check()
    flag = InterruptFlag()
    with pytest.raises(KeyboardInterrupt):
        with flag.raising():  # inside the objective: at once
            flag._handle(signal.SIGINT, None)
    assert not flag.armed


def _tune_cmd(tiny_patches, tmp_path, trials):
    return [sys.executable, "-m", "src.tune", "--trials", str(trials), "--study", "cli",
            "--storage", f"sqlite:///{tmp_path}/cli.db", "--patches", str(tiny_patches / "patches"),
            "--params", str(ROOT / "params.yaml"), "--best-out", str(tmp_path / "best.yaml"),
            "--metrics", str(tmp_path / "tune.json"),
            "--cv-per-type", str(tmp_path / "cv.csv"), "--history", str(tmp_path / "history.csv"), "--artifacts", str(tmp_path / "artifacts"),
            "--ensemble-out", str(tmp_path / "ensemble.yaml"),
            *[a for item in [*FAST, "train.epochs=2", "tune.pruner=none"] for a in ("--set", item)]]


@pytest.mark.slow
def test_sigint_mid_trial_then_rerun_ends_with_exactly_the_target(tiny_patches, tmp_path):
    cmd = _tune_cmd(tiny_patches, tmp_path, 4)
    storage = f"sqlite:///{tmp_path}/cli.db"
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    completed_before = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
        except Exception:  # not created yet, or the writer holds the lock: poll again
            continue
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.COMPLETE for t in trials) and any(t.state == TrialState.RUNNING for t in trials):
            completed_before = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE]
            time.sleep(1.0)  # inside the next trial's training
            proc.send_signal(signal.SIGINT)
            break
    output = proc.communicate(timeout=120)[0]
    assert completed_before, output
    assert proc.returncode == 130, output
    assert "rerun the same command to resume" in output
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
    assert not (tmp_path / "best.yaml").exists()

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    study = optuna.load_study(study_name=study.study_name, storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
    after = {t.number: t.value for t in study.trials if t.state == TrialState.COMPLETE}
    assert all(after[n] == v for n, v in completed_before)  # no completed trial lost
    metrics = yaml.safe_load((tmp_path / "tune.json").read_text())
    assert metrics["n_complete"] + metrics["n_pruned"] == 4


def test_a_replayed_pruner_stops_the_trial_it_would_have_stopped(tmp_path, train_set):
    from src.core.config import params_from_dict
    from src.search.pruning import replay

    raw = base_raw("train.epochs=2", "tune.pruner_startup_trials=1", "tune.pruner=none",
                   "loss.target_transform=log1p")
    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name=stored_study_name("t", raw, train_set), storage=storage,
                                direction="maximize")
    hand_set = defaults(parse_space(raw["tune"]["space"]), raw)
    enqueue_defaults(study, hand_set)
    study.enqueue_trial({**hand_set, "train.lr_head": 1e-4, "train.lr_backbone": 1e-5, "model.fusion": "gated",
                         "loss.target_transform": "rank", "loss.alpha": 0.0})
    result = run_study(raw, train_set, 2, "t", storage, artifact_dir=tmp_path / "a", live=False)
    assert [t.state for t in result.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]  # no pruner ran
    assert all(len(t.user_attrs["fold_blocks"]) == 2 for t in result.trials)
    params = params_from_dict(raw)
    for name in ("median", "wilcoxon"):
        got = replay(result, name, params, n_folds=2)
        assert (got.pruned, got.lost, got.best_pruned) == (1, 0, False), (name, got)
        assert got.folds_saved == pytest.approx(1 / 4)  # one fold of the two trials' four


def test_a_new_study_warm_starts_from_the_best_recipes_of_earlier_ones(tmp_path, train_set):
    first = _study(tmp_path, base_raw("tune.pruner=none", "tune.warm_start=2"), 2, train_set)
    # A changed recipe (hand-set dropout) is a new study: it queues the earlier study's recipes, best first.
    changed = base_raw("tune.pruner=none", "tune.warm_start=2", "model.dropout=0.2")
    lines = []
    second = run_study(changed, train_set, 3, "t", f"sqlite:///{tmp_path}/s.db",
                            artifact_dir=tmp_path / "artifacts", live=False, log=lines.append)
    assert second.study_name != first.study_name
    ranked = sorted(first.trials, key=lambda t: t.value, reverse=True)
    warm = [t for t in second.trials if "warm_start" in t.user_attrs]
    assert [t.user_attrs["warm_start"]["trial"] for t in warm] == [t.number for t in ranked]
    assert all(t.user_attrs["warm_start"]["study"] == first.study_name for t in warm)
    for t, source in zip(warm, ranked):  # the earlier recipe, run again (fields new to it: hand-set values)
        assert {k: t.params[k] for k in source.params} == source.params and t.state == TrialState.COMPLETE
    assert sum(line.startswith("warm start: queued trial") for line in lines) == 2
    # Another data file (here: other abundances) starts from the hand-set recipe alone, although a study
    # of the same name exists.
    other_data = replace(train_set, spots=train_set.spots.assign(
        **{t: train_set.spots[t] * 1.5 for t in train_set.targets}))
    lines.clear()
    other = run_study(base_raw("tune.pruner=none", "tune.warm_start=2", "model.dropout=0.15"), other_data, 1, "t",
                      f"sqlite:///{tmp_path}/s.db", artifact_dir=tmp_path / "artifacts", live=False, log=lines.append)
    assert other.user_attrs["data"] != first.user_attrs["data"]
    assert not any("warm_start" in t.user_attrs for t in other.trials)
    assert not any(line.startswith("warm start") for line in lines)
    # Off with one key; recipes outside a narrowed space are not queued.
    off = _study(tmp_path, base_raw("tune.pruner=none", "tune.warm_start=0", "model.dropout=0.25"), 1, train_set)
    assert not any("warm_start" in t.user_attrs for t in off.trials)
    narrow = base_raw("tune.pruner=none", "tune.warm_start=5", "model.dropout=0.05",
                      "tune.space.model.dropout={low: 0.0, high: 0.1}")
    study = _study(tmp_path, narrow, 1, train_set)
    for t in study.trials:
        if "warm_start" in t.user_attrs:
            assert t.params["model.dropout"] <= 0.1


def test_the_delivered_ensemble_is_the_best_trials_fold_models(tmp_path, train_set, tiny_patches):
    from src.engine.final_model import final_model
    from src.model.checkpoint import load_checkpoint, save_checkpoint
    from src.model.targets import rank_scale
    from src.search.outputs import StageOutputs, write_outputs
    from src.search.recipe import params_for_best
    from src.search.selection import select
    from src.search.storage import create_storage

    raw = base_raw("tune.pruner=none", "tune.sigma_grid=[0.0, 1.0, 2.0]")
    study = _study(tmp_path, raw, 2, train_set)
    out = StageOutputs(tmp_path / "best.yaml", tmp_path / "tune.json", tmp_path / "cv.csv", tmp_path / "h.csv",
                       tmp_path / "ensemble.yaml")
    selection = select(study, create_storage(f"sqlite:///{tmp_path}/s.db", 60), tmp_path / "artifacts", train_set,
                       raw, rounds=0)
    write_outputs(study, train_set.targets, out, selection)
    record = yaml.safe_load(out.best_params.read_text())
    assert record["smoothing_sigma"] == study.best_trial.user_attrs["smoothing_sigma"] in (0.0, 1.0, 2.0)
    params = params_for_best(out.best_params, raw)
    assert params.infer.smoothing_sigma == record["smoothing_sigma"]
    lines = []
    model, epochs = final_model(params, train_set, log=lines.append)
    save_checkpoint(tmp_path / "model.pt", model, targets=train_set.targets, loss=params.loss,
                    patch_size=train_set.patch_size, infer=params.infer, stain={},
                    rank_scale=rank_scale(train_set.abundance).tolist())
    assert len(epochs) == 2  # one model per fold (two training slides)
    assert lines == ["2 fold models from the model store"]  # the study's own: no CV runs twice
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert len(loaded.members) == 2 and meta["infer"].smoothing_sigma == record["smoothing_sigma"]
    # They are the very models the study scored: with an empty store the CV runs again, scores what the
    # trial scored and trains the same weights.
    elsewhere = replace(params, train=replace(params.train, cache_dir=str(tmp_path / "other_cache")))
    lines.clear()
    again, _ = final_model(elsewhere, train_set, log=lines.append)
    assert any(f"CV spearman {study.best_value:.4f}" in line for line in lines)
    for stored, retrained in zip(model.members, again.members):
        for (name, a), b in zip(stored.state_dict().items(), retrained.state_dict().values()):
            assert torch.equal(a, b), name


def test_fold_reports_number_every_validation_block_once():
    from src.search.pruning import reports

    seen: list[float] = []
    six_slides = [0.5, 0.6, 0.4, 0.7, 0.55, 0.65]  # cv.scheme blocks on 6 slides: a block per slide and fold
    steps = [step for fold in range(3) for step, _ in reports("wilcoxon", fold, six_slides, seen)]
    assert steps == list(range(18))
    seen = []
    assert reports("median", 0, [0.2, 0.4], seen) == [(1, pytest.approx(0.3))]
    assert reports("hyperband", 1, [0.6, 0.8], seen) == [(2, pytest.approx(0.5))]


def test_only_versions_of_a_study_name_count_as_earlier_studies():
    from src.search.identity import is_version_of

    assert is_version_of("default-1a2b3c4d", "default")
    assert not is_version_of("default-foo-1a2b3c4d", "default") and not is_version_of("defaultx-1a2b3c4d", "default")


def test_tuned_floats_survive_dvcs_lock_rewrites_exactly():
    """DVC writes best_params.yaml's values into dvc.lock, then re-reads and re-writes the lock through
    ruamel.yaml at each later stage; a value that comes back changed makes `dvc status` call the params
    modified after every tune. The values trials run with (and best_params.yaml holds) come back."""
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    from src.search.space import run_value

    drawn = [float(v) for v in 10 ** np.random.default_rng(0).uniform(-10, 2, 2000)] + [2.559642090152666e-06]

    def through_lock(values):
        lock = dumps_yaml({"params": values})  # DVC writing the stage's params
        return yaml.safe_load(dumps_yaml(parse_yaml_for_update(lock, "dvc.lock")))["params"]  # re-written

    ran = [run_value(v) for v in drawn]
    assert through_lock(ran) == ran and np.allclose(ran, drawn, rtol=1e-11, atol=0)
    assert through_lock(drawn) != drawn  # what the raw draws would do
    trial = FixedTrial({"train.lr_head": 2.559642090152666e-06})
    space = parse_space({"train": {"lr_head": {"low": 1e-7, "high": 1.0, "log": True}}})
    assert suggest(trial, space, base_raw()).train.lr_head == run_value(2.559642090152666e-06)


def test_the_default_space_holds_every_lever_the_recipe_names():
    """The loss weight, the unfrozen block count, both learning rates, the fusion and (through
    tune.sigma_grid, scored on every trial's out-of-fold predictions) the smoothing sigma."""
    raw = read_raw(ROOT / "params.yaml")
    names = {p.name for p in parse_space(raw["tune"]["space"])}
    assert {"loss.alpha", "model.unfrozen_blocks", "train.lr_head", "train.lr_backbone", "model.fusion"} <= names
    assert len(raw["tune"]["sigma_grid"]) > 1
    trained = suggest(FixedTrial({**defaults(parse_space(raw["tune"]["space"]), raw), "model.unfrozen_blocks": 1,
                                  "train.lr_backbone": 3e-4}), parse_space(raw["tune"]["space"]), raw)
    assert trained.model.unfrozen_blocks == 1 and trained.train.lr_backbone == 3e-4
