"""The recipe stage ``train`` delivers: params.yaml's hand-set one, or a study's best trial
(``studies/best_params.yaml``) rebuilt with the same ``suggest`` the search used, with the smoothing
sigma that trial's CV chose."""
from __future__ import annotations

import copy
from pathlib import Path

import optuna
import yaml

from src.core.errors import InputError
from src.core.sections import Params
from src.search.space import parse_space, suggest


def params_for_best(best_file: Path, base_raw: dict) -> Params:
    """The best trial's full config: base params, its searched values and its smoothing sigma."""
    if not best_file.is_file():
        raise InputError(f"{best_file}: not found (run `python -m src.tune` or `dvc repro tune` first)")
    record = yaml.safe_load(best_file.read_text())
    if not isinstance(record, dict) or not isinstance(record.get("params"), dict):
        raise InputError(f"{best_file}: expected a mapping with 'params'")
    return params_for_trial(record["params"], record.get("smoothing_sigma"), base_raw, str(best_file))


def params_for_delivery(delivery_file: Path, base_raw: dict) -> list[tuple[Params, float, str]]:
    """Every delivered member's full config, its weight and its name (``studies/ensemble.yaml``)."""
    if not delivery_file.is_file():
        raise InputError(f"{delivery_file}: not found (run `python -m src.tune` or `dvc repro tune` first)")
    record = yaml.safe_load(delivery_file.read_text())
    members = record.get("members") if isinstance(record, dict) else None
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and isinstance(m.get("params"), dict) and isinstance(m.get("weight"), (int, float))
            and m["weight"] > 0 for m in members):
        raise InputError(f"{delivery_file}: expected 'members', each with 'params' and a positive 'weight'")
    return [(params_for_trial(m["params"], m.get("smoothing_sigma"), base_raw,
                              f"{delivery_file} (trial {m.get('trial')})"), float(m["weight"]),
             f"trial {m.get('trial')}") for m in members]


def params_for_trial(values: dict, sigma: float | None, base_raw: dict, source: str) -> Params:
    """A trial's full config: base params, its searched ``values`` and its smoothing ``sigma``
    (``source`` names where the values came from, for errors)."""
    raw = copy.deepcopy(base_raw)
    if sigma is not None:
        raw["infer"]["smoothing_sigma"] = float(sigma)
    space = parse_space(raw["tune"]["space"])
    for p in space:
        if p.name in values and not p.contains(values[p.name]):
            raise InputError(f"{source}: {p.name} = {values[p.name]!r} lies outside "
                             f"tune.space.{p.name} (space changed? rerun tune)")
    try:
        return suggest(optuna.trial.FixedTrial(values), space, raw)
    except ValueError as err:  # FixedTrial: a searched param that acts in this recipe has no value
        missing = str(err).split("'")[1] if "'" in str(err) else str(err)
        raise InputError(f"{source}: no value for searched param {missing} (space changed? rerun tune)") from None
