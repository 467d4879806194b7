"""The pieces a model family (`family.py`) and an attachment (`attachment.py`) are declared with: a checkpoint
component, what runs when (`Stages`), and the callables and tensors a step passes around."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

RunFn = Callable[..., Mapping[str, torch.Tensor]]  # run(submodule, **inputs) -> outputs
Tensors = Mapping[str, torch.Tensor]
Draw = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Stage:
    """A once-per-request stage: one submodule run before the loop on the request's named tensors (its prepared
    photos, token ids, earlier stages' outputs). A `tiled` stage runs over the photo's tiles (each input with latent
    or pixel sides cropped to the tile) and its outputs stay tiled: every step reads its tile's crop. Any other runs
    once on whole tensors and every step reads its outputs whole (through `ModelFamily.conditioning`). `part` names
    the pipeline part it is timed and benchmarked as ("text", "lq", ...). A `prompting` stage is one the prompt is
    read from (SISRM's segmenter and label generator: `ModelFamily.words`): it runs with the request's preparation,
    before the texts are tokenised, untiled, on the prepared photos and earlier prompting stages' outputs; what later
    stages take of its outputs the preparation hands on."""

    submodule: str
    part: str
    tiled: bool = False
    prompting: bool = False


@dataclass(frozen=True)
class Stages:
    """What runs when (`runtime/pipeline.py`): `once` in order before the loop, `step` at every denoising step,
    `decode` after it. `photo` is the tensor the request's photo becomes (bicubic x `upscale`, [-1, 1], padded to the
    model's multiple); `start` the tiled stages' output that is the photo's latent (a sampler may start from it)."""

    photo: str
    once: tuple[Stage, ...]
    step: tuple[str, ...]  # called at every denoising step (kept loaded together; batched across requests)
    decode: str  # latent -> image, once, over tiles
    start: str

    def part(self, name: str) -> tuple[str, ...]:
        """The once-per-request submodules timed as part `name`."""
        return tuple(s.submodule for s in self.once if s.part == name)


@dataclass(frozen=True)
class Component:
    """A checkpoint folder: its network, built from the folder's config.json, and its weights file (or
    that name's shards and index); `tied`: key pairs naming one tensor, either of which may be stored;
    `library_keys`: its library stores some keys under other names than its network's (transformers' conversion
    mapping: SegFormer's `encoder.block.0.0.attention.self.key` is its network's `stages.0.blocks.0.attention.k_proj`),
    read and written as the library does (`components.library_names`)."""

    build: Callable[[Path], nn.Module]
    weights: str
    tied: tuple[tuple[str, str], ...] = ()
    library_keys: bool = False
