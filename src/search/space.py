"""The declarative search space (``tune.space`` in params.yaml) and ``suggest(trial) -> Params``.

The space is nested like params.yaml, ``{section: {field: spec}}`` (so ``dvc exp run -S
tune.space.loss.alpha.high=0.9`` works); each entry names a real config field and its spec is a
numeric range ``{low, high[, log][, step]}`` (int or float, following the field's type) or
``{choices: [...]}``. Trial params are named ``section.field``.
``suggest`` is the one function that turns a trial into a config: the search uses it with live
trials and the retrain of the best trial with a fixed one, so both build the exact same recipe.

Conditional fields (``CONDITIONS``) are drawn only when they act: ``train.lr_backbone`` only when a
trial unfreezes backbone blocks, ``loss.log_epsilon`` only for ``log`` targets, and so on; otherwise
the trial does not carry them and TPE spends no samples on them. Fields a trial cannot honour as a
searched value (``UNSEARCHABLE``) are an error with the reason.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable

from src.core.config import check_field, params_from_dict
from src.core.config import field_type as annotation_of
from src.core.errors import InputError
from src.core.sections import Params
from src.model.backbone import backbone_block_count, check_weights

NOT_SEARCHABLE = {"data", "simulate", "stain", "patches", "tune", "pretrain"}  # data stages, the search itself,
# and the backbone training every trial of a study starts from
RANGE_KEYS = {"low", "high", "log", "step"}
UNSEARCHABLE = {
    "infer.smoothing_sigma": "every trial scores its out-of-fold predictions with each of tune.sigma_grid "
                             "and keeps the best (free: no retraining); list the sigmas there",
    "train.final": "the CV scores fold models either way; it cannot tell ensemble from retrain",
    "cv": "the CV is the yardstick trials are compared by; set it in params.yaml",
    "train.feature_cache": "it changes how a trial runs, not the recipe",
    "train.cache_dir": "it changes how a trial runs, not the recipe",
    "train.num_workers": "it changes how a trial runs, not the recipe",
    "train.compile": "it changes how a trial runs, not the recipe",
    "infer.batch_size": "it changes how a trial runs, not the recipe",
    "train.color_jitter": "the feature cache fixes the backbone input (set it in params.yaml with "
                          "train.feature_cache: false)",
    "train.resized_crop": "the feature cache fixes the backbone input (set it in params.yaml with "
                          "train.feature_cache: false)",
}
# child -> (parent, test on the parent's value, the condition in words)
CONDITIONS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "train.lr_backbone": ("model.unfrozen_blocks", lambda v: v > 0, "model.unfrozen_blocks > 0"),
    "loss.regularization": ("loss.alpha", lambda v: v > 0, "loss.alpha > 0"),
    "loss.log_epsilon": ("loss.target_transform", lambda v: v == "log", "loss.target_transform = log"),
    "model.coord_dim": ("model.fusion", lambda v: v != "none", "model.fusion != none"),
}


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
    """The field's plain type (int, float, str, bool, or the Literal of its choices)."""
    section, field_name = name.split(".", 1)
    sections = typing.get_type_hints(Params)
    if section not in sections:
        raise InputError(f"params: tune.space.{name}: unknown section {section!r}")
    if section in NOT_SEARCHABLE:
        raise InputError(f"params: tune.space.{name}: {section}.* cannot be searched (set it in params.yaml)")
    annotation = annotation_of(section, field_name)
    if annotation is None:
        known = ", ".join(f.name for f in dataclasses.fields(sections[section]))
        raise InputError(f"params: tune.space.{name}: unknown field (known in {section}: {known})")
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _check_searched(where: str, name: str, value: Any, what: str) -> None:
    """A value the space would give a trial must be one params.yaml accepts for the field."""
    try:
        check_field(*name.split(".", 1), value)
    except InputError as err:
        raise InputError(f"{where}: {what} {value!r} is not a valid value ({str(err).removeprefix('params: ')})") from None


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
        reason = UNSEARCHABLE.get(name) or UNSEARCHABLE.get(name.split(".", 1)[0])
        if reason is not None:
            raise InputError(f"{where}: cannot be searched: {reason}")
        if not isinstance(spec, dict):
            raise InputError(f"{where}: expected {{low, high}} or {{choices: [...]}}, got {spec!r}")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list) or not spec["choices"]:
                raise InputError(f"{where}: choices must be the only key and a non-empty list")
            for choice in spec["choices"]:
                if not _fits(choice, field_type):
                    raise InputError(f"{where}: choice {choice!r} is not a valid {_type_name(field_type)}")
                _check_searched(where, name, choice, "choice")
            out.append(SearchParam(name, "categorical", choices=tuple(spec["choices"])))
            continue
        if field_type not in (int, float):
            raise InputError(f"{where}: a {_type_name(field_type)} field needs {{choices: [...]}}")
        if not {"low", "high"} <= set(spec) or set(spec) - RANGE_KEYS:
            raise InputError(f"{where}: a range needs low and high (optional log, step), got {sorted(spec)}")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
            raise InputError(f"{where}: low = {low!r} and high = {high!r} must be numbers with low <= high")
        log, step = spec.get("log", False), spec.get("step")
        if not isinstance(log, bool):
            raise InputError(f"{where}: log = {log!r}: expected true or false")
        if log and low <= 0:
            raise InputError(f"{where}: log ranges need low > 0, got {low}")
        kind = "int" if field_type is int else "float"
        if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise InputError(f"{where}: {name} is an integer field; low/high must be integers")
        if step is not None:  # Optuna's own rules, which it would only raise inside the first trial
            if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 \
                    or (kind == "int" and not float(step).is_integer()):
                raise InputError(f"{where}: step = {step!r}: expected a positive "
                                 f"{'integer' if kind == 'int' else 'number'}")
            if log and (kind == "float" or step != 1):
                raise InputError(f"{where}: log and step = {step!r} together: Optuna samples a log range "
                                 f"{'without a step' if kind == 'float' else 'only with step 1'}; drop one")
        for end in (low, high):
            _check_searched(where, name, float(end) if kind == "float" else int(end), "range end")
        out.append(SearchParam(name, kind, low=low, high=high, log=log, step=spec.get("step")))
    return _parents_first(out)


