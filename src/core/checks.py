"""The checks a config section's fields declare in their annotations: choices (``Literal``), bounds
and lengths (``Annotated[..., AtLeast(1)]``), and the conversion of YAML values to the field types.

A :class:`Section` (a frozen dataclass of ``src.core.config``) checks its fields whenever it is made,
from params.yaml or in code, so no worker has to check a value again.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from src.core.errors import InputError


@dataclass(frozen=True)
class Bound:
    """A numeric bound of a field: ``value >= low`` (or ``> low`` when ``strict``), ``value <= high``."""

    low: float | None = None
    high: float | None = None
    strict: bool = False

    def violated(self, value: float) -> str | None:
        if self.low is not None and (value <= self.low if self.strict else value < self.low):
            return f"must be {'>' if self.strict else '>='} {self.low:g}"
        if self.high is not None and value > self.high:
            return f"must be <= {self.high:g}"
        return None


@dataclass(frozen=True)
class Length:
    """A list field's exact length (``what`` says what its items are, for the error message)."""

    n: int
    what: str


def AtLeast(low: float) -> Bound:  # noqa: N802 -- reads as a type annotation
    return Bound(low=low)


def Above(low: float) -> Bound:  # noqa: N802
    return Bound(low=low, strict=True)


def Within(low: float, high: float) -> Bound:  # noqa: N802
    return Bound(low=low, high=high)


class Section:
    """Base of the config sections: every field's choices and bounds are checked when a section is
    made (from params.yaml or in code), then ``check`` relates fields to each other."""

    section: typing.ClassVar[str] = ""  # its key in params.yaml (``class LossConfig(Section, key="loss")``)

    def __init_subclass__(cls, key: str = "", **kwargs):
        super().__init_subclass__(**kwargs)
        cls.section = key

    def __post_init__(self):
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            check_rules(getattr(self, f.name), hints[f.name], f"{self.section}.{f.name}")
        self.check()

    def check(self) -> None:
        """Rules between fields (none by default)."""



def choices(annotation: Any) -> tuple[str, ...]:
    """The names a ``Literal`` field (or a list of them) may take."""
    if typing.get_origin(annotation) in (Annotated, list):
        return choices(typing.get_args(annotation)[0])
    return typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()


def describe_value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_rules(value: Any, annotation: Any, where: str) -> None:
    """Choices (``Literal``), bounds and lengths (``Annotated``) of a value of the right type."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *rules = typing.get_args(annotation)
        for rule in rules:
            if isinstance(rule, Length) and rule.n < 0 and not value:
                raise InputError(f"params: {where}: list at least one of the {rule.what}")
            if isinstance(rule, Length) and rule.n >= 0 and len(value) != rule.n:
                raise InputError(f"params: {where} = {value}: expected {rule.what}")
        check_rules(value, base, where)
        for rule in rules:
            if isinstance(rule, Bound) and (problem := rule.violated(value)):
                raise InputError(f"params: {where} = {describe_value(value)}: {problem}")
    elif origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise InputError(f"params: {where} = {describe_value(value)}: choose {', '.join(allowed)}")
    elif origin is list:
        (item_type,) = typing.get_args(annotation)
        for i, item in enumerate(value):
            check_rules(item, item_type, f"{where}[{i}]")
    elif origin is dict:
        _, val_type = typing.get_args(annotation)
        for key, item in value.items():
            check_rules(item, val_type, f"{where}.{key}")


def convert(value: Any, annotation: Any, where: str) -> Any:
    """A YAML value as the field's type (ints where floats are expected become floats); choices and
    bounds are the section's to check."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return convert(value, typing.get_args(annotation)[0], where)
    if origin is Literal:
        if not isinstance(value, str):
            allowed = ", ".join(typing.get_args(annotation))
            raise InputError(f"params: {where} = {describe_value(value)}: choose {allowed}")
        return value
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, where)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"params: {where} must be a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"params: {where} must be an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise InputError(f"params: {where} must be true or false, got {value!r}")
        return value
    if annotation is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InputError(f"params: {where} must be a string, got {value!r}")
        return value
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(f"params: {where} must be a mapping, got {value!r}")
        _, val_type = typing.get_args(annotation)
        return {str(k): convert(v, val_type, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise InputError(f"params: {where} must be a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [convert(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is typing.Any:
        return value
    raise TypeError(f"unsupported annotation {annotation!r} at {where}")


def build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise InputError(f"params: section {where or 'top level'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    known = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{where}." if where else ""
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise InputError(f"params: unknown key {prefix}{unknown[0]} (known: {', '.join(known)})")
    missing = [k for k in known if k not in raw]
    if missing:
        raise InputError(f"params: missing key {prefix}{missing[0]}")
    return cls(**{k: convert(raw[k], hints[k], prefix + k) for k in known})
