"""``params.yaml`` -> :class:`Params`: the one config source, checked when it is read.

The sections are frozen pydantic dataclasses (``src.core.sections``); pydantic checks every value.
Unknown or missing keys, values of the wrong type, names outside a field's choices and numbers outside
its bounds are an :class:`~src.core.errors.InputError` of one line naming the key and the value
(``src.core.checks``), raised by :func:`load_params` before any stage computes or writes anything.
Command lines may override single values with ``--set section.key=value`` (YAML-parsed value).
``python -m src.core.config > params.schema.json`` writes the JSON Schema editors check params.yaml with.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Iterable

import yaml
from pydantic import TypeAdapter, ValidationError

from src.core.checks import one_line
from src.core.errors import InputError
from src.core.sections import Params

PARAMS_FILE = "params.yaml"
SCHEMA_FILE = "params.schema.json"

PARAMS = TypeAdapter(Params)


def _field(section: str, name: str):
    sections = typing.get_type_hints(Params)
    if section not in sections:
        return None
    return sections[section].__pydantic_fields__.get(name)


def field_type(section: str, name: str) -> Any:
    """The plain type of ``section.name`` (int, float, str, bool, a Literal of its choices, ...), or None
    for an unknown field."""
    info = _field(section, name)
    return None if info is None else info.annotation


def check_field(section: str, name: str, value: Any) -> Any:
    """``value`` checked as ``section.name`` would be in params.yaml (for searched values)."""
    info = _field(section, name)
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as err:
        raise InputError(one_line(err, f"{section}.{name}")) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stain.method=macenko"`` -> (["stain", "method"], "macenko"); the value is YAML-parsed."""
    if "=" not in text:
        raise InputError(f"--set {text!r}: expected key=value, e.g. stain.method=macenko")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of the raw params dict with ``--set`` overrides applied (unknown keys raise)."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise InputError(f"--set {text!r}: unknown key {'.'.join(path[: i + 1])}")
            node = node[part]
        if not isinstance(node, dict) or (path[-1] not in node and not _is_open_mapping(path)):
            raise InputError(f"--set {text!r}: unknown key {'.'.join(path)}")
        node[path[-1]] = value
    return raw


def _is_open_mapping(path: list[str]) -> bool:
    """Keys under a ``dict[...]`` field (e.g. patches.offsets.S_1) may be new."""
    cls: Any = Params
    for part in path[:-1]:
        if typing.get_origin(cls) is dict:  # inside a mapping (e.g. tune.space.model.backbone): open
            return True
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return typing.get_origin(cls) is dict


def read_raw(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def params_from_dict(raw: dict) -> Params:
    try:
        return PARAMS.validate_python(raw)
    except ValidationError as err:
        raise InputError(one_line(err, root=Params)) from None


def load_params(path: str | Path = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Load ``params.yaml`` (plus ``--set`` overrides) into :class:`Params`."""
    return params_from_dict(apply_overrides(read_raw(path), overrides))


def to_dict(obj: Any) -> dict:
    """A section (or all params) as a plain dict (for checkpoints and YAML dumps)."""
    return dataclasses.asdict(obj)


def json_schema() -> dict:
    """The JSON Schema of params.yaml (``params.schema.json``; editors with a YAML language server
    complete and check params.yaml with it)."""
    schema = PARAMS.json_schema()
    schema["title"] = "params.yaml of spatial-abundance-automl"
    return schema


def add_params_arguments(parser, example: str) -> None:
    """The ``--params`` and ``--set`` options every stage command shares."""
    parser.add_argument("--params", default=PARAMS_FILE, help=f"params file (default: {PARAMS_FILE})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one param, e.g. {example} (repeatable)")


if __name__ == "__main__":  # python -m src.core.config > params.schema.json
    json.dump(json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
