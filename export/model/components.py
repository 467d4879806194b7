"""How a checkpoint folder becomes a network: from its config.json, with no weights (the checkpoint
assigns them). One builder per library: diffusers models, transformers models, and our own modules
(a dataclass config)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from diffsr.export.core.configs import dataclass_from_json
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.parts import Component

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS = "model.safetensors"


def read_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "config.json", "checkpoint file", "create one with `diffsr init` or fix --checkpoint")


def _resolve(cls: Any, module: str) -> Any:
    """A class, or its name in `module` (imported when a network is first built: reading a checkpoint's folders and
    checking its files import neither diffusers nor transformers)."""
    if not isinstance(cls, str):
        return cls
    where, _, name = cls.rpartition(":")
    return getattr(importlib.import_module(where or module), name)


def diffusers_component(cls: Any) -> Component:
    """A diffusers model (ModelMixin) of this class (or its name in diffusers) from its folder's config.json."""
    name = cls if isinstance(cls, str) else cls.__name__

    def build(folder: Path) -> nn.Module:
        config = read_config(folder)
        if config.get("_class_name", name) != name:
            raise DiffsrError(f"{folder / 'config.json'} describes a {config['_class_name']}, expected {name}")
        model_class = _resolve(cls, "diffusers")
        try:
            module: nn.Module = model_class.from_config(config)
        except (ValueError, TypeError, KeyError) as e:
            raise DiffsrError(f"{folder / 'config.json'} is not a valid {name} config: {e}") from None
        return module

    return Component(build, DIFFUSERS_WEIGHTS)


def transformers_component(cls: Any, config_cls: Any, tied: tuple[tuple[str, str], ...] = ()) -> Component:
    """A transformers model of this class from its folder's config.json (a `config_cls` dict); either may be given by
    its name in transformers. `tied`: its tied weights, saved by transformers under one name."""

    def build(folder: Path) -> nn.Module:
        model_class, config_class = _resolve(cls, "transformers"), _resolve(config_cls, "transformers")
        try:
            module: nn.Module = model_class(config_class.from_dict(read_config(folder)))
        except (ValueError, TypeError, KeyError) as e:
            raise DiffsrError(f"{folder / 'config.json'} is not a valid {config_class.__name__}: {e}") from None
        return module

    return Component(build, WEIGHTS, tied)


def our_component(cls: Any, config_cls: Any) -> Component:
    """One of our modules, built from a dataclass config stored as its config.json; either may be given as
    "module:Name", imported when first built."""

    def build(folder: Path) -> nn.Module:
        config = dataclass_from_json(_resolve(config_cls, ""), read_config(folder), str(folder / "config.json"))
        module: nn.Module = _resolve(cls, "")(config)
        return module

    return Component(build, WEIGHTS)


def diffusers_config(net: Any) -> dict[str, Any]:
    """A diffusers network's config.json: its config without the private keys, named by its class."""
    return {k: v for k, v in net.config.items() if not k.startswith("_")} | {"_class_name": type(net).__name__}
