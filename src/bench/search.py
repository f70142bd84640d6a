"""``python -m src.bench search``: does the search beat the hand-set recipe on a new slide?

For each simulated data family (``simulate.family``: ``compartments``, the embedded default on which
the defaults and the search space were chosen, and ``cells``, held out: built on other assumptions and
never tuned on) and each ``simulate.seed`` (another data set with a truth file), in a work folder of
its own: simulate, normalize and cut patches; run the hand-set
params.yaml recipe as stage ``train`` delivers it (the fold models of its CV, averaged, smoothed with
its own ``infer.smoothing_sigma``) and score it on the test slide; run a study of ``tune.trials``
trials exactly as stage ``tune`` does, and score every complete trial's fold models on the test slide
too (TTA and the sigma its CV chose: what stage ``train`` would deliver for it). Printed per data set:
the floor, hand-set and tuned test Spearman (the tuned one is the best-CV trial's), their difference,
the tuned recipe's skill ((test - floor) / (ceiling - floor)) and the Spearman correlation between the
trials' CV and test scores (does the CV rank recipes as a new slide does); then per family the mean
gain, the worst gain and the share of data sets where the tuned recipe wins. A plain peer without
search (``PLAIN_BASELINE``: a timm ResNet-18 from scratch on the whole patch, one model on every
training spot) is scored beside them: the tuned recipe has to beat it too. With ``--replay``, the study runs without pruning and every pruner is replayed over its
recorded fold scores (``src.pruning.replay``).

Test labels are read here only: the study and its choices never see them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from src.core.config import Params, apply_overrides, params_from_dict, read_raw

DEFAULTS_CHOSEN_ON = "compartments"  # the family the defaults, space and levers were chosen on
# A peer without search: a plain timm ResNet-18 trained from scratch on the whole patch, MSE on log
# targets, flips, flip TTA, no coordinates, no smoothing; one model on every training spot.
PLAIN_BASELINE = [
    "model.backbone=resnet18", "model.unfrozen_blocks=9", "model.fusion=none", "model.context=1.0",
    "model.input_size=64", "model.neighbour_radius=0", "model.dropout=0.1", "loss.alpha=0",
    "loss.target_transform=log", "loss.log_epsilon=1.0e-6", "train.lr_backbone=0.001", "train.lr_head=0.001",
    "train.epochs=8", "train.feature_cache=false", "infer.tta=[identity,hflip,vflip]", "infer.smoothing_sigma=0",
]


@dataclass
class SeedResult:
    family: str
    seed: int
    hand_set: float
    tuned: float
    plain: float
    correlation: float
    n_complete: int
    n_pruned: int
    best_trial: int
    floor: float
    ceiling: float
    minutes: float
    replay: list = field(default_factory=list)

    @property
    def gain(self) -> float:
        return self.tuned - self.hand_set

    @property
    def skill(self) -> float:
        return (self.tuned - self.floor) / (self.ceiling - self.floor)


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

    def __init__(self, folder: Path):
        from src.data.patch_set import load_patch_set
        from src.data.truth import read_truth

        self.patch_set = load_patch_set(folder / "patches", "test")
        self.truth, self.expected = read_truth(folder / "simulated_truth.h5", self.patch_set.spots,
                                               self.patch_set.targets)

    def score(self, models: list, params: Params, sigma: float) -> float:
        """Test Spearman of the fold models averaged, with TTA and smoothing at ``sigma``."""
        from dataclasses import replace

        from src.engine.inference import predict_smoothed
        from src.engine.metrics import competition_score
        from src.model.network import Ensemble

        infer = replace(params.infer, smoothing_sigma=sigma)
        return competition_score(predict_smoothed(Ensemble(models), self.patch_set, infer), self.truth)


def run_seed(family: str, seed: int, params_file: Path, overrides: list[str], work: Path, trials: int | None,
             replay: bool, log=print) -> SeedResult:
    from src.data.patch_set import load_patch_set
    from src.engine.cross_validation import cross_validate
    from src.engine.fit import fit
    from src.engine.folds import fold_count
    from src.engine.metrics import competition_score, floor_score
    from src.search.pruning import PRUNERS
    from src.search.pruning import replay as replay_pruner
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
    test = TestSlide(folder)

    hand = cross_validate(params, train_set, keep_models=True, show_progress=False)
    hand_test = test.score(hand.models, params, params.infer.smoothing_sigma)
    log(f"{family} seed {seed}: hand-set recipe CV {hand.score:.4f}, test {hand_test:.4f}")
    plain_params = params_from_dict(apply_overrides(raw, PLAIN_BASELINE))
    plain = fit(plain_params, train_set, np.arange(len(train_set.spots)), show_progress=False)
    plain_test = test.score([plain.model], plain_params, 0.0)
    log(f"{family} seed {seed}: plain ResNet-18 test {plain_test:.4f}")

    def score_on_test(trial, trial_params, result) -> None:
        trial.set_user_attr("test_spearman", round(test.score(result.models, trial_params, result.sigma), 6))

    n_trials = trials or params.tune.trials
    study = run_study(raw, train_set, n_trials, f"bench-{family}-seed{seed}", f"sqlite:///{folder / 'study.db'}",
                      artifact_dir=folder / "artifacts", live=False, log=log, after_cv=score_on_test)
    complete = [t for t in study.trials if t.state.name == "COMPLETE" and "test_spearman" in t.user_attrs]
    best = study.best_trial
    cv = [t.value for t in complete]
    tested = [t.user_attrs["test_spearman"] for t in complete]
    correlation = float(spearmanr(cv, tested).statistic) if len(complete) >= 3 else float("nan")
    replays = []
    if replay:
        n_folds = fold_count(params.cv, train_set.spots["slide"].to_numpy())
        replays = [replay_pruner(study, name, params, n_folds) for name in PRUNERS if name != "none"]
    return SeedResult(family=family, seed=seed, hand_set=hand_test, tuned=best.user_attrs["test_spearman"],
                      plain=plain_test,
                      correlation=correlation, n_complete=len(complete),
                      n_pruned=sum(t.state.name == "PRUNED" for t in study.trials), best_trial=best.number,
                      floor=floor_score(train_set.abundance, test.truth),
                      ceiling=competition_score(test.expected, test.truth),
                      minutes=(time.perf_counter() - start) / 60, replay=replays)


def print_results(results: list[SeedResult], trials: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    table = Table(title=f"hand-set vs tuned recipe on the test slide ({trials} trials per study; defaults "
                        f"chosen on family {DEFAULTS_CHOSEN_ON})", title_justify="left")
    for column in ("family", "seed", "floor", "ceiling", "hand-set", "plain ResNet-18", "tuned", "gain", "tuned - plain",
                   "skill", "CV-test rank corr.", "best trial", "complete / pruned", "minutes"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r.family, str(r.seed), f"{r.floor:.4f}", f"{r.ceiling:.4f}", f"{r.hand_set:.4f}", f"{r.plain:.4f}",
                      f"{r.tuned:.4f}", f"{r.gain:+.4f}", f"{r.tuned - r.plain:+.4f}", f"{r.skill:.2f}", f"{r.correlation:.2f}",
                      f"#{r.best_trial}", f"{r.n_complete} / {r.n_pruned}", f"{r.minutes:.1f}")
    console.print(table)
    for family in dict.fromkeys(r.family for r in results):
        console.print(family_summary(family, [r for r in results if r.family == family]))
    replays = [(f"{r.family} {r.seed}", x) for r in results for x in r.replay]
    if replays:
        table = Table(title="pruners replayed over the unpruned studies' fold scores", title_justify="left")
        for column in ("seed", "pruner", "trials pruned", "folds saved", "pruned that would have improved",
                       "best trial pruned"):
            table.add_column(column, justify="right")
        for seed, x in replays:
            table.add_row(str(seed), x.pruner, str(x.pruned), f"{x.folds_saved:.0%}", str(x.lost),
                          "yes" if x.best_pruned else "no")
        console.print(table)


def family_summary(family: str, results: list[SeedResult]) -> str:
    gains = [r.gain for r in results]
    role = "defaults chosen here" if family == DEFAULTS_CHOSEN_ON else "held out"
    return (f"{family} ({role}, {len(results)} data sets): mean gain {np.mean(gains):+.4f}, worst {min(gains):+.4f}, "
            f"tuned wins {sum(g > 0 for g in gains)} of {len(gains)}, beats the plain ResNet-18 "
            f"{sum(r.tuned > r.plain for r in results)} of {len(results)}, mean skill "
            f"{np.mean([r.skill for r in results]):.2f}, mean CV-test rank correlation "
            f"{np.nanmean([r.correlation for r in results]):.2f}")


def bench_search(families: list[str], seeds: list[int], params_file: Path, overrides: list[str], work: Path,
                 trials: int | None, replay: bool) -> list[SeedResult]:
    results = []
    for family in families:
        for seed in seeds:
            r = run_seed(family, seed, params_file, overrides, work, trials, replay)
            print(f"{family} seed {seed}: floor {r.floor:.4f} ceiling {r.ceiling:.4f} hand-set {r.hand_set:.4f} "
                  f"plain {r.plain:.4f} tuned {r.tuned:.4f} gain {r.gain:+.4f} skill {r.skill:.2f} "
                  f"CV-test rank corr. {r.correlation:.2f} ({r.minutes:.1f} min)", flush=True)
            results.append(r)
    print_results(results, trials or params_from_dict(apply_overrides(read_raw(params_file), overrides)).tune.trials)
    return results
