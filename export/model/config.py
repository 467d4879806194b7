"""Model sizes: one frozen dataclass, the presets, and the component configs derived from it.

Every submodule's width comes from `ModelConfig`; the diffusers/transformers configs written into a
checkpoint are derived here, once. Two families share it: SD 1.x (one CLIP text encoder) and SDXL
(a second, projected text encoder: `text2_*`; the UNet's "text_time" additional embedding of the pooled
text and six size micro-conditioning values, `time_ids`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Any

from diffsr.export.core.errors import DiffsrError

LATENT_CHANNELS = 4
LATENT_FACTOR = 8  # pixels per latent cell: the VAE has three 2x downsamplings
TEXT_LENGTH = 77  # CLIP context length
VOCAB_SIZE = 49408  # CLIP BPE vocabulary (256 bytes, 256 word-ends, 48894 merges, 2 specials)
TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop top-left (y, x), target (h, w)


def dataclass_from_json(cls: Any, data: dict[str, Any], what: str) -> Any:
    """A config dataclass from JSON: unknown or missing keys are errors naming them; lists -> tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names - {"_class_name"})
    if unknown:
        raise DiffsrError(f"unknown {what} keys {unknown}; valid keys: {sorted(names)}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise DiffsrError(f"{what} lacks keys {missing}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "_class_name"})


class Precision(str, Enum):
    """Numeric precision of an exported graph or engine."""

    FP32 = "fp32"
    FP16 = "fp16"  # FP16 weights and activations; the layers the FP16 check keeps stay FP32 in the graph
    INT8 = "int8"  # the FP16 graph with INT8 (Q/DQ) convolutions and projections: `diffsr quantize`

    def filename(self, submodule: str) -> str:
        return f"{submodule}.onnx" if self is Precision.FP32 else f"{submodule}.{self.value}.onnx"


@dataclass(frozen=True)
class ModelConfig:
    preset: str
    # VAE: four encoder/decoder blocks, three of them downsample (latent factor 8)
    vae_channels: tuple[int, int, int, int]
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
    # SDXL: transformer blocks per level (the mid block takes the last), the second text encoder
    # (OpenCLIP bigG with projection; 0 = none), the size micro-conditioning's embedding width, and
    # whether the VAE must run in FP32 unless proven safe in FP16 (diffusers' `force_upcast`)
    unet_transformer_depth: tuple[int, ...] = ()
    text2_hidden: int = 0
    text2_layers: int = 0
    text2_heads: int = 0
    text2_intermediate: int = 0
    addition_time_embed_dim: int = 0
    vae_force_upcast: bool = False
    # the latent side the UNet was trained at: SD 64 (512 px), SDXL 128 (1024 px); the engines' opt
    native_latent: int = 64

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must divide by this: the UNet halves them once per level but the last."""
        return 2 ** (len(self.unet_channels) - 1)

    @property
    def sdxl(self) -> bool:
        return self.text2_hidden > 0

    @property
    def context_dim(self) -> int:
        """Width of the text states the UNet attends to: SDXL concatenates both encoders' (768 + 1280)."""
        return self.text_hidden + self.text2_hidden

    @property
    def pooled_dim(self) -> int:
        """Width of SDXL's pooled, projected text embedding (`text_embeds`); 0 for SD."""
        return self.text2_hidden

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        return dataclass_from_json(cls, data, "model config")