def _parents_first(space: list[SearchParam]) -> list[SearchParam]:
    """Order the space so a conditional field comes after the field it depends on."""
    parents = {CONDITIONS[p.name][0] for p in space if p.name in CONDITIONS}
    return [p for p in space if p.name in parents] + [p for p in space if p.name not in parents]


def _value(raw: dict, name: str) -> Any:
    section, field_name = name.split(".", 1)
    return raw[section][field_name]


def active(name: str, raw: dict) -> bool:
    """Whether a field acts in the recipe ``raw`` (its condition, if any, holds there)."""
    if name not in CONDITIONS:
        return True
    parent, test, _ = CONDITIONS[name]
    return bool(test(_value(raw, parent)))


def values_of(space: list[SearchParam], name: str, base_raw: dict) -> list[Any]:
    """Every value ``name`` can take in the study (choices, range ends, or the hand-set value)."""
    for p in space:
        if p.name == name:
            return list(p.choices) if p.kind == "categorical" else [p.low, p.high]
    return [_value(base_raw, name)]


def _type_name(field_type: Any) -> str:
    if typing.get_origin(field_type) is typing.Literal:
        return "name"
    return getattr(field_type, "__name__", str(field_type))


def _fits(value: Any, field_type: Any) -> bool:
    if typing.get_origin(field_type) is typing.Literal:
        return isinstance(value, str)
    if field_type is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if field_type is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if field_type in (str, bool):
        return isinstance(value, field_type)
    return False  # lists and mappings cannot be Optuna choices


RUN_DIGITS = 12


def run_value(value: Any) -> Any:
    """The value a trial runs with: a drawn float cut to 12 significant digits, so that it reads back
    exactly wherever it is written. DVC re-writes ``dvc.lock`` through ruamel.yaml, which changes
    many floats of 14 or more digits in exponent notation by one unit in the last place
    (2.559642090152666e-06 -> ...665e-06); `dvc status` then calls ``best_params.yaml`` modified."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{RUN_DIGITS}g}")
    return value


def suggest(trial: Any, space: list[SearchParam], base_raw: dict) -> Params:
    """Draw every searched value that acts from ``trial`` and return the full config (base + draws)."""
    raw = copy.deepcopy(base_raw)
    for p in space:
        if not active(p.name, raw):
            continue
        if p.kind == "categorical":
            value = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            value = trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            value = run_value(trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log))
        raw[p.section][p.field] = value
    return params_from_dict(raw)


def defaults(space: list[SearchParam], base_raw: dict) -> dict[str, Any]:
    """The hand-set values (params.yaml) of the searched fields that act; they must lie inside the space."""
    values = {}
    for p in space:
        if not active(p.name, base_raw):
            continue
        value = base_raw[p.section][p.field]
        if not p.contains(value):
            raise InputError(f"params: {p.name} = {value!r} lies outside tune.space.{p.name}; widen the "
                             "range so the hand-set recipe can be the first trial")
        values[p.name] = value
    return values


def check_space(space: list[SearchParam], base_raw: dict, patch_size: int) -> None:
    """Values no trial could honour are an error before the study starts: a context wider than the
    stored patches, more unfrozen blocks than a searched backbone has."""
    most = max(values_of(space, "model.unfrozen_blocks", base_raw))
    model = params_from_dict(base_raw).model
    for backbone in values_of(space, "model.backbone", base_raw):
        check_weights(dataclasses.replace(model, backbone=backbone))
        blocks = backbone_block_count(backbone, model.weights)
        if most > blocks:
            raise InputError(f"params: model.unfrozen_blocks up to {most} (tune.space or params.yaml), but "
                             f"{backbone} has {blocks} blocks")
