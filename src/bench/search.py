"""``python -m src.bench search``: does what the search delivers beat the hand-set recipe on a new slide?

For each simulated data family (``simulate.family``: ``compartments``, the embedded default on which
the defaults and the search space were chosen, and ``cells``, held out: built on other assumptions and
never tuned on) and each ``simulate.seed`` (another data set with a truth file), in a work folder of
its own: simulate, normalize and cut patches; run a study of ``tune.trials`` trials exactly as stage
``tune`` does and score every complete trial's fold models on the test slide (TTA and the sigma its
CV chose), the first trial being the hand-set params.yaml recipe (scored with params.yaml's own
``infer.smoothing_sigma``, as stage ``train`` delivers it). Then what stage ``train`` would deliver
(``src.search.selection``: the best trial, or the ensemble selected over the trials where the nested
CV prefers it) is scored from those predictions, after the first 8, 16, 40, 100 finished trials
the study reached and at its end. A plain peer without search (``plain_baseline``: a timm ResNet-18
from scratch on the whole patch, one model on every training spot) is scored beside them: what the
search delivers has to beat it too.

Printed per data set: floor, ceiling, hand-set, plain peer, best trial, ensemble, delivered, the gain
(delivered - hand-set), delivered - plain, skill ((test - floor) / (ceiling - floor)), the map score of
what is delivered on the test slide with its floor (the positions alone) and ceiling, and the
Spearman correlation between the trials' CV and test scores (does the CV rank recipes as a new slide
does); per family the mean and worst gain, how often the delivered recipe beats the hand-set and the
plain peer, and what ensembling added; and per budget the best trial's CV (the maximum of noisy
scores), the nested CV of the delivered choice (per spot and per map) and the test. Work folders keep every trial's test
predictions (``test_views/``), the plain peer's score (``reference.json``) and the row
(``result.json``), so a rerun scores a finished study again without training it. With ``--replay``,
the study runs without pruning and every pruner is replayed over its recorded fold scores
(``src.search.pruning.replay``).

Test labels are read here only: the study and its choices never see them.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from src.bench.search_results import Delivery, SeedResult, print_results
from src.core.config import apply_overrides, params_from_dict, read_raw
from src.core.sections import Params


def plain_baseline(backbone: str = "resnet18") -> list[str]:
    """The plain peer's overrides of params.yaml: ``backbone`` from scratch, every block trained."""
    from src.model.backbone import backbone_block_count

    return [f"model.backbone={backbone}", f"model.unfrozen_blocks={backbone_block_count(backbone)}", *PLAIN_RECIPE]


# A peer without search: trained from scratch on the whole patch, MSE on log targets, flips, flip TTA,
# no coordinates, no smoothing; one model on every training spot.
PLAIN_RECIPE = [
    "model.fusion=none", "model.context=1.0",
    "model.input_size=64", "model.neighbour_radius=0", "model.dropout=0.1", "loss.alpha=0",
    "loss.target_transform=log", "loss.log_epsilon=1.0e-6", "train.lr_backbone=0.001", "train.lr_head=0.001",
    "train.epochs=8", "train.feature_cache=false", "infer.tta=[identity,hflip,vflip]", "infer.smoothing_sigma=0",
    "pretrain.epochs=0",
]


BUDGETS = (8, 16, 40, 100)  # finished trials at which the delivered recipe is also scored (a study's prefix)


def build_data(raw_params: Path, folder: Path, overrides: list[str]) -> None:
    """simulate -> normalize -> patches into ``folder``, with the stage commands' own entry points."""
    from src import normalize, patches, simulate

    h5, truth = folder / "simulated.h5", folder / "simulated_truth.h5"
    sets = [arg for o in overrides for arg in ("--set", o)]
    simulate.main(["--params", str(raw_params), "--out", str(h5), "--truth-out", str(truth), *sets])
    normalize.main(["--params", str(raw_params), "--out", str(folder / "normalized"), *sets,
                    "--set", f"data.h5={h5}", "--set", f"data.truth={truth}"])
    patches.main(["--params", str(raw_params), "--normalized", str(folder / "normalized" / "slides.h5"),
                  "--out", str(folder / "patches"), *sets])


