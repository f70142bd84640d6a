"""Knowledge carried over between studies: a fresh study first runs the best recipes of earlier ones.

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

from src.search.identity import earlier_versions
from src.search.space import SearchParam

WARM_START_ATTR = "warm_start"


def fitting_recipe(params: dict[str, Any], space: list[SearchParam], hand_set: dict[str, Any]) -> dict | None:
    """``params`` completed with hand-set values, or None when one of them lies outside the space."""
    by_name = {p.name: p for p in space}
    for name, value in params.items():
        if name not in by_name or not by_name[name].contains(value):
            return None
    return {**hand_set, **params}


def earlier_recipes(storage: optuna.storages.BaseStorage, name: str, current: str, data: str,
                    space: list[SearchParam], hand_set: dict[str, Any], k: int) -> list[tuple[dict, dict]]:
    """Up to ``k`` distinct (recipe, origin) pairs from earlier studies ``name-*`` of the training data
    ``data`` (a patch store digest), best first per study, newest study first; the hand-set recipe itself
    is not repeated. Recipes tuned on other data do not carry over (docs/recipe-and-search.md)."""
    chosen: list[tuple[dict, dict]] = []
    seen = [hand_set]
    for frozen in earlier_versions(storage, name, current):
        if frozen.user_attrs.get("data") != data:
            continue
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


def enqueue_warm_start(study: optuna.Study, storage: optuna.storages.BaseStorage, name: str, data: str,
                       space: list[SearchParam], hand_set: dict[str, Any], k: int) -> list[str]:
    """Queue the earlier recipes of the same data on a new study; returns one line per queued recipe."""
    if k <= 0:
        return []
    lines = []
    for recipe, origin in earlier_recipes(storage, name, study.study_name, data, space, hand_set, k):
        study.enqueue_trial(recipe, user_attrs={WARM_START_ATTR: origin})
        lines.append(f"warm start: queued trial {origin['trial']} of study {origin['study']} "
                     f"(CV spearman {origin['value']:.4f} there)")
    return lines
