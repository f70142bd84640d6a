"""A pydantic validation error of params as one line naming the key and the value (the first problem
found), in the project's wording: ``params: infer.tta[0] = 'spin': choose identity, hflip, ...``."""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from pydantic import ValidationError

QUOTED = r"'([^']*)'"  # the choices in pydantic's "'a', 'b' or 'c'"
TYPES = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
         "bool_type": "true or false", "string_type": "a string", "list_type": "a list", "dict_type": "a mapping"}


def describe_value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _where(prefix: str, loc: tuple) -> str:
    text = prefix
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f"{'.' if text else ''}{part}"
    return text


def _known(root: type | None, loc: tuple) -> str:
    """`` (known: a, b, c)``: the fields of the section an unknown key was found in."""
    cls: Any = root
    for part in loc[:-1]:
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        cls = hints.get(part)
    if not dataclasses.is_dataclass(cls):
        return ""
    return f" (known: {', '.join(f.name for f in dataclasses.fields(cls))})"


def one_line(err: ValidationError, prefix: str = "", root: type | None = None) -> str:
    """The first error of ``err``; ``prefix`` names where the validated value sits (``section.field``),
    ``root`` is the validated type (for the list of known keys)."""
    first = err.errors()[0]
    kind, loc, ctx = first["type"], tuple(first["loc"]), first.get("ctx") or {}
    where, value = _where(prefix, loc), first.get("input")
    if kind == "missing":
        return f"params: missing key {where}"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"params: unknown key {where}{_known(root, loc)}"
    if kind == "dataclass_type":
        return f"params: section {where} must be a mapping, got {value!r}"
    if kind in TYPES:
        return f"params: {where} must be {TYPES[kind]}, got {value!r}"
    shown = f"params: {where} = {describe_value(value)}"
    if kind == "literal_error":
        return f"{shown}: choose {', '.join(re.findall(QUOTED, ctx.get('expected', '')))}"
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
              "less_than": ("<", "lt")}
    if kind in bounds:
        sign, key = bounds[kind]
        return f"{shown}: must be {sign} {ctx[key]:g}"
    if kind in ("too_short", "too_long"):
        n = ctx["min_length"] if kind == "too_short" else ctx["max_length"]
        return f"{shown}: expected at {'least' if kind == 'too_short' else 'most'} {n} value{'s' if n > 1 else ''}"
    return f"{shown}: {first['msg']}"
