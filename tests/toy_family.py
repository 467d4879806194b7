"""A toy family, written outside the library (nothing of it in `diffsr`): what a new family brings, and all it brings.

It differs from SD wherever shared code could have assumed SD: three latent channels, a latent factor of 4 (not 8),
one submodule per step (no ControlNet), its own submodule and tensor names, its own networks, and a request that is
more than one photo and one prompt:

    style   a second photo (global: every tile sees all of it, at 32 x 32), encoded once per request by its own
            stage (`style`), whose vector every step reads
    mood    a text of its own, encoded with the prompt by the text stage (a third row of its batch) and added to the
            prompt's states, `mood_strength` times (a number of its own, 0 to 4)

Importing this module registers the family (so a Triton server's python models, told its module, find it too).
`make(OUT)` makes a seeded checkpoint of it with a blip2-tiny captioner in OUT/checkpoint and exports it to OUT/onnx
(the test session does so in a process of its own, in the background, as it exports its other checkpoints).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffsr.export.model.components import our_component
from diffsr.export.model.dims import BATCH, CFG_BATCH, TEXT_BATCH, NamedDim, latent_sides
from diffsr.export.model.families.sd import SD_SCHEDULER_CONFIG
from diffsr.export.model.family import ModelFamily, guided, register
from diffsr.export.model.inputs import RequestInput
from diffsr.export.model.parts import Component, RunFn, Stage, Stages, Tensors
from diffsr.export.model.signatures import Signature, TensorSpec
from diffsr.export.model.tokenizer import CLIP_LENGTH, VOCAB_SIZE, Tokenizer, build_clip_tokenizer

CHANNELS, FACTOR, STYLE_SIDE = 3, 4, 32


@dataclass(frozen=True)
class ToyConfig:
    preset: str
    width: int
    text_width: int


class Words(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.text_width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids.long())  # (B, 77, T)


class Down(nn.Module):
    """Image -> its latent, 4 pixels a cell."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.conv = nn.Conv2d(3, CHANNELS, FACTOR, stride=FACTOR)

    def forward(self, picture: torch.Tensor) -> torch.Tensor:
        return self.conv(picture)


class Style(nn.Module):
    """The style photo -> one vector: a strided conv, pooled."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.conv = nn.Conv2d(3, cfg.width, 4, stride=4)

    def forward(self, style_photo: torch.Tensor) -> torch.Tensor:
        return self.conv(style_photo).mean((2, 3))  # (B, width)


class Denoiser(nn.Module):
    """(latent, time, words, the LQ latent, the style) -> the noise: a conv over the latent beside the LQ latent,
    shifted by the timestep's sin/cos, the mean word and the style."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.mix = nn.Conv2d(2 * CHANNELS, cfg.width, 3, padding=1)
        self.time = nn.Linear(2, cfg.width)
        self.words = nn.Linear(cfg.text_width, cfg.width)
        self.out = nn.Conv2d(cfg.width, CHANNELS, 3, padding=1)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, words: torch.Tensor, source: torch.Tensor,
                style: torch.Tensor) -> torch.Tensor:
        repeat = noisy.shape[0] // source.shape[0]  # the LQ latent and the style are shared by the guided halves
        source, style = source.repeat(repeat, 1, 1, 1), style.repeat(repeat, 1)
        angle = t[:, None] / 1000.0 * math.pi
        shift = self.time(torch.cat([angle.sin(), angle.cos()], 1)) + self.words(words.mean(1)) + style  # (B, width)
        return self.out(torch.relu(self.mix(torch.cat([noisy, source], 1)) + shift[:, :, None, None]))


