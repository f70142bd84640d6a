"""The recipe stage ``train`` delivers: params.yaml's hand-set one, or a study's best trial
(``studies/best_params.yaml``) rebuilt with the same ``suggest`` the search used, with the smoothing
sigma that trial's CV chose."""
from __future__ import annotations

import copy
from pathlib import Path

import optuna
import yaml

from src.core.config import Params
from src.core.errors import InputError
from src.search.space import parse_space, suggest


def params_for_best(best_file: Path, base_raw: dict) -> Params:
    """The best trial's full config: base params, its searched values and its smoothing sigma."""
    if not best_file.is_file():
        raise InputError(f"{best_file}: not found (run `python -m src.tune` or `dvc repro tune` first)")
    record = yaml.safe_load(best_file.read_text())
    if not isinstance(record, dict) or not isinstance(record.get("params"), dict):
        raise InputError(f"{best_file}: expected a mapping with 'params'")
    raw = copy.deepcopy(base_raw)
    if record.get("smoothing_sigma") is not None:
        raw["infer"]["smoothing_sigma"] = float(record["smoothing_sigma"])
    space = parse_space(raw["tune"]["space"])
    for p in space:
        if p.name in record["params"] and not p.contains(record["params"][p.name]):
            raise InputError(f"{best_file}: {p.name} = {record['params'][p.name]!r} lies outside "
                             f"tune.space.{p.name} (space changed? rerun tune)")
    try:
        return suggest(optuna.trial.FixedTrial(record["params"]), space, raw)
    except ValueError as err:  # FixedTrial: a searched param that acts in this recipe has no value
        missing = str(err).split("'")[1] if "'" in str(err) else str(err)
        raise InputError(f"{best_file}: no value for searched param {missing} (space changed? rerun tune)") from None
