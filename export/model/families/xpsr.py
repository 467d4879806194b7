"""The `xpsr` family: XPSR (Qu et al., ECCV 2024, "XPSR: Cross-modal Priors for Diffusion-based Image
Super-Resolution"; github qyp2000/XPSR), an SD-1.5 ControlNet SR model conditioned on two prompts a multimodal LLM
writes of the photo: a high-level one (what it shows) and a low-level one (its quality). Presets xpsr (the release's
widths) and xpsr-tiny.

    text_encoder     input_ids (T, 77): the high-level prompts' rows, then the low-level ones' -> states (T, 77, D)
    lr_encoder       lq_image (B, 3, 8h, 8w) in [-1, 1] -> cond_embedding (B, C0, h, w): the ControlNet's
                     conditioning embedding of the photo in [0, 1]; z_lq (B, 4, h, w): the VAE posterior's mean,
                     scaled (once per request, over tiles)
    controlnet_unet  sample (2B, 4, h, w), timestep (2B,), text_embeddings, lowlevel_embeddings (2B, 77, D),
                     cond_embedding (B, ..) -> noise_pred (2B, 4, h, w)                              every step
    vae_decoder      latent (B, 4, h, w) -> image (B, 3, 8h, 8w)

The conditioning embedding is hoisted out of the step: it does not depend on t (the official ControlNet recomputes it
every step). A step: the latent doubled for guidance (negative rows, then positive: both prompts' negatives with the
negative rows), ControlNet with semantic-fusion attention, the UNet with pixel attention to the ControlNet's
residuals, guided noise = negative + scale * (positive - negative). The official test run: DDPM on SD-1.5's schedule,
20 steps, guidance 4.5, the start latent the photo's latent noised to the first step and then to 800, AdaIN.
Where this differs from the release's code (the posterior's mean for its sample, a comma before the prompt's
suffix, tiles of the native side): docs/xpsr.md. The networks are in `xpsr_networks.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.components import (
    DIFFUSERS_WEIGHTS,
    diffusers_component,
    diffusers_config,
    read_config,
    transformers_component,
)
from diffsr.export.model.dims import BATCH, CFG_BATCH, TEXT_BATCH, NamedDim, latent_sides
from diffsr.export.model.families.sd import INT8_KEPT, _ids, clip_config, controlnet_copy_source, vae_force_upcast, vae_of
from diffsr.export.model.family import ModelFamily, guided, register
from diffsr.export.model.inputs import PromptSlot, RequestInput
from diffsr.export.model.parts import Component, Draw, RunFn, Stage, Stages, Tensors
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.signatures import Signature, TensorSpec
from diffsr.export.model.tokenizer import CLIP_LENGTH, Tokenizer, build_clip_tokenizer

F32 = "float32"
LATENT_CHANNELS = 4
# SD-1.5's schedule, as XPSR samples it (diffusers' DDPMScheduler read from SD-1.5's scheduler folder)
XPSR_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "variance_type": "fixed_small", "steps_offset": 1,
    "timestep_spacing": "leading", "clip_sample": False,
}
# configs/xpsr_test.yaml: the high-level prompt's suffix (after the caption) and negative prompt; the pipeline's
# low-level negative prompt
ADDED_PROMPT = "clean, high-resolution, 8k, high quality, clear text."
NEGATIVE = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed."
LOWLEVEL_NEGATIVE = "high resolution, best quality, clear"
# the release's questions: LLaVA-1.5's for the high-level prompt (its whole input, as the release writes it), and
# Q-Instruct's for the low-level one
HIGH_LEVEL = "<image>\nUSER: Please provide a descriptive summary of the content of this image. \nASSISTANT:"
LOW_LEVEL = "Describe and evaluate the quality of the image."
# the official test run (test.py, configs/xpsr_test.yaml): 20 DDPM steps, guidance 4.5, the photo's latent noised to
# the first step and then to 800, AdaIN; latent tiles with Gaussian weights
# the prompter writes up to 77 tokens a slot: what CLIP's text encoder reads of a prompt (the release lets LLaVA run
# to 200 positions, and then cuts the prompt at CLIP's 77 tokens)
DEFAULTS = PipelineConfig(caption_suffix=ADDED_PROMPT, negative_prompt=NEGATIVE, steps=20, guidance_scale=4.5,
                          scheduler="ddpm", start="lq", added_noise_level=800, color_fix="adain", tile_blend="gaussian",
                          caption_tokens=77)


@dataclass(frozen=True)
class XPSRConfig:
    """Every width; the diffusers/transformers configs of a checkpoint derive from it."""

    preset: str
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    unet_channels: tuple[int, ...]
    unet_cross_attention: tuple[bool, ...]
    unet_layers_per_block: int
    unet_heads: int  # attention heads everywhere (SD-1.5's config writes it as `attention_head_dim`: 8)
    unet_norm_groups: int
    cond_channels: tuple[int, ...]  # the conditioning embedding's widths: one stage more than its 2x downsamplings
    scaling_factor: float = 0.18215
    native_latent: int = 64

    def __post_init__(self) -> None:
        if self.unet_channels[-1] != self.unet_channels[-2]:
            raise DiffsrError(f"unet_channels {self.unet_channels}: XPSR's UNet keeps its last two widths equal")
        if 2 ** (len(self.cond_channels) - 1) != 2 ** (len(self.vae_channels) - 1):
            raise DiffsrError(f"cond_channels {self.cond_channels}: the embedding must reach the latent from the photo "
                              f"({len(self.vae_channels) - 1} halvings)")


PRESETS: dict[str, XPSRConfig] = {
    # the release: SD-1.5's UNet, ControlNet, CLIP ViT-L/14 and VAE
    "xpsr": XPSRConfig(
        preset="xpsr", vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32,
        text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
        unet_channels=(320, 640, 1280, 1280), unet_cross_attention=(True, True, True, False), unet_layers_per_block=2,
        unet_heads=8, unet_norm_groups=32, cond_channels=(16, 32, 96, 256)),
    # tests: the same structure at tiny widths (last two UNet widths equal, a four-stage embedding for 8x)
    "xpsr-tiny": XPSRConfig(
        preset="xpsr-tiny", vae_channels=(32, 32, 64, 64), vae_layers_per_block=1, vae_norm_groups=8,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
        unet_channels=(32, 32), unet_cross_attention=(True, False), unet_layers_per_block=1,
        unet_heads=2, unet_norm_groups=8, cond_channels=(8, 8, 16, 16), native_latent=32),
}


def _network(kind: str, class_name: str) -> Component:
    """An official XPSR network from its folder's config.json (its class's own arguments)."""

    def build(folder: Path) -> nn.Module:
        from diffsr.export.model.families import xpsr_networks

        config = read_config(folder)
        if config.get("_class_name", class_name) != class_name:
            raise DiffsrError(f"{folder / 'config.json'} describes a {config['_class_name']}, expected XPSR's {class_name}")
        module: nn.Module = getattr(xpsr_networks, kind)(config)
        return module

    return Component(build, DIFFUSERS_WEIGHTS)


@register
class XPSR(ModelFamily):
    name = "xpsr"
    config_class = XPSRConfig
    presets = PRESETS
    stages = Stages(photo="lq_image", once=(Stage("text_encoder", "text"), Stage("lr_encoder", "lq", tiled=True)),
                    step=("controlnet_unet",), decode="vae_decoder", start="z_lq")
    scheduler_config = XPSR_SCHEDULER_CONFIG
    defaults = DEFAULTS
    int8_default = ("controlnet_unet",)
    int8_kept = INT8_KEPT
    latent_channels = LATENT_CHANNELS

    @property
    def latent_multiple(self) -> int:
        return 2 ** (len(self.config.unet_channels) - 1)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.config.vae_channels) - 1)

    def family_inputs(self) -> tuple[RequestInput, ...]:
        return (RequestInput("prompt_low", "text", "the low-level prompt: the photo's quality and degradations (default: "
                             "the prompter's answer where the checkpoint has one, else empty)", default=""),
                RequestInput("negative_prompt_low", "text", "the low-level prompt's negative", default=LOWLEVEL_NEGATIVE))

    def prompt_slots(self) -> tuple[PromptSlot, ...]:
        """The release's two questions to its multimodal LLMs, the high-level one in its own LLaVA prompt
        (`utils_data/highlevel_prompt_test.py`), the low-level one Q-Instruct's (`lowlevel_prompt_test.py`), asked of
        the prompter in its chat template; the low-level answer kept as written (its degradations are the point)."""
        return (PromptSlot("prompt", HIGH_LEVEL), PromptSlot("prompt_low", LOW_LEVEL, cleaned=False))

    def family_dims(self) -> tuple[NamedDim, ...]:
        return (BATCH, CFG_BATCH, TEXT_BATCH, *latent_sides(self.latent_multiple, self.native_latent))

    def declare(self) -> tuple[Signature, ...]:
        c, f = self.config, self.latent_factor
        img, lat = (f"{f}*latent_height", f"{f}*latent_width"), ("latent_height", "latent_width")
        latent = ("batch", LATENT_CHANNELS, *lat)
        guided_latent = ("cfg_batch", LATENT_CHANNELS, *lat)
        states = ("cfg_batch", CLIP_LENGTH, c.text_hidden)
        cond = TensorSpec("cond_embedding", F32, ("batch", c.unet_channels[0], *lat))
        return (
            Signature("text_encoder", (TensorSpec("input_ids", "int32", ("text_batch", CLIP_LENGTH)),),
                      (TensorSpec("text_embeddings", F32, ("text_batch", CLIP_LENGTH, c.text_hidden)),)),
            Signature("lr_encoder", (TensorSpec("lq_image", F32, ("batch", 3, *img)),),
                      (cond, TensorSpec("z_lq", F32, latent))),
            Signature("controlnet_unet",
                      (TensorSpec("sample", F32, guided_latent), TensorSpec("timestep", F32, ("cfg_batch",)),
                       TensorSpec("text_embeddings", F32, states), TensorSpec("lowlevel_embeddings", F32, states), cond),
                      (TensorSpec("noise_pred", F32, guided_latent),)),
            Signature("vae_decoder", (TensorSpec("latent", F32, latent),), (TensorSpec("image", F32, ("batch", 3, *img)),)),
        )

    # --- checkpoint ------------------------------------------------------------------------

    def family_components(self) -> dict[str, Component]:
        return {"text_encoder": transformers_component("CLIPTextModel", "CLIPTextConfig"),
                "vae": diffusers_component("AutoencoderKL"),
                "controlnet": _network("XPSRControlNet", "ControlNetModel"),
                "unet": _network("XPSRUNet", "UNet2DConditionModel")}

    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        from diffsr.export.model.families.sd_networks import TextEncoder, VAEDecoder
        from diffsr.export.model.families.xpsr_networks import LREncoder, XPSRStep

        self.signature(submodule)
        table: dict[str, tuple[tuple[str, ...], Callable[..., nn.Module]]] = {
            "text_encoder": (("text_encoder",), TextEncoder),
            "lr_encoder": (("controlnet", "vae"), LREncoder),
            "controlnet_unet": (("controlnet", "unet"), XPSRStep),
            "vae_decoder": (("vae",), VAEDecoder),
        }
        return table[submodule]

    def family_partial(self, submodule: str) -> bool:
        return submodule != "text_encoder"  # parts of the VAE and the ControlNet; the training heads left out

    def tokenizer_folders(self) -> dict[str, str]:
        return {"input_ids": "tokenizer"}

    def tokenizer(self, path: Path) -> Tokenizer:
        return Tokenizer({"input_ids": path / "tokenizer"})

    def token_ids(self, tokenize: Callable[[list[str]], dict[str, Any]], texts: Mapping[str, str],
                  guided: bool) -> dict[str, np.ndarray[Any, Any]]:
        """The high-level prompt's rows, then the low-level one's (with guidance each negative first): one batch
        through the one text encoder, split again by `conditioning`."""
        high = [texts["negative_prompt"], texts["prompt"]] if guided else [texts["prompt"]]
        low = [texts["negative_prompt_low"], texts["prompt_low"]] if guided else [texts["prompt_low"]]
        return tokenize([*high, *low])

    def unet_config(self) -> dict[str, Any]:
        """The official UNet's arguments: SD-1.5's config (the release's unet/config.json), at the preset's widths."""
        from diffsr.export.model.families.xpsr_networks import UNET_ARGS

        c = self.config
        down = ["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in c.unet_cross_attention]
        up = ["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(c.unet_cross_attention)]
        return UNET_ARGS | dict(
            sample_size=c.native_latent, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            down_block_types=down, up_block_types=up, block_out_channels=list(c.unet_channels),
            layers_per_block=c.unet_layers_per_block, attention_head_dim=c.unet_heads, cross_attention_dim=c.text_hidden,
            norm_num_groups=c.unet_norm_groups, up_use_lowlevel_prompt=[False] * len(c.unet_channels))

    def controlnet_config(self) -> dict[str, Any]:
        """The official ControlNet's arguments, as `ControlNetModel.from_unet` made them for the release."""
        from diffsr.export.model.families.xpsr_networks import CONTROLNET_ARGS

        c, unet = self.config, self.unet_config()
        shared = ("in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
                  "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
                  "norm_num_groups", "norm_eps", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
                  "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
                  "resnet_time_scale_shift")
        return CONTROLNET_ARGS | {k: unet[k] for k in shared} | {"conditioning_embedding_out_channels": list(c.cond_channels)}

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        from accelerate import init_empty_weights
        from transformers import CLIPTextConfig, CLIPTextModel

        from diffsr.export.model.families.xpsr_networks import XPSRControlNet, XPSRUNet

        c = self.config
        with init_empty_weights(include_buffers=False):
            vae = vae_of(c.vae_channels, c.vae_layers_per_block, c.vae_norm_groups, LATENT_CHANNELS,
                         scaling_factor=c.scaling_factor)
            text = CLIPTextModel(CLIPTextConfig(**clip_config(c.text_hidden, c.text_layers, c.text_heads,
                                                              c.text_intermediate, "quick_gelu", 49407)))
            unet, controlnet = XPSRUNet(self.unet_config()), XPSRControlNet(self.controlnet_config())
        return {"text_encoder": (text, text.config.to_dict()), "vae": (vae, diffusers_config(vae)),
                "controlnet": (controlnet, {"_class_name": "ControlNetModel", **controlnet.config}),
                "unet": (unet, {"_class_name": "UNet2DConditionModel", **unet.config})}

    def copy_source(self, folder: str, key: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
        return controlnet_copy_source(folder, key, shapes)

    def write_extras(self, out: Path) -> None:
        build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))

    def family_draws(self) -> Mapping[str, Draw]:
        return {"input_ids": _ids, "timestep": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float(),
                "lq_image": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1}

    def force_upcast(self, path: Path) -> tuple[str, ...]:
        return ("lr_encoder", "vae_decoder") if vae_force_upcast(path) else ()

    # --- a step ----------------------------------------------------------------------------

    def conditioning(self, once: Tensors, size: tuple[int, int],
                     inputs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """The text batch split back into the high-level prompt's states and the low-level one's."""
        states = once["text_embeddings"]
        half = states.shape[0] // 2
        return {"text_embeddings": states[:half], "lowlevel_embeddings": states[half:]}

    def predict(self, run: RunFn, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        return guided(x, cond["text_embeddings"].shape[0], row, lambda batch, timestep: run(
            "controlnet_unet", sample=batch, timestep=timestep, cond_embedding=tiled["cond_embedding"], **cond)["noise_pred"])
