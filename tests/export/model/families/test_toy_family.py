"""A family is one module: a toy family, written and registered here (nothing of it in the library), goes
through a new checkpoint, the export, parity, the in-process pipeline on two backends and the Triton
repository's configs.

The toy differs from SD where shared code could have assumed SD: three latent channels, a latent factor of
4 (not 8), one submodule per step (no ControlNet), its own submodule and tensor names, its own networks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from diffsr.app.measure.parity import check_parity
from diffsr.calib.data import photo
from diffsr.export.graphs.exporter import export_onnx
from diffsr.export.model.components import our_component
from diffsr.export.model.dims import BATCH, CFG_BATCH, TEXT_BATCH, NamedDim, latent_sides
from diffsr.export.model.families.sd import SD_SCHEDULER_CONFIG
from diffsr.export.model.family import FAMILIES, Component, ModelFamily, RunFn, Stages, Tensors, guided, register
from diffsr.export.model.random_init import init_checkpoint
from diffsr.export.model.signatures import Signature, TensorSpec
from diffsr.export.model.tokenizer import CLIP_LENGTH, VOCAB_SIZE, Tokenizer, build_clip_tokenizer
from diffsr.runtime.loading import load_pipeline
from diffsr.triton_models.repository import ServingOptions, model_configs

CHANNELS, FACTOR = 3, 4


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


class Denoiser(nn.Module):
    """(latent, time, words, the LQ latent) -> the noise: a conv over the latent beside the LQ latent, shifted
    by the timestep's sin/cos and the mean word."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.mix = nn.Conv2d(2 * CHANNELS, cfg.width, 3, padding=1)
        self.time = nn.Linear(2, cfg.width)
        self.words = nn.Linear(cfg.text_width, cfg.width)
        self.out = nn.Conv2d(cfg.width, CHANNELS, 3, padding=1)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, words: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        source = source.repeat(noisy.shape[0] // source.shape[0], 1, 1, 1)  # shared by the guided halves
        angle = t[:, None] / 1000.0 * math.pi
        shift = self.time(torch.cat([angle.sin(), angle.cos()], 1)) + self.words(words.mean(1))  # (B, width)
        return self.out(torch.relu(self.mix(torch.cat([noisy, source], 1)) + shift[:, :, None, None]))


class Up(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.config = cfg
        self.conv = nn.ConvTranspose2d(CHANNELS, 3, FACTOR, stride=FACTOR)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv(z).clamp(-1.0, 1.0)


NETWORKS = {"words": Words, "down": Down, "denoiser": Denoiser, "up": Up}  # one folder per submodule


class Toy(ModelFamily):
    name = "toy"
    config_class = ToyConfig
    presets = {"toy-tiny": ToyConfig("toy-tiny", width=8, text_width=6)}
    stages = Stages(text=("words",), lq="down", step=("denoiser",), decode="up", start="source")
    latent_channels = CHANNELS
    latent_factor = FACTOR
    scheduler_config = SD_SCHEDULER_CONFIG

    latent_multiple = 2
    native_latent = 16

    def family_dims(self) -> tuple[NamedDim, ...]:
        return (BATCH, CFG_BATCH, TEXT_BATCH, *latent_sides(self.latent_multiple, self.native_latent))

    def declare(self) -> tuple[Signature, ...]:
        f, lat = FACTOR, ("latent_height", "latent_width")
        img = ("batch", 3, f"{f}*latent_height", f"{f}*latent_width")
        words = ("text_batch", CLIP_LENGTH, self.config.text_width)
        return (
            Signature("words", (TensorSpec("input_ids", "int32", ("text_batch", CLIP_LENGTH)),),
                      (TensorSpec("words", "float32", words),)),
            Signature("down", (TensorSpec("picture", "float32", img),),
                      (TensorSpec("source", "float32", ("batch", CHANNELS, *lat)),)),
            Signature("denoiser", (TensorSpec("noisy", "float32", ("cfg_batch", CHANNELS, *lat)),
                                   TensorSpec("t", "float32", ("cfg_batch",)),
                                   TensorSpec("words", "float32", ("cfg_batch", *words[1:])),
                                   TensorSpec("source", "float32", ("batch", CHANNELS, *lat))),
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

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return {folder: (cls(self.config), asdict(self.config)) for folder, cls in NETWORKS.items()}

    def write_extras(self, out: Path) -> None:
        build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))

    def family_draws(self) -> Mapping[str, Any]:
        return {"input_ids": lambda shape, g: torch.randint(0, VOCAB_SIZE, shape, generator=g, dtype=torch.int32),
                "t": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float()}

    def predict(self, run: RunFn, x: torch.Tensor, lq: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        return guided(x, cond["words"].shape[0], row, lambda batch, t: run(
            "denoiser", noisy=batch, t=t, words=cond["words"], source=lq["source"])["noise"])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    register(Toy)
    try:
        folder = tmp_path_factory.mktemp("toy")
        ckpt = init_checkpoint("toy-tiny", seed=0, out=folder / "checkpoint")
        export_onnx(ckpt, folder / "onnx", ort_fusions=False)
        yield ckpt, folder / "onnx"
    finally:
        FAMILIES.pop(Toy.name)


def test_the_checkpoint_names_the_family_and_reopens(toy):
    ckpt, _ = toy
    assert ckpt.model == Toy(Toy.presets["toy-tiny"])
    assert (ckpt.path / "diffsr.json").read_text().count('"family": "toy"') == 1
    assert {p.name for p in ckpt.path.iterdir()} == {*NETWORKS, "tokenizer", "scheduler", "diffsr.json"}


def test_export_and_parity_hold_the_toy_to_its_reference(toy):
    ckpt, onnx_dir = toy
    report = check_parity(ckpt, onnx_dir, size=(24, 20), steps=3, shapes=("min", "odd"))
    assert {o.submodule for o in report.outputs} == {"words", "down", "denoiser", "up"}
    assert report.passed, report.to_json()
    odd = next(o for o in report.outputs if o.submodule == "up" and o.shape == "odd")
    # odd multiples of the toy's 2 cells (3 x 5), raised alike to the engines' least side of 8 cells
    assert odd.dims["latent_height"] == 10 and odd.dims["latent_width"] == 14


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_the_pipeline_runs_the_toy_on_two_backends_at_any_size(toy, scheduler):
    """A 23x17 photo (pixel multiple 8: padded inside) comes back at exactly 92x68, tiled and not."""
    ckpt, onnx_dir = toy
    image = photo("coffee", (23, 17))
    config = ckpt.defaults.replace(steps=4, scheduler=scheduler)
    torch_image = load_pipeline("torch", ckpt)(image, config).image
    ort_image = load_pipeline("onnxruntime", ckpt, onnx_dir=onnx_dir)(image, config).image
    assert torch_image.shape == ort_image.shape == (68, 92, 3)
    assert np.abs(torch_image.astype(int) - ort_image.astype(int)).max() <= 1
    tiled = load_pipeline("torch", ckpt)(image, config.replace(tile=8, tile_overlap=2)).image
    assert tiled.shape == (68, 92, 3)


def test_the_triton_repository_serves_the_toys_submodules(toy):
    ckpt, _ = toy
    configs = model_configs(ckpt, "onnxruntime", ServingOptions(entry="ensemble", step_batch=4))
    assert set(configs) == {"words", "down", "denoiser", "up", "preprocess", "sampler", "postprocess", "diffsr"}
    assert configs["denoiser"].max_batch_size == 4 and configs["up"].max_batch_size == 0  # the step stage batches
    assert [s.model_name for s in configs["diffsr"].ensemble_scheduling.step] == ["preprocess", "words", "sampler",
                                                                                   "postprocess"]
    assert [i.name for i in configs["preprocess"].output] == ["picture", "input_ids", "output_size", "used_prompt"]