class TestSlide:
    """The test slide's patches and observed abundances (from the truth file)."""

    def __init__(self, folder: Path, train_set):
        from src.data.preprocessing.patch_set import load_patch_set
        from src.data.slides.truth import read_truth
        from src.engine.metrics import position_floor
        from src.model.targets import rank_scale

        self.patch_set = load_patch_set(folder / "patches", "test")
        self.truth, self.expected = read_truth(folder / "simulated_truth.h5", self.patch_set.spots,
                                               self.patch_set.targets)
        self.scale = rank_scale(train_set.abundance)
        self.positions = position_floor(train_set.coords(), train_set.abundance, self.patch_set.coords())

    def view(self, models: list, params: Params, sigma: float) -> np.ndarray:
        """The fold models averaged, with TTA and smoothing at ``sigma``, as log abundances (what a
        checkpoint delivers, and what ensembles combine)."""
        from dataclasses import replace

        from src.engine.inference import predict_smoothed
        from src.model.network import Ensemble
        from src.model.targets import log_abundance

        infer = replace(params.infer, smoothing_sigma=sigma)
        pred = predict_smoothed(Ensemble(models), self.patch_set, infer)
        return log_abundance(pred, params.loss.target_transform, params.loss.log_epsilon, self.scale)

    def score(self, models: list, params: Params, sigma: float) -> float:
        """Test Spearman of the fold models averaged, with TTA and smoothing at ``sigma``."""
        return self.score_view(self.view(models, params, sigma))

    def score_view(self, view: np.ndarray) -> float:
        from src.engine.metrics import competition_score

        return competition_score(view, self.truth)

    def map_view(self, view: np.ndarray) -> float:
        from src.engine.metrics import map_score

        return map_score(view, self.truth, self.patch_set.slides)


class TrialTestViews:
    """Every complete trial's test-slide predictions (log abundances), kept in ``folder/test_views`` as
    the study runs; a trial whose view is missing (a study run before) is rerun from its params."""

    def __init__(self, folder: Path, test: TestSlide, train_set, base_raw: dict):
        self.folder, self.test, self.train_set, self.base_raw = folder / "test_views", test, train_set, base_raw
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, number: int) -> Path:
        return self.folder / f"trial{number}_log.npy"  # (earlier runs kept rank views as trialN.npy)

    def save(self, number: int, view: np.ndarray) -> None:
        np.save(self.path(number), view)

    def get(self, trial) -> np.ndarray:
        if not self.path(trial.number).is_file():
            from src.engine.cross_validation import cross_validate
            from src.search.recipe import params_for_trial

            params = params_for_trial(trial.params, trial.user_attrs.get("smoothing_sigma"), self.base_raw,
                                      f"trial {trial.number}")
            result = cross_validate(params, self.train_set, keep_models=True, show_progress=False)
            self.save(trial.number, self.test.view(result.models, params, result.sigma))
        return np.load(self.path(trial.number))


def score_deliveries(study, storage, folder: Path, train_set, raw: dict, views: TrialTestViews, log=print
                     ) -> list[Delivery]:
    """What train would deliver at each budget of ``BUDGETS`` the study reached and at its full size."""
    from src.engine.ensemble_selection import combine
    from src.search.selection import select

    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    rounds = params_from_dict(raw).tune.ensemble_size
    out = []
    for budget in [b for b in BUDGETS if b < finished] + [finished]:
        chosen = select(study, storage, folder / "artifacts", train_set, raw, rounds, budget)
        by_number = {t.number: t for t in study.trials}

        def test_of(members) -> np.ndarray:
            member_views = [views.get(by_number[m.trial]) for m in members]
            return combine(member_views, np.array([m.weight for m in members]))

        best_number = chosen.best_trial
        best_view, ensemble_view = views.get(by_number[best_number]), test_of(chosen.ensemble)
        delivered_view = ensemble_view if chosen.delivered == "ensemble" else best_view
        out.append(Delivery(
            budget=budget, best_trial=best_number, best_trial_test=views.test.score_view(best_view),
            cv_best_trial=chosen.cv_best_trial, ensemble_test=views.test.score_view(ensemble_view),
            cv_ensemble=chosen.cv_ensemble, nested_single=chosen.nested.single, nested_ensemble=chosen.nested.ensemble,
            members=len(chosen.ensemble), delivered=chosen.delivered,
            delivered_test=views.test.score_view(delivered_view), delivered_cv=chosen.cv,
            delivered_cv_map=chosen.cv_map, delivered_test_map=views.test.map_view(delivered_view)))
        d = out[-1]
        log(f"  {budget} trials: best trial #{d.best_trial} CV {d.cv_best_trial:.4f} test {d.best_trial_test:.4f}; "
            f"ensemble of {d.members} OOF {d.cv_ensemble:.4f} test {d.ensemble_test:.4f}; nested single "
            f"{d.nested_single:.4f} ensemble {d.nested_ensemble:.4f} -> {d.delivered} (test map "
            f"{d.delivered_test_map:.4f})")
    return out


