"""The model families, one module each (`sd`, `sdxl`, `dit4sr`, `xpsr`, `refsr`, `sisrm`), registered on import, and the lookups by name.

A family defined elsewhere (a package of one's own) registers when its module is imported: `model_from_json` takes
that module's name (a checkpoint's `diffsr.json`, an export's manifest and a Triton model repository record it) and
imports it where the family is not yet known; `load_plugins` imports the modules `DIFFSR_FAMILIES` names
(comma-separated) and those installed under the `diffsr.families` entry-point group, so that the command line knows
their request inputs before it parses.

`legacy_family` is the one place that infers a family: for a `diffsr.json` (or an export manifest)
written before it named one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Iterable
from typing import Any

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachments import attachments_from_json
from diffsr.export.model.families import dit4sr, refsr, sd, sdxl, sisrm, xpsr  # noqa: F401 (registered on import)
from diffsr.export.model.families.sd import legacy_json
from diffsr.export.model.family import FAMILIES, ModelFamily

SDXL_KEYS = ("text2_hidden", "text2_layers", "text2_heads", "text2_intermediate", "addition_time_embed_dim")


PLUGINS_ENV = "DIFFSR_FAMILIES"
ENTRY_POINTS = "diffsr.families"


def families() -> dict[str, type[ModelFamily]]:
    return dict(FAMILIES)


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import the modules of families of one's own (which register on import): `modules`, those `DIFFSR_FAMILIES`
    names, and those installed under the `diffsr.families` entry-point group."""
    named = [*modules, *(m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip())]
    for module in dict.fromkeys(named):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise DiffsrError(f"cannot import the family module {module!r} ({e}): install it where diffsr runs, or fix "
                              f"{PLUGINS_ENV}") from None
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        entry.load()


def family(name: str, module: str | None = None) -> type[ModelFamily]:
    """A registered family by name; `module`: where one not yet registered is defined (imported to register it)."""
    if name not in FAMILIES and module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise DiffsrError(f"model family {name!r}: cannot import its module {module!r} ({e}): install it where "
                              "diffsr runs") from None
    if name not in FAMILIES:
        raise DiffsrError(f"unknown model family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def presets() -> dict[str, ModelFamily]:
    """Every family's presets, by name."""
    return {p: f(cfg) for f in FAMILIES.values() for p, cfg in f.presets.items()}


def preset(name: str) -> ModelFamily:
    found = presets()
    if name not in found:
        raise DiffsrError(f"unknown preset {name!r}; choose one of {sorted(found)}")
    return found[name]


def model_from_json(family_name: str | None, data: dict[str, Any], module: str | None = None) -> ModelFamily:
    """A model from a `diffsr.json` (or manifest) family and model entry, its attachments' entries included. One
    written before families had a name holds none: `legacy_family` infers it."""
    if not isinstance(data, dict):
        raise DiffsrError(f"a model entry must be a JSON object, not {type(data).__name__}")
    attachments, data = attachments_from_json(data)
    if family_name is None:
        family_name, data = legacy_family(data)
    return family(family_name, module).from_json(data, attachments)


def module_of(model: ModelFamily) -> str | None:
    """The module that defines (and so registers) a model's family; None for one defined in a script run as
    `__main__`, which no other process can import."""
    module = type(model).__module__
    return None if module == "__main__" else module


def legacy_family(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(family, model entry) of a model entry without a family: SDXL where it has a second text encoder,
    SD (its zero SDXL keys dropped) otherwise."""
    if model.get("text2_hidden", 0):
        return sdxl.SDXL.name, model
    return sd.SD.name, legacy_json(model, SDXL_KEYS)
