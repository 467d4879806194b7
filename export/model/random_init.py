"""`diffsr init`: a checkpoint folder of a preset with seeded random weights, written in bounded memory.

Every network is built with its parameters on the meta device; each parameter is then drawn on its
own, from a generator seeded by (seed, component, key), and stored in FP16 as SDXL checkpoints are
published. Memory holds one component's FP16 tensors at a time (the SDXL UNet's 5.1 GB), never a
network in FP32; the same preset and seed give the same bytes whatever the order of work.

The draws are `draw.py`'s (PyTorch's own initialisation, zero convolutions drawn too). Copies are copies:
ControlNet's encoder starts as the UNet's, the LQ encoder as the VAE's encoder.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from diffsr.export.core.files import require_new_folder
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.export.model.checkpoint import Checkpoint, checkpoint_meta, open_checkpoint
from diffsr.export.model.components import library_tensors
from diffsr.export.model.draw import STORED_DTYPE, draw_parameter
from diffsr.export.model.families import preset
from diffsr.export.model.family import ModelFamily


def random_tensors(model: ModelFamily, folder: str, net: nn.Module, seed: int,
                   shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, FP16 tensor) for every parameter and persistent buffer of a component, each drawn alone; tied keys
    (T5's embedding) are one tensor, drawn under one name."""
    buffers = dict(net.named_buffers())  # real even now: their values are the network's own
    tied = dict(model.components()[folder].tied)
    kinds = {}
    for module_name, module in net.named_modules():
        for kind, _ in module.named_parameters(recurse=False):
            kinds[f"{module_name}.{kind}" if module_name else kind] = (module, kind)
    for key, shape in shapes[folder].items():
        if key in buffers:
            buffer = buffers[key]
            yield key, buffer.to(STORED_DTYPE) if buffer.is_floating_point() else buffer.clone()
            continue
        module, kind = kinds.get(key, (net, key))
        yield key, draw_parameter(module, kind, shape, seed, model.copy_source(folder, tied.get(key, key), shapes))


def init_checkpoint(preset_name: str, seed: int, out: str | Path, on_progress: OnProgress = ignore) -> Checkpoint:
    """Write a random-weight checkpoint of a preset; the same preset and seed give the same bytes."""
    model = preset(preset_name)
    out = Path(out)
    require_new_folder(out)
    found = model.networks()
    components = model.components()
    shapes = {name: {k: tuple(v.shape) for k, v in net.state_dict().items()} for name, (net, _) in found.items()}
    for i, (folder, (net, config)) in enumerate(found.items()):
        on_progress(Progress("init", folder, i, len(found)))
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # one component's FP16 tensors at a time, under the names its library stores them with
        tensors = library_tensors(components[folder], net, dict(random_tensors(model, folder, net, seed, shapes)))
        save_file(tensors, str(out / folder / components[folder].weights), {"format": "pt"})
        del tensors
    model.write_extras(out)
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(model.scheduler_config), indent=2) + "\n")
    (out / "diffsr.json").write_text(json.dumps(checkpoint_meta(model, model.defaults), indent=2) + "\n")
    on_progress(Progress("init", "written", len(found), len(found)))
    return open_checkpoint(out)


def ensure_checkpoint(preset_name: str, seed: int, out: str | Path) -> Checkpoint:
    """The checkpoint in `out`, created there first (seeded random weights) if it is not yet there."""
    out = Path(out)
    if (out / "diffsr.json").is_file():
        return open_checkpoint(out)
    return init_checkpoint(preset_name, seed, out)
