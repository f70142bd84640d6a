"""Ensemble selection over trials: Caruana's greedy selection on log-abundance views, the nested CV that
decides what is delivered (and gives the honest figures), and the selection read back from a study's
uploaded out-of-fold tables."""
import numpy as np
import pytest

from src.engine.ensemble_selection import combine, greedy_selection, nested_scores
from src.engine.metrics import competition_score, map_score


def _problem(seed=0, n=600, t=12):
    rng = np.random.default_rng(seed)
    truth = rng.lognormal(size=(n, t))
    signal = np.log(truth)
    return rng, truth, signal


def test_complementary_recipes_are_both_selected_and_beat_each_alone():
    rng, truth, signal = _problem()
    half = signal.shape[1] // 2
    a, b = signal.copy(), signal.copy()  # each knows half of the cell types, guesses the rest
    a[:, half:] = rng.normal(size=a[:, half:].shape) * signal.std()
    b[:, :half] = rng.normal(size=b[:, :half].shape) * signal.std()
    noise = rng.normal(size=signal.shape)
    views = [a, b, noise]
    weights = greedy_selection(views, truth, rounds=10)
    assert weights[0] > 0 and weights[1] > 0 and weights[2] == 0
    assert weights.sum() == pytest.approx(1.0)
    together = competition_score(combine(views, weights), truth)
    assert together > max(competition_score(v, truth) for v in views) + 0.02


