"""Read one section of params.yaml into a frozen, validated dataclass.

This is the only module that reads params.yaml. It parses YAML 1.2 the way DVC does
(ruamel.yaml), so `1e-3` is a float here exactly as it is in `dvc params diff`; PyYAML would
read it as a string.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.errors import PipelineError

T = TypeVar("T")

PARAMS_FILE = Path("params.yaml")


class ConfigError(PipelineError, ValueError):
    """A user's params are wrong; the message names the file, the key and what is valid."""


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as plain dicts, lists and scalars."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the params file ({exc.strerror})") from exc
    try:
        raw = YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    """Build `cls` from `params.yaml[section]`, checking keys, types and ranges."""
    raw = read_params(path)
    if section not in raw:
        raise ConfigError(f"{path}: missing section '{section}:' (sections present: {sorted(raw)})")
    return from_dict(raw[section], cls, where=f"{path}: {section}")


def from_dict(raw: Any, cls: type[T], where: str) -> T:
    """Convert a mapping to the dataclass `cls`; `where` prefixes every error message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; valid keys are {sorted(known)}")
    values: dict[str, Any] = {}
    for name, field in known.items():
        key = f"{where}.{name}"
        if name in raw:
            values[name] = _convert(raw[name], hints[name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: missing required key")
    try:
        return cls(**values)
    except ConfigError as exc:
        # __post_init__ range checks name only the key; add the file and section.
        raise ConfigError(f"{where}.{exc}") from None


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{key}: {_show(value)} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {_show(value)} is not valid: " + "; or ".join(errors))
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(hint)[:1]
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(hint):
        return from_dict(value, hint, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        # An int is a valid float (lr: 1); a string such as "1e-3" is not, as it is not for DVC.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"{key}: unsupported field type {hint!r}")  # a bug in a params dataclass


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def check(condition: bool, key: str, message: str) -> None:
    """Range check for a params dataclass's __post_init__: `key: message` when false."""
    if not condition:
        raise ConfigError(f"{key}: {message}")