def reference_scores(folder: Path, compute) -> dict:
    """The plain peer's test score on a data set, computed once (``folder/reference.json``)."""
    path = folder / "reference.json"
    if path.is_file():
        return json.loads(path.read_text())
    scores = compute()
    path.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def run_seed(family: str, seed: int, params_file: Path, overrides: list[str], work: Path, trials: int | None,
             replay: bool, log=print) -> SeedResult:
    from src.data.preprocessing.patch_set import load_patch_set
    from src.engine.cross_validation import cross_validate
    from src.engine.fit import fit
    from src.engine.folds import fold_count
    from src.engine.metrics import competition_score, floor_score
    from src.search.pruning import PRUNERS
    from src.search.pruning import replay as replay_pruner
    from src.search.storage import create_storage
    from src.search.study import run_study

    start = time.perf_counter()
    folder = work / f"{family}-seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    overrides = [*overrides, f"simulate.family={family}", f"simulate.seed={seed}", f"train.cache_dir={folder / 'cache'}"]
    if replay:
        overrides.append("tune.pruner=none")
    if not (folder / "patches" / "meta.json").is_file():
        build_data(params_file, folder, overrides)
    raw = apply_overrides(read_raw(params_file), overrides)
    params = params_from_dict(raw)
    train_set = load_patch_set(folder / "patches", "train")
    test = TestSlide(folder, train_set)

    def plain_peer() -> dict:
        plain_params = params_from_dict(apply_overrides(raw, plain_baseline()))
        plain = fit(plain_params, train_set, np.arange(len(train_set.spots)), show_progress=False)
        plain_test = test.score([plain.model], plain_params, 0.0)
        log(f"{family} seed {seed}: plain ResNet-18 test {plain_test:.4f}")
        return {"plain_test": plain_test}

    reference = reference_scores(folder, plain_peer)
    views = TrialTestViews(folder, test, train_set, raw)

    def score_on_test(trial, trial_params, result) -> None:
        view = test.view(result.models, trial_params, result.sigma)
        views.save(trial.number, view)
        trial.set_user_attr("test_spearman", round(test.score_view(view), 6))
        if trial.user_attrs.get("hand_set"):  # as stage train delivers it: params.yaml's own sigma
            hand_test = test.score(result.models, trial_params, trial_params.infer.smoothing_sigma)
            trial.set_user_attr("hand_set_test", round(hand_test, 6))
            log(f"{family} seed {seed}: hand-set recipe CV {result.score:.4f} (sigma {result.sigma:g}), test "
                f"{hand_test:.4f} (params.yaml's sigma {trial_params.infer.smoothing_sigma:g})")

    n_trials = trials or params.tune.trials
    storage_url = f"sqlite:///{folder / 'study.db'}"
    study = run_study(raw, train_set, n_trials, f"bench-{family}-seed{seed}", storage_url,
                      artifact_dir=folder / "artifacts", live=False, log=log, after_cv=score_on_test)
    deliveries = score_deliveries(study, create_storage(storage_url, params.tune.heartbeat_s), folder, train_set,
                                  raw, views, log)
    hand_trials = [t for t in study.trials if "hand_set_test" in t.user_attrs]
    if hand_trials:
        hand_test = hand_trials[0].user_attrs["hand_set_test"]
    else:  # a study run before the hand-set trial recorded it
        hand = cross_validate(params, train_set, keep_models=True, show_progress=False)
        hand_test = test.score(hand.models, params, params.infer.smoothing_sigma)
    # Every complete trial's test score from its kept view (a trial of a study resumed from an earlier
    # run has no test_spearman attribute; its view is rebuilt from its params)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = study.best_trial
    cv = [t.value for t in complete]
    tested = [test.score_view(views.get(t)) for t in complete]
    correlation = float(spearmanr(cv, tested).statistic) if len(complete) >= 3 else float("nan")
    replays = []
    if replay:
        n_folds = fold_count(params.cv, train_set.spots["slide"].to_numpy())
        replays = [replay_pruner(study, name, params, n_folds) for name in PRUNERS if name != "none"]
    result = SeedResult(family=family, seed=seed, hand_set=hand_test,
                      tuned=test.score_view(views.get(best)),
                      plain=reference["plain_test"], deliveries=deliveries,
                      correlation=correlation, n_complete=len(complete),
                      n_pruned=sum(t.state.name == "PRUNED" for t in study.trials), best_trial=best.number,
                      floor=floor_score(train_set.abundance, test.truth),
                      ceiling=competition_score(test.expected, test.truth),
                      map_floor=test.map_view(test.positions), map_ceiling=test.map_view(test.expected),
                      minutes=(time.perf_counter() - start) / 60, replay=replays)
    (folder / "result.json").write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return result


def bench_search(families: list[str], seeds: list[int], params_file: Path, overrides: list[str], work: Path,
                 trials: int | None, replay: bool) -> list[SeedResult]:
    results = []
    for family in families:
        for seed in seeds:
            r = run_seed(family, seed, params_file, overrides, work, trials, replay)
            print(f"{family} seed {seed}: floor {r.floor:.4f} ceiling {r.ceiling:.4f} hand-set {r.hand_set:.4f} "
                  f"plain {r.plain:.4f} best trial {r.tuned:.4f} delivered {r.delivered.delivered_test:.4f} "
                  f"({r.delivered.delivered}) gain {r.gain:+.4f} skill {r.skill:.2f} map {r.delivered.delivered_test_map:.4f} "
                  f"(floor {r.map_floor:.4f}, ceiling {r.map_ceiling:.4f}) "
                  f"CV-test rank corr. {r.correlation:.2f} ({r.minutes:.1f} min)", flush=True)
            results.append(r)
    print_results(results, trials or params_from_dict(apply_overrides(read_raw(params_file), overrides)).tune.trials)
    return results
