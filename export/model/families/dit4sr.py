"""The `dit4sr` family: DiT4SR (Duan et al., ICCV 2025), SD3.5-medium's MM-DiT with the LR latent as a third
token stream inside joint attention, sampled by flow matching (presets dit4sr, dit4sr-tiny).

    text_encoder   CLIP-L + CLIP-G: penultimate states (B, 77, 768 + 1280) zero-padded to the joint width J,
                   pooled (B, 768 + 1280)
    t5_encoder     T5 (T5-XXL at full size, 4.7 B parameters, its own graph): (B, T, J); T is fixed per
                   checkpoint (`t5_length`: the official inference's 256)
    lr_encoder     the x4-upsampled LR image -> SD3's 16-channel VAE posterior mean, shifted and scaled
    transformer    velocity of (noisy latent, timestep = 1000 sigma, LR latent, [CLIP; T5] states, pooled)
    vae_decoder    latent -> image (latent / scaling + shift, SD3's VAE without quant convs)

A step: the latent doubled for guidance (negative rows, then positive), the LR latent with it (inside the
graph), velocity = negative + scale * (positive - negative); the scheduler is flow-matching Euler with
SD3.5's shift 3.0. The checkpoint layout is SD3.5-medium's diffusers folders plus the official
`transformer/` folder: published weights load unchanged. The networks are in `dit4sr_networks.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from diffsr.export.model.families.sd import clip_config, vae_force_upcast, vae_of
from diffsr.export.model.family import ModelFamily, guided, register
from diffsr.export.model.parts import Component, Draw, RunFn, Stage, Stages, Tensors
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.signatures import Signature, TensorSpec
from diffsr.export.model.tokenizer import (
    CLIP_LENGTH,
    OPENCLIP_PAD,
    VOCAB_SIZE,
    Tokenizer,
    build_clip_tokenizer,
    build_t5_tokenizer,
)

F32 = "float32"
LATENT_CHANNELS = 16  # SD3's VAE

# SD3.5's scheduler config (diffusers' FlowMatchEulerDiscreteScheduler), as written into a new checkpoint
SD35_SCHEDULER_CONFIG: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                         "shift": 3.0}

# the official test script's prompt suffix (after the caption; the whole prompt without a captioner) and negative prompt
# T5's token embedding, shared with its encoder: transformers saves it as `shared.weight` alone; both are read
T5_TIED = (("encoder.embed_tokens.weight", "shared.weight"),)

POSITIVE = ("Cinematic, hyper sharpness, highly detailed, perfect without deformations, camera, hyper detailed photo - "
            "realistic maximum detail, 32k, Color Grading, ultra HD, extreme meticulous detailing, skin pore detailing.")
NEGATIVE = ("motion blur, noisy, dotted, bokeh, pointed, CG Style, 3D render, unreal engine, blurring, dirty, messy, "
            "worst quality, low quality, frames, watermark, signature, jpeg artifacts, deformed, lowres, chaotic")
# the official test script's run: 40 steps, guidance 8.0, from noise, AdaIN; its 64-cell tiles overlap by 24,
# blended with Gaussian weights
DEFAULTS = PipelineConfig(caption_suffix=POSITIVE, negative_prompt=NEGATIVE, steps=40, guidance_scale=8.0,
                          scheduler="flow-euler", tile_overlap=24, tile_blend="gaussian")


@dataclass(frozen=True)
class DiT4SRConfig:
    """Every width; the diffusers/transformers configs of a checkpoint derive from it."""

    preset: str
    # SD3's VAE (16 latent channels, factor 8)
    vae_channels: tuple[int, int, int, int]
    vae_layers_per_block: int
    vae_norm_groups: int
    # CLIP-L and CLIP-G, with projection
    clip_l: tuple[int, int, int, int]  # hidden, layers, heads, intermediate
    clip_g: tuple[int, int, int, int]
    # T5 encoder
    t5_d_model: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_d_ff: int
    t5_length: int  # T: the T5 tokens every prompt is padded to (fixed per checkpoint and engine)
    # the MM-DiT
    layers: int
    heads: int
    head_dim: int
    dual_attention_layers: tuple[int, ...]
    pos_embed_max_size: int
    t5_vocab: int = 32128
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609
    native_latent: int = 64  # 512 px: the official tile
    # False: no T5 (no text_encoder_3/ nor tokenizer_3/ folder), its embeddings zeros, as diffusers' SD3
    # pipeline runs with text_encoder_3=None; the widths above still give the joint width and token count
    text_encoder_3: bool = True

    def __post_init__(self) -> None:
        if self.clip_l[0] + self.clip_g[0] > self.t5_d_model:
            raise DiffsrError(f"the CLIP states ({self.clip_l[0]} + {self.clip_g[0]}) must fit T5's width {self.t5_d_model}")


PRESETS: dict[str, DiT4SRConfig] = {
    # SD3.5-medium + DiT4SR's control layers: transformer about 2.94 B parameters, T5-XXL 4.7 B
    "dit4sr": DiT4SRConfig(
        preset="dit4sr", vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32,
        clip_l=(768, 12, 12, 3072), clip_g=(1280, 32, 20, 5120),
        t5_d_model=4096, t5_layers=24, t5_heads=64, t5_d_kv=64, t5_d_ff=10240, t5_length=256,
        layers=24, heads=24, head_dim=64, dual_attention_layers=tuple(range(13)), pos_embed_max_size=384,
    ),
    # the same structure at tiny widths (dual attention in the first of three layers) for the tests
    "dit4sr-tiny": DiT4SRConfig(
        preset="dit4sr-tiny", vae_channels=(32, 32, 64, 64), vae_layers_per_block=1, vae_norm_groups=8,
        clip_l=(32, 2, 2, 64), clip_g=(48, 2, 2, 96),
        t5_d_model=96, t5_layers=2, t5_heads=2, t5_d_kv=16, t5_d_ff=128, t5_length=24,
        layers=3, heads=2, head_dim=16, dual_attention_layers=(0,), pos_embed_max_size=128,
    ),
}

INT8_KEPT = {
    "pos_embed": "patch embedding",
    "time_text_embed": "timestep and pooled-text embedding",
    "norm1": "AdaLN modulation",
    "norm1_context": "AdaLN modulation",
    "norm_out": "AdaLN modulation",
    "proj_out": "final projection",
    "control_conv": "LR injection convolution",
}


def _ids(vocab: int) -> Draw:
    return lambda shape, g: torch.randint(0, vocab, shape, generator=g, dtype=torch.int32)


def _transformer_component() -> Component:
    def build(folder: Path) -> nn.Module:
        from diffsr.export.model.families.dit4sr_networks import DiT4SRTransformer

        config = read_config(folder)
        if config.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
            raise DiffsrError(f"{folder / 'config.json'} describes a {config['_class_name']}, expected SD3Transformer2DModel")
        try:
            return DiT4SRTransformer(config)
        except (ValueError, TypeError) as e:
            raise DiffsrError(f"{folder / 'config.json'} is not a valid SD3Transformer2DModel config: {e}") from None

    return Component(build, DIFFUSERS_WEIGHTS)


@register
class DiT4SR(ModelFamily):
    name = "dit4sr"
    config_class = DiT4SRConfig
    presets = PRESETS
    latent_channels = LATENT_CHANNELS
    scheduler_config = SD35_SCHEDULER_CONFIG
    defaults = DEFAULTS
    int8_default = ("transformer",)
    int8_kept = INT8_KEPT
    droppable = {"t5_encoder": "zeros, as diffusers' SD3 pipeline gives with text_encoder_3=None"}

    @property
    def t5(self) -> bool:
        return bool(self.config.text_encoder_3)

    @property  # type: ignore[override]
    def stages(self) -> Stages:
        text = ("text_encoder", "t5_encoder") if self.t5 else ("text_encoder",)
        return Stages(photo="lq_image", once=(*(Stage(name, "text") for name in text), Stage("lr_encoder", "lq", tiled=True)),
                      step=("transformer",), decode="vae_decoder", start="lr_latent")

    @property
    def latent_multiple(self) -> int:
        return 2  # the transformer's patch

    @property
    def joint_dim(self) -> int:
        return int(self.config.t5_d_model)

    @property
    def pooled_dim(self) -> int:
        return int(self.config.clip_l[0] + self.config.clip_g[0])

    @property
    def text_tokens(self) -> int:
        return CLIP_LENGTH + int(self.config.t5_length)

    def family_dims(self) -> tuple[NamedDim, ...]:
        # sides up to the positional embedding's grid (its patches are 2 cells)
        bound = self.config.pos_embed_max_size
        return (BATCH, CFG_BATCH, TEXT_BATCH, *latent_sides(self.latent_multiple, self.native_latent, bound=bound))

    def declare(self) -> tuple[Signature, ...]:
        f, t5 = self.latent_factor, self.config.t5_length
        img, lat = (f"{f}*latent_height", f"{f}*latent_width"), ("latent_height", "latent_width")
        latent = ("batch", self.latent_channels, *lat)
        guided = ("cfg_batch", self.latent_channels, *lat)
        return (
            Signature("text_encoder",
                      inputs=(TensorSpec("input_ids", "int32", ("text_batch", CLIP_LENGTH)),
                              TensorSpec("input_ids_2", "int32", ("text_batch", CLIP_LENGTH))),
                      outputs=(TensorSpec("clip_embeddings", F32, ("text_batch", CLIP_LENGTH, self.joint_dim)),
                               TensorSpec("pooled_projections", F32, ("text_batch", self.pooled_dim)))),
            *([Signature("t5_encoder", inputs=(TensorSpec("input_ids_3", "int32", ("text_batch", t5)),),
                         outputs=(TensorSpec("t5_embeddings", F32, ("text_batch", t5, self.joint_dim)),))] if self.t5 else []),
            Signature("lr_encoder", inputs=(TensorSpec("lq_image", F32, ("batch", 3, *img)),),
                      outputs=(TensorSpec("lr_latent", F32, latent),)),
            Signature("transformer",
                      inputs=(TensorSpec("sample", F32, guided), TensorSpec("timestep", F32, ("cfg_batch",)),
                              TensorSpec("lr_latent", F32, latent),
                              TensorSpec("prompt_embeds", F32, ("cfg_batch", self.text_tokens, self.joint_dim)),
                              TensorSpec("pooled_projections", F32, ("cfg_batch", self.pooled_dim))),
                      outputs=(TensorSpec("velocity", F32, guided),)),
            Signature("vae_decoder", inputs=(TensorSpec("latent", F32, latent),),
                      outputs=(TensorSpec("image", F32, ("batch", 3, *img)),)),
        )

    # --- checkpoint ------------------------------------------------------------------------

    def family_components(self) -> dict[str, Component]:
        clip = transformers_component("CLIPTextModelWithProjection", "CLIPTextConfig")
        t5 = {"text_encoder_3": transformers_component("T5EncoderModel", "T5Config", tied=T5_TIED)} if self.t5 else {}
        return {"text_encoder": clip, "text_encoder_2": clip, **t5,
                "transformer": _transformer_component(), "vae": diffusers_component("AutoencoderKL")}

    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        from diffsr.export.model.families.dit4sr_networks import ClipTextEncoders, LatentEncoder, T5Encoder
        from diffsr.export.model.families.sd_networks import VAEDecoder

        self.signature(submodule)
        table: dict[str, tuple[tuple[str, ...], Callable[..., nn.Module]]] = {
            "text_encoder": (("text_encoder", "text_encoder_2"), lambda a, b: ClipTextEncoders(a, b, self.joint_dim)),
            "t5_encoder": (("text_encoder_3",), T5Encoder),
            "lr_encoder": (("vae",), LatentEncoder),
            "transformer": (("transformer",), lambda m: m),
            "vae_decoder": (("vae",), VAEDecoder),
        }
        return table[submodule]

    def family_partial(self, submodule: str) -> bool:
        return submodule in ("lr_encoder", "vae_decoder")  # the VAE's encoder or decoder half

    def tokenizer_folders(self) -> dict[str, str]:
        return {"input_ids": "tokenizer", "input_ids_2": "tokenizer_2", **({"input_ids_3": "tokenizer_3"} if self.t5 else {})}

    def tokenizer(self, path: Path) -> Tokenizer:
        lengths = {"input_ids": CLIP_LENGTH, "input_ids_2": CLIP_LENGTH, "input_ids_3": int(self.config.t5_length)}
        return Tokenizer({name: path / folder for name, folder in self.tokenizer_folders().items()},
                         {name: lengths[name] for name in self.tokenizer_folders()})

    def t5_config(self) -> dict[str, Any]:
        """T5 v1.1 (T5-XXL's kind): gated GELU, no tied embeddings."""
        c = self.config
        return dict(vocab_size=c.t5_vocab, d_model=c.t5_d_model, d_kv=c.t5_d_kv, d_ff=c.t5_d_ff, num_layers=c.t5_layers,
                    num_heads=c.t5_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128, is_encoder_decoder=False,
                    use_cache=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)

    def transformer_config(self) -> dict[str, Any]:
        """diffusers `SD3Transformer2DModel` arguments (the official DiT4SR folder's config.json)."""
        c = self.config
        return dict(sample_size=c.native_latent, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                    num_layers=c.layers, attention_head_dim=c.head_dim, num_attention_heads=c.heads,
                    joint_attention_dim=self.joint_dim, caption_projection_dim=c.heads * c.head_dim,
                    pooled_projection_dim=self.pooled_dim, pos_embed_max_size=c.pos_embed_max_size,
                    dual_attention_layers=c.dual_attention_layers, qk_norm="rms_norm")

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        from accelerate import init_empty_weights
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

        from diffsr.export.model.families.dit4sr_networks import DiT4SRTransformer

        c = self.config
        with init_empty_weights(include_buffers=False):
            vae = vae_of(c.vae_channels, c.vae_layers_per_block, c.vae_norm_groups, LATENT_CHANNELS,
                         scaling_factor=c.scaling_factor, shift_factor=c.shift_factor, use_quant_conv=False,
                         use_post_quant_conv=False)
            clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config(*c.clip_l, "quick_gelu", 49407, projection=True)))
            clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**clip_config(*c.clip_g, "gelu", 0, projection=True)))
            t5 = T5EncoderModel(T5Config(**self.t5_config()))
            transformer = DiT4SRTransformer(self.transformer_config())
        found = {"text_encoder": (clip_l, clip_l.config.to_dict()), "text_encoder_2": (clip_g, clip_g.config.to_dict()),
                 "text_encoder_3": (t5, t5.config.to_dict()), "vae": (vae, diffusers_config(vae)),
                 "transformer": (transformer, self.transformer_config() | {"_class_name": "SD3Transformer2DModel"})}
        return {folder: net for folder, net in found.items() if folder in self.family_components()}

    def write_extras(self, out: Path) -> None:
        build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))
        build_clip_tokenizer(pad_token=OPENCLIP_PAD).save_pretrained(str(out / "tokenizer_2"))
        if self.t5:
            build_t5_tokenizer(self.config.t5_vocab).save_pretrained(str(out / "tokenizer_3"))

    def family_draws(self) -> Mapping[str, Draw]:
        return {"input_ids": _ids(VOCAB_SIZE), "input_ids_2": _ids(VOCAB_SIZE), "input_ids_3": _ids(self.config.t5_vocab),
                "timestep": lambda shape, g: torch.rand(shape, generator=g) * 1000,
                "lq_image": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1}

    def force_upcast(self, path: Path) -> tuple[str, ...]:
        return ("lr_encoder", "vae_decoder") if vae_force_upcast(path) else ()  # the networks made of the VAE

    # --- a step ----------------------------------------------------------------------------

    def conditioning(self, once: Tensors, size: tuple[int, int],
                     inputs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """SD3's prompt embeddings: the CLIP states, then T5's (zeros without T5, as diffusers gives), on the
        token axis; the pooled CLIP outputs."""
        clip = once["clip_embeddings"]
        t5 = once["t5_embeddings"] if self.t5 else clip.new_zeros(clip.shape[0], int(self.config.t5_length), clip.shape[2])
        return {"prompt_embeds": torch.cat([clip, t5], dim=1), "pooled_projections": once["pooled_projections"]}

    def predict(self, run: RunFn, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        # the timestep is 1000 sigma; the LR latent is repeated for the guidance rows inside the graph
        return guided(x, cond["prompt_embeds"].shape[0], row, lambda batch, timestep: run(
            "transformer", sample=batch, timestep=timestep, lr_latent=tiled["lr_latent"], **cond)["velocity"])