class Up(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.conv = nn.ConvTranspose2d(CHANNELS, 3, FACTOR, stride=FACTOR)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(z).clamp(-1.0, 1.0)


NETWORKS = {"words": Words, "down": Down, "style": Style, "denoiser": Denoiser, "up": Up}  # one folder per submodule


@register
class Toy(ModelFamily):
    name = "toy"
    config_class = ToyConfig
    presets = {"toy-tiny": ToyConfig("toy-tiny", width=8, text_width=6)}
    stages = Stages(photo="picture", once=(Stage("words", "text"), Stage("style", "style"), Stage("down", "lq", tiled=True)),
                    step=("denoiser",), decode="up", start="source")
    latent_channels = CHANNELS
    latent_factor = FACTOR
    scheduler_config = SD_SCHEDULER_CONFIG

    latent_multiple = 2
    native_latent = 16

    def family_inputs(self) -> tuple[RequestInput, ...]:
        return (RequestInput("style", "photo", "a photo whose look the output takes", required=True, side=STYLE_SIDE,
                             tensor="style_photo"),
                RequestInput("mood", "text", "a word or two of mood, added to the prompt's states", default="calm"),
                RequestInput("mood_strength", "float", "how much of the mood", low=0.0, high=4.0, default=1.0,
                             dtype="float32"))

    def family_dims(self) -> tuple[NamedDim, ...]:
        return (BATCH, CFG_BATCH, TEXT_BATCH, *latent_sides(self.latent_multiple, self.native_latent))

    def declare(self) -> tuple[Signature, ...]:
        c, f, lat = self.config, FACTOR, ("latent_height", "latent_width")
        img = ("batch", 3, f"{f}*latent_height", f"{f}*latent_width")
        words = ("text_batch", CLIP_LENGTH, c.text_width)
        return (
            Signature("words", (TensorSpec("input_ids", "int32", ("text_batch", CLIP_LENGTH)),),
                      (TensorSpec("words", "float32", words),)),
            Signature("style", (TensorSpec("style_photo", "float32", ("batch", 3, STYLE_SIDE, STYLE_SIDE)),),
                      (TensorSpec("style", "float32", ("batch", c.width)),)),
            Signature("down", (TensorSpec("picture", "float32", img),),
                      (TensorSpec("source", "float32", ("batch", CHANNELS, *lat)),)),
            Signature("denoiser", (TensorSpec("noisy", "float32", ("cfg_batch", CHANNELS, *lat)),
                                   TensorSpec("t", "float32", ("cfg_batch",)),
                                   TensorSpec("words", "float32", ("cfg_batch", *words[1:])),
                                   TensorSpec("source", "float32", ("batch", CHANNELS, *lat)),
                                   TensorSpec("style", "float32", ("batch", c.width))),
                      (TensorSpec("noise", "float32", ("cfg_batch", CHANNELS, *lat)),)),
            Signature("up", (TensorSpec("z", "float32", ("batch", CHANNELS, *lat)),), (TensorSpec("image", "float32", img),)),
        )

    def family_components(self) -> dict[str, Component]:
        return {folder: our_component(cls, ToyConfig) for folder, cls in NETWORKS.items()}

    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Any]:
        self.signature(submodule)
        return (submodule,), lambda m: m

    def tokenizer_folders(self) -> dict[str, str]:
        return {"input_ids": "tokenizer"}

    def tokenizer(self, path: Path) -> Tokenizer:
        return Tokenizer({"input_ids": path / "tokenizer"})

    def token_ids(self, tokenize: Callable[[list[str]], dict[str, Any]], texts: Mapping[str, str],
                  guided: bool) -> dict[str, np.ndarray]:
        """The prompts' batch (negative, positive), then the mood as its last row."""
        return tokenize([*([texts["negative_prompt"]] if guided else []), texts["prompt"], texts["mood"]])

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return {folder: (cls(self.config), asdict(self.config)) for folder, cls in NETWORKS.items()}

    def write_extras(self, out: Path) -> None:
        build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))

    def family_draws(self) -> Mapping[str, Any]:
        return {"input_ids": lambda shape, g: torch.randint(0, VOCAB_SIZE, shape, generator=g, dtype=torch.int32),
                "t": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float()}

    def conditioning(self, once: Tensors, size: tuple[int, int],
                     inputs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The prompts' states with the mood's mean state, `mood_strength` times, added to each; the style vector."""
        words, strength = once["words"], float((inputs or {}).get("mood_strength", 1.0))
        return {"words": words[:-1] + strength * words[-1:].mean(1, keepdim=True), "style": once["style"]}

    def predict(self, run: RunFn, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        return guided(x, cond["words"].shape[0], row, lambda batch, t: run(
            "denoiser", noisy=batch, t=t, words=cond["words"], source=tiled["source"], style=cond["style"])["noise"])


def make(out: Path) -> None:
    """A seeded toy-tiny checkpoint with a blip2-tiny captioner in out/checkpoint, its FP32 graphs in out/onnx."""
    from diffsr.export.graphs.exporter import export_onnx
    from diffsr.export.model.attachments.captioner import init_captioner
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.export.model.random_init import init_checkpoint

    init_checkpoint("toy-tiny", seed=0, out=out / "checkpoint")
    init_captioner("blip2-tiny", 0, out / "checkpoint")
    export_onnx(open_checkpoint(out / "checkpoint"), out / "onnx", ort_fusions=False)

