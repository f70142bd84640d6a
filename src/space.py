"""The declarative search space (``tune.space`` in params.yaml) and ``suggest(trial) -> Params``.

The space is nested like params.yaml, ``{section: {field: spec}}`` (so ``dvc exp run -S
tune.space.loss.alpha.high=0.9`` works); each entry names a real config field and its spec is a
numeric range ``{low, high[, log][, step]}`` (int or float, following the field's type) or
``{choices: [...]}``. Trial params are named ``section.field``.
``suggest`` is the one function that turns a trial into a config: the search uses it with live
trials and the retrain of the best trial with a fixed one, so both build the exact same recipe.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from src.config import Params, params_from_dict
from src.errors import InputError

NOT_SEARCHABLE = {"data", "simulate", "stain", "patches", "tune"}  # data stages / the search itself
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass(frozen=True)
class SearchParam:
    name: str  # "section.field"
    kind: str  # int | float | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None

    @property
    def section(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def field(self) -> str:
        return self.name.split(".", 1)[1]

    def contains(self, value: Any) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        return self.low <= value <= self.high


def _field_type(name: str) -> Any:
    section, field_name = name.split(".", 1)
    sections = typing.get_type_hints(Params)
    if section not in sections:
        raise InputError(f"params: tune.space.{name}: unknown section {section!r}")
    if section in NOT_SEARCHABLE:
        raise InputError(f"params: tune.space.{name}: {section}.* cannot be searched (set it in params.yaml)")
    fields = typing.get_type_hints(sections[section])
    if field_name not in fields:
        known = ", ".join(f.name for f in dataclasses.fields(sections[section]))
        raise InputError(f"params: tune.space.{name}: unknown field (known in {section}: {known})")
    return fields[field_name]


def _entries(raw_space: dict) -> list[tuple[str, Any]]:
    entries = []
    for section, fields in raw_space.items():
        if not isinstance(fields, dict):
            raise InputError(f"params: tune.space.{section}: expected field: spec entries, got {fields!r}")
        entries += [(f"{section}.{field_name}", spec) for field_name, spec in fields.items()]
    return entries


def parse_space(raw_space: dict[str, dict]) -> list[SearchParam]:
    """Validate ``tune.space`` against the config dataclasses; unknown keys and bad specs raise."""
    out = []
    for name, spec in _entries(raw_space):
        where = f"params: tune.space.{name}"
        field_type = _field_type(name)
        if not isinstance(spec, dict):
            raise InputError(f"{where}: expected {{low, high}} or {{choices: [...]}}, got {spec!r}")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise InputError(f"{where}: choices must be the only key and a non-empty list")
            for choice in spec["choices"]:
                if not _fits(choice, field_type):
                    raise InputError(f"{where}: choice {choice!r} is not a valid {_type_name(field_type)}")
            out.append(SearchParam(name, "categorical", choices=tuple(spec["choices"])))
            continue
        if field_type not in (int, float):
            raise InputError(f"{where}: a {_type_name(field_type)} field needs {{choices: [...]}}")
        if not {"low", "high"} <= set(spec) or set(spec) - RANGE_KEYS:
            raise InputError(f"{where}: a range needs low and high (optional log, step), got {sorted(spec)}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise InputError(f"{where}: low = {low!r} and high = {high!r} must be numbers with low <= high")
        log = bool(spec.get("log", False))
        if log and low <= 0:
            raise InputError(f"{where}: log ranges need low > 0, got {low}")
        kind = "int" if field_type is int else "float"
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise InputError(f"{where}: {name} is an integer field; low/high must be integers")
        out.append(SearchParam(name, kind, low=low, high=high, log=log, step=spec.get("step")))
    return out


def _type_name(field_type: Any) -> str:
    return getattr(field_type, "__name__", str(field_type))


def _fits(value: Any, field_type: Any) -> bool:
    if field_type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if field_type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if field_type in (str, bool):
        return isinstance(value, field_type)
    return False  # lists and mappings cannot be Optuna choices


def suggest(trial: Any, space: list[SearchParam], base_raw: dict) -> Params:
    """Draw every searched value from ``trial`` and return the full config (base + draws)."""
    raw = copy.deepcopy(base_raw)
    for p in space:
        if p.kind == "categorical":
            value = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            value = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            value = trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)
        raw[p.section][p.field] = value
    return params_from_dict(raw)


def defaults(space: list[SearchParam], base_raw: dict) -> dict[str, Any]:
    """The hand-set values (params.yaml) of the searched fields; they must lie inside the space."""
    values = {}
    for p in space:
        value = base_raw[p.section][p.field]
        if not p.contains(value):
            raise InputError(f"params: {p.name} = {value!r} lies outside tune.space.{p.name}; widen the "
                             "range so the hand-set recipe can be the first trial")
        values[p.name] = value
    return values
