"""Typed configs from JSON: a dataclass from a dict, unknown or missing keys named, every value held to its field's
type before anything computes with it (a `diffsr.json` setting written as "20" is refused here, not in the math)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from diffsr.export.core.errors import DiffsrError


def dataclass_from_json(cls: Any, data: dict[str, Any], what: str) -> Any:
    """A config dataclass from JSON: unknown or missing keys are errors naming them; lists -> tuples; each value of
    the type its field declares (an int where a float is asked for is a float)."""
    if not isinstance(data, dict):
        raise DiffsrError(f"{what} must be a JSON object, not {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"_class_name"})
    if unknown:
        raise DiffsrError(f"unknown {what} keys {unknown}; valid keys: {sorted(names)}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise DiffsrError(f"{what} lacks keys {missing}")
    try:
        hints = typing.get_type_hints(cls)
    except NameError:  # an annotation naming what its module imports for type checking only: values taken as they are
        hints = {}
    values = {}
    for key, value in data.items():
        if key == "_class_name":
            continue
        values[key] = value = _to_tuples(value)
        if hints.get(key) is not None and not _fits(value, hints[key]):
            raise DiffsrError(f"{what} {key}={value!r} is not {_name(hints[key])}: fix it in its JSON file")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise DiffsrError(f"{what} is not valid: {e}") from None


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of a field's type (the types configs use: scalars, optionals, tuples, mappings)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, a) for v, a in zip(value, args))
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a type these configs do not use: taken as it is


def _name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        return "a list"
    if typing.get_origin(hint) in (dict, Mapping):
        return "an object"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(hint, str(hint))
