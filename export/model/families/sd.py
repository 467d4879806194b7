"""The `sd` family: the paper's SD-style latent diffusion SR model (presets tiny, small, sd15).

    text_encoder        input_ids (B, 77)                     -> text_embeddings (B, 77, D)
    lq_encoder          lq_image (B, 3, 8h, 8w) in [-1, 1]     -> f1 (B, C1, h, w), z_lq (B, 4, h, w)
    fusion_transformer  f1, sample x_t (B, 4, h, w)           -> f2 (B, C2, h, w)          every step
    controlnet_unet     sample (2B, 4, h, w), timestep (2B,),
                        text_embeddings (2B, 77, D), f2 (B, ..) -> noise_pred (2B, 4, h, w) every step
    vae_decoder         latent (B, 4, h, w)                   -> image (B, 3, 8h, 8w) in [-1, 1]

A step: f2 from the fusion transformer, the noise from ControlNet + UNet on the latent doubled for
classifier-free guidance (negative rows, then positive), f2 shared by both halves; guided noise =
negative + scale * (positive - negative). The networks are in `sd_networks.py`; `sdxl.py` is its twin.
diffusers and transformers are imported where networks are built, not with the family: what only reads
the family (the Triton models, the command line) starts without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.components import diffusers_component, diffusers_config, our_component, transformers_component
from diffsr.export.model.dims import BATCH, CFG_BATCH, TEXT_BATCH, NamedDim, latent_sides
from diffsr.export.model.family import ModelFamily, guided, register
from diffsr.export.model.parts import Component, Draw, RunFn, Stage, Stages, Tensors
from diffsr.export.model.signatures import Signature, TensorSpec
from diffsr.export.model.tokenizer import CLIP_LENGTH, VOCAB_SIZE, Tokenizer, build_clip_tokenizer

F32 = "float32"
LATENT_CHANNELS = 4  # the SD VAE's latent (SD 1.x and SDXL)

# Stable Diffusion's training schedule (SD 1.x and SDXL alike), as written into a new checkpoint.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}


@dataclass(frozen=True)
class SDConfig:
    """Every width of the model; the diffusers/transformers configs of a checkpoint derive from it."""

    preset: str
    # VAE: four encoder/decoder blocks, three of them downsample (latent factor 8); or three (factor 4, as
    # LDM's own x4 SR model used)
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    # multi-layer LQ fusion -> f1
    f1_channels: int
    lq_fusion_heads: int
    # CLIP text encoder
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    # UNet and its ControlNet copy
    unet_channels: tuple[int, ...]
    unet_cross_attention: tuple[bool, ...]  # per level: does the block attend to the text?
    unet_layers_per_block: int
    unet_heads: int | tuple[int, ...]  # attention heads, per level where a tuple (SDXL: head width 64)
    unet_norm_groups: int
    # fusion transformer -> f2 (the ControlNet's conditioning)
    f2_channels: int
    fusion_heads: int
    fusion_blocks: int = 2
    scaling_factor: float = 0.18215
    unet_transformer_depth: tuple[int, ...] = ()  # transformer blocks per level (the mid block takes the last)
    vae_force_upcast: bool = False  # the VAE must run in FP32 unless proven safe in FP16 (diffusers' force_upcast)
    native_latent: int = 64  # the latent side the UNet was trained at: SD 64 (512 px), SDXL 128 (1024 px)
    latent_channels: int = LATENT_CHANNELS  # the VAE's latent: SD's and SDXL's 4

    def __post_init__(self) -> None:
        if len(self.vae_channels) not in (3, 4):
            raise DiffsrError(f"vae_channels {self.vae_channels}: an SD VAE has 3 blocks (factor 4) or 4 (factor 8)")


PRESETS: dict[str, SDConfig] = {
    # tests: a full 20-step 128->512 run in seconds on a laptop CPU
    "tiny": SDConfig(
        preset="tiny",
        vae_channels=(32, 32, 64, 64), vae_layers_per_block=1, vae_norm_groups=8,
        f1_channels=64, lq_fusion_heads=2,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
        unet_channels=(32, 64), unet_cross_attention=(False, True), unet_layers_per_block=1,
        unet_heads=2, unet_norm_groups=8,
        f2_channels=32, fusion_heads=2,
    ),
    # CPU benchmarks: a quarter of the SD 1.5 widths and heads (same head dims), SD 1.5 depth
    "small": SDConfig(
        preset="small",
        vae_channels=(32, 64, 128, 128), vae_layers_per_block=2, vae_norm_groups=16,
        f1_channels=128, lq_fusion_heads=4,
        text_hidden=192, text_layers=12, text_heads=3, text_intermediate=768,
        unet_channels=(80, 160, 320, 320), unet_cross_attention=(True, True, True, False),
        unet_layers_per_block=2, unet_heads=2, unet_norm_groups=16,  # a quarter of the heads: SD 1.5's head dims
        f2_channels=80, fusion_heads=2,
    ),
    # the trained demo model (scripts/train_demo.py): a factor-4 VAE with 8 latent channels (LDM's x4 SR model
    # used a factor-4 autoencoder), and a
    # UNet small enough to train on a 2-core CPU (73 minutes: docs/demo_model.md); 512 px native
    "demo": SDConfig(
        preset="demo",
        vae_channels=(32, 64, 64), vae_layers_per_block=1, vae_norm_groups=8,
        f1_channels=64, lq_fusion_heads=2,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
        unet_channels=(48, 96), unet_cross_attention=(False, True), unet_layers_per_block=1,
        unet_heads=4, unet_norm_groups=8,
        f2_channels=48, fusion_heads=2, scaling_factor=1.0, native_latent=128, latent_channels=8,
    ),
    # SD 1.5 widths: the realistic GPU benchmark
    "sd15": SDConfig(
        preset="sd15",
        vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32,
        f1_channels=512, lq_fusion_heads=8,
        text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
        unet_channels=(320, 640, 1280, 1280), unet_cross_attention=(True, True, True, False),
        unet_layers_per_block=2, unet_heads=8, unet_norm_groups=32,
        f2_channels=320, fusion_heads=5,
    ),
}

# weight-name parts kept out of INT8 (the field's recipe for diffusion UNets: NVIDIA ModelOpt's, TensorRT's demo)
INT8_KEPT = {
    "time_embedding": "timestep embedding",
    "time_emb_proj": "timestep embedding projection",
    "add_embedding": "SDXL's text and size embedding",
    "conv_in": "first convolution",
    "conv_out": "last convolution",
    "conv_shortcut": "shortcut convolution",
    "controlnet_cond_embedding": "ControlNet conditioning embedding",
    "controlnet_down_blocks": "ControlNet zero convolution",
    "controlnet_mid_block": "ControlNet zero convolution",
}


def clip_config(hidden: int, layers: int, heads: int, intermediate: int, act: str, pad: int,
                projection: bool = False) -> dict[str, Any]:
    """transformers `CLIPTextConfig` arguments of a CLIP text encoder on the CLIP BPE vocabulary (77 tokens);
    with `projection`, a projection of the pooled output as wide as its states (OpenCLIP bigG, SD3's two)."""
    config = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=CLIP_LENGTH, bos_token_id=49406, eos_token_id=49407,
                  hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
                  hidden_act=act, pad_token_id=pad)
    return config | ({"projection_dim": hidden} if projection else {})


