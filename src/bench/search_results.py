"""The rows of ``python -m src.bench search`` and how they are printed: per data set, per family, per budget."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from src.core.errors import InputError

DEFAULTS_CHOSEN_ON = "compartments"  # the family the defaults, space and levers were chosen on


@dataclass
class Delivery:
    """What stage ``train`` delivers after the first ``budget`` finished trials, scored on the test slide."""
    budget: int
    best_trial: int
    best_trial_test: float  # the best-CV trial
    cv_best_trial: float
    ensemble_test: float  # the ensemble selected over the complete trials
    cv_ensemble: float
    nested_single: float
    nested_ensemble: float
    members: int
    delivered: str  # "ensemble" or "single": the nested CV's choice
    delivered_test: float
    delivered_cv: float = float("nan")  # its nested CV (rows written before it was kept: nan)
    delivered_cv_map: float = float("nan")  # the nested CV's map score
    delivered_test_map: float = float("nan")  # the map score on the test slide


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
    deliveries: list[Delivery] = field(default_factory=list)  # at each budget; the last is the whole study
    map_floor: float = float("nan")  # map score of the positions alone on the test slide
    map_ceiling: float = float("nan")  # map score of the noise-free expectation
    replay: list = field(default_factory=list)

    @property
    def delivered(self) -> Delivery:
        return self.deliveries[-1]

    @property
    def gain(self) -> float:
        """What the pipeline delivers after the search, against the hand-set recipe."""
        return self.delivered.delivered_test - self.hand_set

    def delivered_at(self, budget: int) -> Delivery | None:
        """What train delivers after the study's first ``budget`` finished trials (None if not reached)."""
        return next((d for d in self.deliveries if d.budget == budget), None)

    @property
    def skill(self) -> float:
        return (self.delivered.delivered_test - self.floor) / (self.ceiling - self.floor)


def print_results(results: list[SeedResult], trials: int) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    table = Table(title=f"hand-set recipe vs what the search delivers, on the test slide ({trials} trials per study; "
                        f"defaults chosen on family {DEFAULTS_CHOSEN_ON})", title_justify="left")
    for column in ("family", "seed", "floor", "ceiling", "hand-set", "plain ResNet-18", "best trial", "ensemble",
                   "delivered", "gain", "delivered - plain", "skill", "map floor", "map delivered", "map ceiling",
                   "CV-test rank corr.", "complete / pruned", "minutes"):
        table.add_column(column, justify="right")
    for r in results:
        d = r.delivered
        table.add_row(r.family, str(r.seed), f"{r.floor:.4f}", f"{r.ceiling:.4f}", f"{r.hand_set:.4f}",
                      f"{r.plain:.4f}", f"{d.best_trial_test:.4f} (#{d.best_trial})",
                      f"{d.ensemble_test:.4f} ({d.members})", f"{d.delivered_test:.4f} ({d.delivered})",
                      f"{r.gain:+.4f}", f"{d.delivered_test - r.plain:+.4f}", f"{r.skill:.2f}",
                      f"{r.map_floor:.4f}", f"{d.delivered_test_map:.4f}", f"{r.map_ceiling:.4f}",
                      f"{r.correlation:.2f}", f"{r.n_complete} / {r.n_pruned}", f"{r.minutes:.1f}")
    console.print(table)
    for family in dict.fromkeys(r.family for r in results):
        console.print(family_summary(family, [r for r in results if r.family == family]), soft_wrap=True)
    print_budgets(console, results)
    for family in dict.fromkeys(r.family for r in results):
        for line in budget_summaries(family, [r for r in results if r.family == family]):
            console.print(line, soft_wrap=True)
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


def print_budgets(console, results: list[SeedResult]) -> None:
    """Per budget: the best trial's CV (biased upward), the nested CV of what is delivered, the test."""
    from rich.table import Table

    table = Table(title="by budget (a study's first N finished trials): the best CV, the nested CV of the "
                        "delivered choice, and the test", title_justify="left")
    for column in ("family", "seed", "trials", "best-trial CV", "best-trial test", "ensemble OOF", "ensemble test",
                   "nested single / ensemble", "delivered", "delivered test", "delivered map: CV / test"):
        table.add_column(column, justify="right")
    for r in results:
        for d in r.deliveries:
            table.add_row(r.family, str(r.seed), str(d.budget), f"{d.cv_best_trial:.4f}", f"{d.best_trial_test:.4f}",
                          f"{d.cv_ensemble:.4f}", f"{d.ensemble_test:.4f}",
                          f"{d.nested_single:.4f} / {d.nested_ensemble:.4f}", d.delivered, f"{d.delivered_test:.4f}",
                          f"{d.delivered_cv_map:.4f} / {d.delivered_test_map:.4f}")
    console.print(table)


def family_summary(family: str, results: list[SeedResult]) -> str:
    ensemble_minus_best = [r.delivered.ensemble_test - r.delivered.best_trial_test for r in results]
    role = "defaults chosen here" if family == DEFAULTS_CHOSEN_ON else "held out"
    return (f"{family} ({role}, {len(results)} data sets): "
            f"{gain_summary(results, [r.delivered for r in results])}; ensemble - best trial "
            f"on the test {np.mean(ensemble_minus_best):+.4f}, ensemble delivered "
            f"{sum(r.delivered.delivered == 'ensemble' for r in results)} of {len(results)}; mean skill "
            f"{np.mean([r.skill for r in results]):.2f}; mean map score "
            f"{np.mean([r.delivered.delivered_test_map for r in results]):.4f} (floor "
            f"{np.mean([r.map_floor for r in results]):.4f}); mean CV-test rank correlation "
            f"{np.nanmean([r.correlation for r in results]):.2f}")


def gain_summary(results: list[SeedResult], delivered: list[Delivery]) -> str:
    """Mean and worst gain of ``delivered`` (one per data set) over the hand-set recipe, wins over it and the peer."""
    gains = [d.delivered_test - r.hand_set for d, r in zip(delivered, results)]
    return (f"mean gain {np.mean(gains):+.4f}, worst {min(gains):+.4f}, delivered beats hand-set "
            f"{sum(g > 0 for g in gains)} of {len(gains)}, beats the plain ResNet-18 "
            f"{sum(d.delivered_test > r.plain for d, r in zip(delivered, results))} of {len(results)}")


def budget_summaries(family: str, results: list[SeedResult]) -> list[str]:
    """Per budget that every data set of the family reached: the gain of what train delivers then."""
    lines = []
    for budget in sorted({d.budget for r in results for d in r.deliveries}):
        delivered = [r.delivered_at(budget) for r in results]
        if any(d is None for d in delivered):
            continue
        lines.append(f"{family} after {budget} trials: {gain_summary(results, delivered)}, "
                     f"mean test {np.mean([d.delivered_test for d in delivered]):.4f}")
    return lines


def load_result(path: Path) -> SeedResult:
    """A row as ``run_seed`` wrote it (``result.json``); the pruner replays are left out."""
    raw = json.loads(path.read_text())
    raw["deliveries"] = [Delivery(**d) for d in raw["deliveries"]]
    raw["replay"] = []
    return SeedResult(**raw)


def print_stored_results(work: Path, families: list[str], seeds: list[int]) -> None:
    """The tables of a finished run from its work folder, whatever the code or params are now."""
    paths = [work / f"{family}-seed{seed}" / "result.json" for family in families for seed in seeds]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no result (run python -m src.bench search first)")
    results = [load_result(p) for p in paths]
    print_results(results, max(r.deliveries[-1].budget for r in results))
