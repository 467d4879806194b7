"""How a checkpoint folder becomes a network: from its config.json, with no weights (the checkpoint
assigns them). One builder per library: diffusers models, transformers models, and our own modules
(a dataclass config)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
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


def transformers_component(cls: Any, config_cls: Any, tied: tuple[tuple[str, str], ...] = (),
                           library_keys: bool = False) -> Component:
    """A transformers model of this class from its folder's config.json (a `config_cls` dict); either may be given by
    its name in transformers. `tied`: its tied weights, saved by transformers under one name; `library_keys`: its
    weights are stored under the names transformers saves them with (`library_names`)."""

    def build(folder: Path) -> nn.Module:
        model_class, config_class = _resolve(cls, "transformers"), _resolve(config_cls, "transformers")
        try:
            module: nn.Module = model_class(config_class.from_dict(read_config(folder)))
        except (ValueError, TypeError, KeyError) as e:
            raise DiffsrError(f"{folder / 'config.json'} is not a valid {config_class.__name__}: {e}") from None
        return module

    return Component(build, WEIGHTS, tied, library_keys)


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


def library_names(component: Component, folder: Path) -> Callable[[str], str] | None:
    """A stored key -> its network's name, as transformers renames it on loading (its conversion mapping for the
    network's classes: published SegFormer folders hold `encoder.block.0.0.attention.self.key`, which transformers 5
    loads as `stages.0.blocks.0.attention.k_proj`); None for a component stored under its network's names. Made each
    call: a meta network, some tens of milliseconds."""
    if not component.library_keys:
        return None
    from accelerate import init_empty_weights
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    with init_empty_weights(include_buffers=False):
        conversions = get_model_conversion_mapping(component.build(folder))
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]

    def rename(key: str) -> str:
        new, converted = rename_source_key(key, renamings, converters)
        if converted is not None:
            raise DiffsrError(f"{folder}: transformers converts its stored {key!r} (merges or splits tensors) on "
                              "loading; diffsr reads one tensor a key")
        return str(new)

    return rename


def library_tensors(component: Component, net: nn.Module, tensors: dict[str, Any]) -> dict[str, Any]:
    """A network's tensors under the names its library stores them with (what `library_names` reads back)."""
    if not component.library_keys:
        return tensors
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(net, tensors))
