"""The model families, one module each (`sd`, `sdxl`, `dit4sr`), registered on import.

`legacy_family` is the one place that infers a family: for a `diffsr.json` (or an export manifest)
written before it named one.
"""

from __future__ import annotations

from typing import Any

from diffsr.export.model.families import dit4sr, sd, sdxl  # noqa: F401 (registered on import)
from diffsr.export.model.families.sd import legacy_json

SDXL_KEYS = ("text2_hidden", "text2_layers", "text2_heads", "text2_intermediate", "addition_time_embed_dim")


def legacy_family(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(family, model entry) of a model entry without a family: SDXL where it has a second text encoder,
    SD (its zero SDXL keys dropped) otherwise."""
    if model.get("text2_hidden", 0):
        return sdxl.SDXL.name, model
    return sd.SD.name, legacy_json(model, SDXL_KEYS)
