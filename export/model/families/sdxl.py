"""The `sdxl` family: the `sd` model on SDXL base, the paper's own backbone (presets sdxl, sdxl-tiny).

What differs from `sd`: two text encoders (CLIP-L and OpenCLIP bigG with projection) whose penultimate
states are concatenated to (B, 77, 768 + 1280), bigG's pooled, projected output `text_embeds` (B, 1280),
and the size micro-conditioning `time_ids` (B, 6) that ControlNet and UNet take with it ("text_time"):
original size (h, w), crop corner (y, x), target size (h, w). For super-resolution the pipeline fills
them from the output size, crop (0, 0); a tile keeps the image's size as the original and takes its own
corner and size, as SDXL was trained on crops. They stay graph inputs, never constants of a graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.components import transformers_component
from diffsr.export.model.families.sd import F32, SD, SDConfig, _ids, clip_config
from diffsr.export.model.family import register
from diffsr.export.model.parts import Component, Draw, Tensors
from diffsr.export.model.signatures import TensorSpec
from diffsr.export.model.tokenizer import OPENCLIP_PAD, build_clip_tokenizer

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


@dataclass(frozen=True)
class SDXLConfig(SDConfig):
    # the second text encoder (OpenCLIP bigG with projection) and the size micro-conditioning's embedding width
    text2_hidden: int = 0
    text2_layers: int = 0
    text2_heads: int = 0
    text2_intermediate: int = 0
    addition_time_embed_dim: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        second = (self.text2_hidden, self.text2_layers, self.text2_heads, self.text2_intermediate, self.addition_time_embed_dim)
        if min(second) < 1:
            raise DiffsrError(f"an SDXL config needs its second text encoder and time embedding (got {second})")


PRESETS: dict[str, SDXLConfig] = {
    # SDXL base, the paper's backbone: UNet 2.57 B parameters (transformer depth 1, 2, 10, mid 10),
    # ControlNet 1.25 B, CLIP-L + OpenCLIP bigG (context 2048, pooled 1280), VAE scaling 0.13025
    "sdxl": SDXLConfig(
        preset="sdxl",
        vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32,
        f1_channels=512, lq_fusion_heads=8,
        text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
        text2_hidden=1280, text2_layers=32, text2_heads=20, text2_intermediate=5120,
        unet_channels=(320, 640, 1280), unet_cross_attention=(False, True, True), unet_transformer_depth=(1, 2, 10),
        unet_layers_per_block=2, unet_heads=(5, 10, 20), unet_norm_groups=32, addition_time_embed_dim=256,
        f2_channels=320, fusion_heads=5, scaling_factor=0.13025, vae_force_upcast=True, native_latent=128,
    ),
    # SDXL's structure at tiny widths (and SD's 512 px native side, so its tests stay fast)
    "sdxl-tiny": SDXLConfig(
        preset="sdxl-tiny",
        vae_channels=(32, 32, 64, 64), vae_layers_per_block=1, vae_norm_groups=8,
        f1_channels=64, lq_fusion_heads=2,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
        text2_hidden=48, text2_layers=2, text2_heads=2, text2_intermediate=96,
        unet_channels=(32, 64, 64), unet_cross_attention=(False, True, True), unet_transformer_depth=(1, 2, 2),
        unet_layers_per_block=1, unet_heads=(1, 2, 2), unet_norm_groups=8, addition_time_embed_dim=8,
        f2_channels=32, fusion_heads=2, scaling_factor=0.13025, vae_force_upcast=True,
    ),
}


@register
class SDXL(SD):
    name = "sdxl"
    config_class = SDXLConfig
    presets = PRESETS

    @property
    def context_dim(self) -> int:
        """CLIP-L's and bigG's states side by side (768 + 1280)."""
        return int(self.config.text_hidden + self.config.text2_hidden)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled, projected text embedding (`text_embeds`)."""
        return int(self.config.text2_hidden)

    def text_inputs(self) -> list[TensorSpec]:
        return [*super().text_inputs(), TensorSpec("input_ids_2", "int32", ("text_batch", self.text_length))]

    def text_outputs(self) -> list[TensorSpec]:
        return [*super().text_outputs(), TensorSpec("text_embeds", F32, ("text_batch", self.pooled_dim))]

    def added_conditioning(self) -> list[TensorSpec]:
        return [TensorSpec("text_embeds", F32, ("cfg_batch", self.pooled_dim)), TensorSpec("time_ids", F32, ("cfg_batch", TIME_IDS))]

    def family_components(self) -> dict[str, Component]:
        return super().family_components() | {"text_encoder_2": transformers_component("CLIPTextModelWithProjection",
                                                                                     "CLIPTextConfig")}

    def text_folders(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2")

    def combine_unet(self) -> Callable[..., nn.Module]:
        from diffsr.export.model.families.sd_networks import ControlNetUNetXL

        return ControlNetUNetXL

    def tokenizer_folders(self) -> dict[str, str]:
        return {"input_ids": "tokenizer", "input_ids_2": "tokenizer_2"}  # the second pads with "!", id 0, as OpenCLIP does

    def unet_config(self) -> dict[str, Any]:
        """SD's, with the "text_time" additional embedding (pooled text + six time ids, each
        `addition_time_embed_dim` wide) and linear projections."""
        dim = self.config.addition_time_embed_dim
        return super().unet_config() | dict(
            sample_size=128, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=dim,
            projection_class_embeddings_input_dim=self.pooled_dim + TIME_IDS * dim)

    def text2_config(self) -> dict[str, Any]:
        """OpenCLIP bigG: GELU, a projection of the pooled output as wide as its states."""
        c = self.config
        return clip_config(c.text2_hidden, c.text2_layers, c.text2_heads, c.text2_intermediate, "gelu", 0, projection=True)

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        from accelerate import init_empty_weights
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        found = super().networks()
        with init_empty_weights(include_buffers=False):
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**self.text2_config()))
        return found | {"text_encoder_2": (text_2, text_2.config.to_dict())}

    def write_extras(self, out: Path) -> None:
        super().write_extras(out)
        build_clip_tokenizer(pad_token=OPENCLIP_PAD).save_pretrained(str(out / "tokenizer_2"))

    def family_draws(self) -> Mapping[str, Draw]:
        return {**super().family_draws(), "input_ids_2": _ids,
                "time_ids": lambda shape, g: torch.randint(0, 1024, shape, generator=g).float()}  # sizes, corners in px

    def conditioning(self, once: Tensors, size: tuple[int, int],
                     inputs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The text outputs and `time_ids` per text row: the output's size as the original and the target
        size, crop corner (0, 0) (for SR the image is neither resized nor cropped)."""
        h, w = size
        states = once["text_embeddings"]
        ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=states.device).repeat(states.shape[0], 1)
        return {**once, "time_ids": ids}

    def tile_conditioning(self, cond: Tensors, corners: torch.Tensor) -> dict[str, torch.Tensor]:
        """`time_ids` keep the image's size as the original and take each tile's own crop corner and size."""
        out = super().tile_conditioning({k: v for k, v in cond.items() if k != "time_ids"}, corners)
        ids = cond["time_ids"]  # (rows, 6): (h, w, 0, 0, h, w) per text row
        out["time_ids"] = torch.cat([ids[:, :2].repeat_interleave(corners.shape[0], dim=0), corners.repeat(ids.shape[0], 1)], dim=1)
        return out
