"""`diffsr init`: a checkpoint folder of a preset with seeded random weights, written in bounded memory.

Every network is built with its parameters on the meta device; each parameter is then drawn on its
own, from a generator seeded by (seed, component, key), and stored in FP16 as SDXL checkpoints are
published. Memory holds one component's FP16 tensors at a time (the SDXL UNet's 5.1 GB), never a
network in FP32; the same preset and seed give the same bytes whatever the order of work.

The draws follow PyTorch's own initialisation: weights and biases of linear and convolution layers
uniform in +-1/sqrt(fan_in), norms one and zero, embeddings N(0, 0.02). Layers a trained model has
moved away from zero (ControlNet's zero convolutions) are drawn like any other, so the control path
is alive and parity tests prove something. Copies are copies: ControlNet's encoder starts as the
UNet's, the LQ encoder as the VAE's encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from diffsr.export.core.files import require_new_folder
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.export.model.checkpoint import Checkpoint, checkpoint_meta, open_checkpoint
from diffsr.export.model.family import ModelFamily, preset

STORED_DTYPE = torch.float16


NORMS = ("RMSNorm", "T5LayerNorm")  # norms of other libraries (diffusers, transformers): weight one, as initialised


def _draw(module: nn.Module, kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__ in NORMS:
        return torch.ones(shape) if kind == "weight" else torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=generator) * 0.02
    weight = getattr(module, "weight", None)
    fan_in = math.prod(weight.shape[1:]) if weight is not None and weight.dim() >= 2 else (
        math.prod(shape[1:]) if len(shape) >= 2 else shape[-1])
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def draw_parameter(module: nn.Module, kind: str, shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """One parameter (`kind` of `module`), FP16, from a generator seeded by (seed, name): copies share a name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return _draw(module, kind, shape, generator).to(STORED_DTYPE)


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
        tensors = dict(random_tensors(model, folder, net, seed, shapes))  # one component's FP16 tensors at a time
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
