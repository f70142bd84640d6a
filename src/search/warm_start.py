"""Knowledge carried over between studies: a fresh study first runs a portfolio of recipes that did well
on other data, then the best recipes of earlier studies of its own name.

``tune.portfolio`` is a fixed list of recipes (searched field -> value; the other searched fields take
their hand-set values), queued in order after the hand-set recipe on every new study, as zero-shot
HPO and AutoGluon's presets start from configurations that did well across data sets. A recipe that
does not fit the study's space (a field the space leaves out, a value outside its range) is skipped
with a line saying so; a name that is no params field is an error before the study starts. Each
queued trial records its place in the list (user attribute ``portfolio``).

A study starts fresh whenever the data, the trial code or the recipe changes (``src.study_identity``),
and TPE would start from nothing. With ``tune.warm_start: K`` (0 = off) the new study queues, after the
hand-set recipe, the K best complete recipes of the earlier studies of the same name in the same
storage, newest study first, that still fit the search space (every value a searched field of the
space, inside its range or choices; fields new to the space take their hand-set value, except
conditional ones inactive in the hand-set recipe, which the sampler draws). Each queued trial records
where it came from (user attribute ``warm_start``: study, trial, value there).
"""
from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from src.core.config import field_type
from src.core.errors import InputError
from src.search.identity import earlier_versions
from src.search.space import SearchParam

WARM_START_ATTR = "warm_start"
PORTFOLIO_ATTR = "portfolio"


def fitting_recipe(params: dict[str, Any], space: list[SearchParam], hand_set: dict[str, Any]) -> dict | None:
    """``params`` completed with hand-set values, or None when one of them lies outside the space."""
    by_name = {p.name: p for p in space}
    for name, value in params.items():
        if name not in by_name or not by_name[name].contains(value):
            return None
    return {**hand_set, **params}


def check_portfolio(portfolio: list[dict[str, Any]]) -> None:
    """Every name of every portfolio recipe is a params field (``section.field``)."""
    for i, recipe in enumerate(portfolio):
        for name in recipe:
            section, _, key = str(name).partition(".")
            if not key or field_type(section, key) is None:
                raise InputError(f"params: tune.portfolio[{i}]: {name!r} is no params field (section.field)")


def enqueue_portfolio(study: optuna.Study, space: list[SearchParam], hand_set: dict[str, Any],
                      portfolio: list[dict[str, Any]]) -> tuple[list[dict], list[str]]:
    """Queue the portfolio recipes that fit the space on a new study; returns the queued recipes and
    one line per recipe (queued, a repeat of one queued before, or outside the space)."""
    queued, lines = [], []
    for i, values in enumerate(portfolio):
        recipe = fitting_recipe(values, space, hand_set)
        if recipe is None:
            lines.append(f"portfolio: recipe {i} skipped, it lies outside tune.space")
        elif recipe == hand_set or recipe in queued:
            lines.append(f"portfolio: recipe {i} skipped, the same as one queued before it")
        else:
            study.enqueue_trial(recipe, user_attrs={PORTFOLIO_ATTR: i})
            queued.append(recipe)
            lines.append(f"portfolio: queued recipe {i}")
    return queued, lines


def earlier_recipes(storage: optuna.storages.BaseStorage, name: str, current: str, space: list[SearchParam],
                    hand_set: dict[str, Any], k: int, queued: list[dict] = ()) -> list[tuple[dict, dict]]:
    """Up to ``k`` distinct (recipe, origin) pairs from earlier studies ``name-*``, best first per
    study, newest study first; neither the hand-set recipe nor one of ``queued`` is repeated."""
    chosen: list[tuple[dict, dict]] = []
    seen = [hand_set, *queued]
    for frozen in earlier_versions(storage, name, current):
        if len(chosen) >= k:
            break
        trials = storage.get_all_trials(storage.get_study_id_from_name(frozen.study_name), deepcopy=False,
                                        states=(TrialState.COMPLETE,))
        for trial in sorted(trials, key=lambda t: t.value, reverse=True):
            recipe = fitting_recipe(trial.params, space, hand_set)
            if recipe is None or recipe in seen:
                continue
            seen.append(recipe)
            chosen.append((recipe, {"study": frozen.study_name, "trial": trial.number,
                                    "value": round(trial.value, 6)}))
            if len(chosen) >= k:
                break
    return chosen


def enqueue_warm_start(study: optuna.Study, storage: optuna.storages.BaseStorage, name: str,
                       space: list[SearchParam], hand_set: dict[str, Any], k: int, queued: list[dict] = ()
                       ) -> list[str]:
    """Queue the earlier recipes on a new study (none of ``queued`` again); one line per queued recipe."""
    if k <= 0:
        return []
    lines = []
    for recipe, origin in earlier_recipes(storage, name, study.study_name, space, hand_set, k, queued):
        study.enqueue_trial(recipe, user_attrs={WARM_START_ATTR: origin})
        lines.append(f"warm start: queued trial {origin['trial']} of study {origin['study']} "
                     f"(CV spearman {origin['value']:.4f} there)")
    return lines