def vae_of(channels: tuple[int, ...], layers_per_block: int, norm_groups: int, latent_channels: int, **config: Any) -> Any:
    """An SD-style `AutoencoderKL` (every block but the last downsamples: four give factor 8), parameters on the meta device
    when built under `init_empty_weights`; `config`: its scaling, shift and quant-conv settings."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels),
                         block_out_channels=channels, layers_per_block=layers_per_block, norm_num_groups=norm_groups,
                         **config)


def vae_force_upcast(path: Path) -> bool:
    """Whether a checkpoint's VAE is marked as overflowing in FP16 (diffusers' `force_upcast`)."""
    return bool(read_json(path / "vae" / "config.json", "checkpoint file").get("force_upcast", False))


def controlnet_copy_source(folder: str, key: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
    """The seed name of a ControlNet family's tensor: a ControlNet's is its UNet's where the UNet has it (a ControlNet
    is a trainable copy of the UNet's encoder: `from_unet`)."""
    if folder == "controlnet" and shapes["unet"].get(key) == shapes["controlnet"][key]:
        return f"unet/{key}"
    return f"{folder}/{key}"


def _ids(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, shape, generator=g, dtype=torch.int32)


@register
class SD(ModelFamily):
    name = "sd"
    config_class = SDConfig
    presets = PRESETS
    stages = Stages(photo="lq_image", once=(Stage("text_encoder", "text"), Stage("lq_encoder", "lq", tiled=True)),
                    step=("fusion_transformer", "controlnet_unet"), decode="vae_decoder", start="z_lq")
    scheduler_config = SD_SCHEDULER_CONFIG
    int8_default = ("controlnet_unet",)  # the denoising step's cost; `diffsr quantize --submodules` widens it
    int8_kept = INT8_KEPT
    text_length = CLIP_LENGTH

    # --- shape -----------------------------------------------------------------------------

    @property
    def latent_multiple(self) -> int:
        return 2 ** (len(self.config.unet_channels) - 1)  # the UNet halves the latent once per level but the last

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.config.vae_channels) - 1)  # every VAE block but the last halves the image

    @property
    def context_dim(self) -> int:
        """Width of the text states the UNet attends to."""
        return int(self.config.text_hidden)

    def family_dims(self) -> tuple[NamedDim, ...]:
        return (BATCH, CFG_BATCH, TEXT_BATCH, *latent_sides(self.latent_multiple, self.native_latent))

    def text_inputs(self) -> list[TensorSpec]:
        return [TensorSpec("input_ids", "int32", ("text_batch", self.text_length))]

    def text_outputs(self) -> list[TensorSpec]:
        return [TensorSpec("text_embeddings", F32, ("text_batch", self.text_length, self.context_dim))]

    def added_conditioning(self) -> list[TensorSpec]:
        """ControlNet + UNet inputs besides the latent, timestep, text states and f2 (SDXL's)."""
        return []

    def declare(self) -> tuple[Signature, ...]:
        c, f = self.config, self.latent_factor
        img, lat = (f"{f}*latent_height", f"{f}*latent_width"), ("latent_height", "latent_width")
        latent = ("batch", self.latent_channels, *lat)
        return (
            Signature("text_encoder", inputs=tuple(self.text_inputs()), outputs=tuple(self.text_outputs())),
            Signature("lq_encoder", inputs=(TensorSpec("lq_image", F32, ("batch", 3, *img)),),
                      outputs=(TensorSpec("f1", F32, ("batch", c.f1_channels, *lat)), TensorSpec("z_lq", F32, latent))),
            Signature("fusion_transformer",
                      inputs=(TensorSpec("f1", F32, ("batch", c.f1_channels, *lat)), TensorSpec("sample", F32, latent)),
                      outputs=(TensorSpec("f2", F32, ("batch", c.f2_channels, *lat)),)),
            Signature("controlnet_unet",
                      inputs=(TensorSpec("sample", F32, ("cfg_batch", self.latent_channels, *lat)),
                              TensorSpec("timestep", F32, ("cfg_batch",)),
                              TensorSpec("text_embeddings", F32, ("cfg_batch", self.text_length, self.context_dim)),
                              *self.added_conditioning(),
                              TensorSpec("f2", F32, ("batch", c.f2_channels, *lat))),
                      outputs=(TensorSpec("noise_pred", F32, ("cfg_batch", self.latent_channels, *lat)),)),
            Signature("vae_decoder", inputs=(TensorSpec("latent", F32, latent),),
                      outputs=(TensorSpec("image", F32, ("batch", 3, *img)),)),
        )

    # --- checkpoint ------------------------------------------------------------------------

    def family_components(self) -> dict[str, Component]:
        networks = "diffsr.export.model.families.sd_networks"  # imported, as diffusers is, when a network is built
        return {
            "text_encoder": transformers_component("CLIPTextModel", "CLIPTextConfig"),
            "lq_encoder": our_component(f"{networks}:LQEncoder", f"{networks}:LQEncoderConfig"),
            "fusion_transformer": our_component(f"{networks}:FusionTransformer", f"{networks}:FusionConfig"),
            "controlnet": diffusers_component("ControlNetModel"),
            "unet": diffusers_component("UNet2DConditionModel"),
            "vae": diffusers_component("AutoencoderKL"),
        }

    def text_folders(self) -> tuple[str, ...]:
        return ("text_encoder",)

    def combine_unet(self) -> Callable[..., nn.Module]:
        from diffsr.export.model.families.sd_networks import ControlNetUNet

        return ControlNetUNet

    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        from diffsr.export.model.families.sd_networks import TextEncoder, VAEDecoder

        self.signature(submodule)  # a clear error for an unknown name
        table: dict[str, tuple[tuple[str, ...], Callable[..., nn.Module]]] = {
            "text_encoder": (self.text_folders(), TextEncoder),
            "lq_encoder": (("lq_encoder",), lambda m: m),
            "fusion_transformer": (("fusion_transformer",), lambda m: m),
            "controlnet_unet": (("controlnet", "unet"), self.combine_unet()),
            "vae_decoder": (("vae",), VAEDecoder),
        }
        return table[submodule]

    def family_partial(self, submodule: str) -> bool:
        return submodule == "vae_decoder"  # the VAE's decoder half

    def tokenizer_folders(self) -> dict[str, str]:
        """Token input -> tokenizer folder, in the text encoder's input order."""
        return {"input_ids": "tokenizer"}

    def tokenizer(self, path: Path) -> Tokenizer:
        return Tokenizer({name: path / folder for name, folder in self.tokenizer_folders().items()}, self.text_length)

    def unet_config(self) -> dict[str, Any]:
        """diffusers `UNet2DConditionModel` arguments; text attention where `unet_cross_attention` says."""
        c = self.config
        down = tuple("CrossAttnDownBlock2D" if x else "DownBlock2D" for x in c.unet_cross_attention)
        up = tuple("CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(c.unet_cross_attention))
        args: dict[str, Any] = dict(
            sample_size=64, in_channels=self.latent_channels, out_channels=self.latent_channels,
            down_block_types=down, up_block_types=up, block_out_channels=c.unet_channels,
            layers_per_block=c.unet_layers_per_block, attention_head_dim=c.unet_heads,
            cross_attention_dim=self.context_dim, norm_num_groups=c.unet_norm_groups,
        )
        if c.unet_transformer_depth:
            args["transformer_layers_per_block"] = c.unet_transformer_depth
        return args

    def text_config(self) -> dict[str, Any]:
        """transformers `CLIPTextConfig` arguments: CLIP-L at sd15."""
        c = self.config
        return clip_config(c.text_hidden, c.text_layers, c.text_heads, c.text_intermediate, "quick_gelu", 49407)

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        from accelerate import init_empty_weights
        from diffusers import ControlNetModel, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from diffsr.export.model.families.sd_networks import (
            FusionConfig,
            FusionTransformer,
            LQEncoder,
            LQEncoderConfig,
            config_to_json,
        )

        c = self.config
        with init_empty_weights(include_buffers=False):
            vae = vae_of(c.vae_channels, c.vae_layers_per_block, c.vae_norm_groups, self.latent_channels,
                         scaling_factor=c.scaling_factor, force_upcast=c.vae_force_upcast)
            unet = UNet2DConditionModel(**self.unet_config())
            controlnet = ControlNetModel.from_unet(
                unet, conditioning_channels=c.f2_channels, conditioning_embedding_out_channels=(c.f2_channels,),
                load_weights_from_unet=False)
            text = CLIPTextModel(CLIPTextConfig(**self.text_config()))
            lq = LQEncoder(LQEncoderConfig(c.vae_channels, c.vae_layers_per_block, c.vae_norm_groups, c.f1_channels,
                                           c.lq_fusion_heads, c.scaling_factor, c.latent_channels))
            fusion = FusionTransformer(FusionConfig(c.f1_channels, c.f2_channels, c.fusion_heads, c.fusion_blocks,
                                                    c.latent_channels))
            found: dict[str, tuple[nn.Module, dict[str, Any]]] = {
                "text_encoder": (text, text.config.to_dict()),
                "lq_encoder": (lq, config_to_json(lq.config)),
                "fusion_transformer": (fusion, config_to_json(fusion.config)),
            }
            for name, net in (("vae", vae), ("unet", unet), ("controlnet", controlnet)):
                found[name] = (net, diffusers_config(net))
        return found

    def copy_source(self, folder: str, key: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
        if folder == "lq_encoder" and key.split(".")[0] in ("encoder", "quant_conv"):
            return f"vae/{key}"  # the LQ encoder starts as the VAE's encoder
        return controlnet_copy_source(folder, key, shapes)

    def write_extras(self, out: Path) -> None:
        build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))

    def family_draws(self) -> Mapping[str, Draw]:
        return {
            "input_ids": _ids,
            "timestep": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float(),
            "lq_image": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
        }

    def force_upcast(self, path: Path) -> tuple[str, ...]:
        return ("lq_encoder", "vae_decoder") if vae_force_upcast(path) else ()  # the networks made of the VAE

    # --- a step ----------------------------------------------------------------------------

    def predict(self, run: RunFn, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        f2 = run("fusion_transformer", f1=tiled["f1"], sample=x)["f2"]  # (B, C2, h, w), shared by both branches
        return guided(x, cond["text_embeddings"].shape[0], row, lambda batch, timestep: run(
            "controlnet_unet", sample=batch, timestep=timestep, f2=f2, **cond)["noise_pred"])



def legacy_json(model: dict[str, Any], sdxl_keys: tuple[str, ...]) -> dict[str, Any]:
    """An SD model entry written before families had names held SDXL's keys at zero: dropped here."""
    extra = {k: model[k] for k in sdxl_keys if k in model}
    if any(extra.values()):
        raise DiffsrError(f"model config {json.dumps(extra)} is SDXL's, not SD's")
    return {k: v for k, v in model.items() if k not in sdxl_keys}