PRESETS: dict[str, ModelConfig] = {
    # tests: a full 20-step 128->512 run in seconds on a laptop CPU
    "tiny": ModelConfig(
        preset="tiny",
        vae_channels=(32, 32, 64, 64), vae_layers_per_block=1, vae_norm_groups=8,
        f1_channels=64, lq_fusion_heads=2,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
        unet_channels=(32, 64), unet_cross_attention=(False, True), unet_layers_per_block=1,
        unet_heads=2, unet_norm_groups=8,
        f2_channels=32, fusion_heads=2,
    ),
    # CPU benchmarks: a quarter of the SD 1.5 widths and heads (same head dims), SD 1.5 depth
    "small": ModelConfig(
        preset="small",
        vae_channels=(32, 64, 128, 128), vae_layers_per_block=2, vae_norm_groups=16,
        f1_channels=128, lq_fusion_heads=4,
        text_hidden=192, text_layers=12, text_heads=3, text_intermediate=768,
        unet_channels=(80, 160, 320, 320), unet_cross_attention=(True, True, True, False),
        unet_layers_per_block=2, unet_heads=2, unet_norm_groups=16,  # a quarter of the heads: SD 1.5's head dims
        f2_channels=80, fusion_heads=2,
    ),
    # SD 1.5 widths: the realistic GPU benchmark
    "sd15": ModelConfig(
        preset="sd15",
        vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32,
        f1_channels=512, lq_fusion_heads=8,
        text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
        unet_channels=(320, 640, 1280, 1280), unet_cross_attention=(True, True, True, False),
        unet_layers_per_block=2, unet_heads=8, unet_norm_groups=32,
        f2_channels=320, fusion_heads=5,
    ),
    # SDXL base, the paper's backbone: UNet 2.57 B parameters (transformer depth 1, 2, 10, mid 10),
    # ControlNet 1.25 B, CLIP-L + OpenCLIP bigG (context 2048, pooled 1280), VAE scaling 0.13025
    "sdxl": ModelConfig(
        preset="sdxl",
        vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32,
        f1_channels=512, lq_fusion_heads=8,
        text_hidden=768, text_layers=12, text_heads=12, text_intermediate=3072,
        text2_hidden=1280, text2_layers=32, text2_heads=20, text2_intermediate=5120,
        unet_channels=(320, 640, 1280), unet_cross_attention=(False, True, True), unet_transformer_depth=(1, 2, 10),
        unet_layers_per_block=2, unet_heads=(5, 10, 20), unet_norm_groups=32, addition_time_embed_dim=256,
        f2_channels=320, fusion_heads=5, scaling_factor=0.13025, vae_force_upcast=True, native_latent=128,
    ),
    # SDXL's structure at tiny widths (and SD's 512 px native side, so its tests stay fast): every SDXL code path in the test suite, in seconds
    "sdxl-tiny": ModelConfig(
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


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise DiffsrError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# --- component configs (what the checkpoint's subfolders hold) ---------------------------------


def vae_config(cfg: ModelConfig) -> dict[str, Any]:
    """diffusers `AutoencoderKL` arguments: the SD VAE layout at the preset's widths."""
    return dict(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=cfg.vae_channels, layers_per_block=cfg.vae_layers_per_block,
        norm_num_groups=cfg.vae_norm_groups, scaling_factor=cfg.scaling_factor, force_upcast=cfg.vae_force_upcast,
    )


def unet_config(cfg: ModelConfig) -> dict[str, Any]:
    """diffusers `UNet2DConditionModel` arguments; text attention where `unet_cross_attention` says;
    SDXL's "text_time" additional embedding (pooled text + six time ids, each `addition_time_embed_dim`)."""
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cfg.unet_cross_attention)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cfg.unet_cross_attention))
    args: dict[str, Any] = dict(
        sample_size=64, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=down, up_block_types=up, block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.unet_layers_per_block, attention_head_dim=cfg.unet_heads,
        cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.unet_norm_groups,
    )
    if cfg.unet_transformer_depth:
        args["transformer_layers_per_block"] = cfg.unet_transformer_depth
    if cfg.sdxl:
        args.update(sample_size=128, use_linear_projection=True, addition_embed_type="text_time",
                    addition_time_embed_dim=cfg.addition_time_embed_dim,
                    projection_class_embeddings_input_dim=cfg.pooled_dim + TIME_IDS * cfg.addition_time_embed_dim)
    return args


def text_config(cfg: ModelConfig, second: bool = False) -> dict[str, Any]:
    """transformers `CLIPTextConfig` arguments: CLIP-L at sd15 and sdxl; with `second`, SDXL's OpenCLIP
    bigG (GELU, a projection of the pooled output as wide as its states)."""
    ids = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=TEXT_LENGTH, bos_token_id=49406, eos_token_id=49407)
    if second:
        return dict(ids, hidden_size=cfg.text2_hidden, num_hidden_layers=cfg.text2_layers,
                    num_attention_heads=cfg.text2_heads, intermediate_size=cfg.text2_intermediate,
                    hidden_act="gelu", projection_dim=cfg.text2_hidden, pad_token_id=0)
    return dict(ids, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_intermediate,
                hidden_act="quick_gelu", pad_token_id=49407)