def test_nested_cv_prefers_the_ensemble_only_where_it_generalizes():
    rng, truth, signal = _problem(1)
    fold_of = np.repeat(np.arange(3), len(truth) // 3)
    # copies of one recipe with independent noise: averaging them helps on every fold
    copies = [signal + 2.0 * rng.normal(size=signal.shape) for _ in range(4)]
    nested = nested_scores(copies, truth, fold_of, rounds=8)
    assert nested.ensemble > nested.single + 0.02
    # the nested predictions are what the nested scores score, and they map better too
    assert competition_score(nested.ensemble_oof, truth) == pytest.approx(nested.ensemble)
    assert competition_score(nested.single_oof, truth) == pytest.approx(nested.single)
    slides = fold_of.astype(str)
    assert map_score(nested.ensemble_oof, truth, slides) > map_score(nested.single_oof, truth, slides) + 0.02
    # one good recipe and pure-noise ones: nothing to gain, and the nested CV says so
    noisy = [signal + 0.5 * rng.normal(size=signal.shape)] + [rng.normal(size=signal.shape) for _ in range(3)]
    nested = nested_scores(noisy, truth, fold_of, rounds=8)
    assert nested.ensemble == pytest.approx(nested.single, abs=1e-9)


def test_a_study_selection_reads_back_the_scores_its_trials_recorded(tmp_path, tiny_patches):
    from optuna.artifacts import FileSystemArtifactStore

    from src.data.preprocessing.patch_set import load_patch_set
    from src.search.selection import oof_view, select
    from src.search.storage import create_storage
    from tests.test_tune import _study, base_raw

    train_set = load_patch_set(tiny_patches / "patches", "train")
    raw = base_raw("tune.pruner=none", "tune.sigma_grid=[0.0, 1.0]", "loss.target_transform=log")
    study = _study(tmp_path, raw, 3, train_set)
    storage = create_storage(f"sqlite:///{tmp_path}/s.db", 60)
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    for trial in study.trials:  # the uploaded OOF table, smoothed with the trial's sigma, scores as the trial did
        view, fold_of = oof_view(trial, storage, store, train_set, raw)
        assert competition_score(view, train_set.abundance) == pytest.approx(trial.value, abs=1e-6)
        assert set(fold_of) == {0, 1}
    chosen = select(study, storage, tmp_path / "artifacts", train_set, raw, rounds=5)
    assert chosen.best_trial == study.best_trial.number and chosen.cv_best_trial == pytest.approx(study.best_value)
    # the headline is the nested CV of what is delivered, not the best of the trials' CVs
    nested = chosen.nested.ensemble if chosen.delivered == "ensemble" else chosen.nested.single
    assert chosen.cv == pytest.approx(nested)
    assert len(chosen.cv_per_type) == len(train_set.targets)
    assert chosen.cv_map == pytest.approx(np.nanmean(chosen.cv_per_type)) and -1 < chosen.cv_map < 1
    assert sum(m.weight for m in chosen.ensemble) == pytest.approx(1.0)
    assert chosen.cv_ensemble >= chosen.cv_best_trial - 1e-9  # greedy starts from the best single trial
    assert chosen.delivered in ("single", "ensemble")
    if chosen.delivered == "single":
        assert [m.trial for m in chosen.members] == [chosen.best_trial]
    off = select(study, storage, tmp_path / "artifacts", train_set, raw, rounds=0)
    assert off.delivered == "single" and off.members[0].trial == study.best_trial.number


def test_train_delivers_the_selected_trials_and_the_checkpoint_predicts_their_weighted_abundances(tmp_path,
                                                                                                 tiny_patches):
    import yaml

    from src import train
    from src.data.preprocessing.patch_set import load_patch_set
    from src.engine.inference import predict_abundance, predict_smoothed
    from src.model.checkpoint import load_checkpoint
    from src.model.network import RecipeEnsemble
    from src.model.targets import log_abundance
    from src.search.outputs import StageOutputs, write_outputs
    from src.search.recipe import params_for_delivery
    from src.search.selection import select
    from src.search.storage import create_storage
    from tests.conftest import FAST, ROOT
    from tests.test_tune import _study, base_raw

    train_set = load_patch_set(tiny_patches / "patches", "train")
    test_set = load_patch_set(tiny_patches / "patches", "test")
    raw = base_raw("tune.pruner=none", "tune.sigma_grid=[0.0, 1.0]")
    study = _study(tmp_path, raw, 2, train_set)
    chosen = select(study, create_storage(f"sqlite:///{tmp_path}/s.db", 60), tmp_path / "artifacts", train_set, raw, 4)
    out = StageOutputs(*(tmp_path / n for n in ("best.yaml", "tune.json", "cv.csv", "h.csv", "ensemble.yaml")))
    write_outputs(study, train_set.targets, out, chosen)
    record = yaml.safe_load(out.delivery.read_text())
    assert [m["trial"] for m in record["members"]] == [m.trial for m in chosen.members]
    assert yaml.safe_load(out.best_params.read_text())["delivered"].startswith(("best trial", "ensemble of trials"))
    # an ensemble of both trials, as the selection writes it when the nested CV prefers one
    trials = sorted(study.trials, key=lambda t: -t.value)
    record["members"] = [{"trial": t.number, "weight": w, "smoothing_sigma": t.user_attrs["smoothing_sigma"],
                          "params": t.params} for t, w in zip(trials, (0.75, 0.25))]
    out.delivery.write_text(yaml.safe_dump(record))
    (tmp_path / "stain.json").write_text("{}")
    sets = [a for o in FAST for a in ("--set", o)]
    train.main(["--ensemble", str(out.delivery), "--patches", str(tiny_patches / "patches"), "--stain",
                str(tmp_path / "stain.json"), "--out", str(tmp_path / "model.pt"), "--params", str(ROOT / "params.yaml"),
                *sets])
    model, meta = load_checkpoint(tmp_path / "model.pt")
    assert isinstance(model, RecipeEnsemble) and model.weights == [0.75, 0.25]
    members = params_for_delivery(out.delivery, raw)
    views = [log_abundance(predict_smoothed(m, test_set, s["infer"]), s["target_transform"], s["log_epsilon"],
                           np.asarray(meta["rank_scale"])) for m, s in zip(model.models, model.settings)]
    assert [s["infer"].smoothing_sigma for s in model.settings] == [p.infer.smoothing_sigma for p, _, _ in members]
    np.testing.assert_allclose(predict_abundance(model, meta, test_set),
                               np.exp(combine(views, np.array([0.75, 0.25]))))
