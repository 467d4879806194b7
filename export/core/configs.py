"""Typed configs from JSON: a dataclass from a dict, unknown or missing keys named."""

from __future__ import annotations

import dataclasses
from typing import Any

from diffsr.export.core.errors import DiffsrError


def dataclass_from_json(cls: Any, data: dict[str, Any], what: str) -> Any:
    """A config dataclass from JSON: unknown or missing keys are errors naming them; lists -> tuples."""
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
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "_class_name"})
    except (TypeError, ValueError) as e:
        raise DiffsrError(f"{what} is not valid: {e}") from None
