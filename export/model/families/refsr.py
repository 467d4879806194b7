"""The `refsr` family: reference-guided latent diffusion SR (Denisov, Zhdanov, Biryukov, Bykovsky, Keldysh Institute
preprint No. 18/2025) on LDM x4 (Rombach et al.; diffusers' LDM super-resolution layout). Presets refsr (LDM x4's
widths) and refsr-tiny.

    lr_encoder           lr_image (B, 3, h, w): the LR photo at the latent's sides in [-1, 1] -> z_lq (B, 3, h, w): the
                         VQ encoder's latent of the photo bicubic x4                           once, over tiles
    reference_encoder    references (R, 3, S, S) -> reference_kv (R, D): each decoder level's keys and values of each
                         reference (the VQ encoder, then the reference copy of the UNet's encoder)       once
    reference_attention  z_lq (B, 3, h, w), reference_kv (R, D) -> reference_residuals (B, W, h, w): the LR copy's
                         features attend to each reference alone at every decoder level, aggregated   once, over tiles
    unet                 sample (B, 3, h, w), timestep (B,), lr_image, reference_residuals -> noise_pred   every step
    vq_decoder           latent (B, 3, h, w) -> image (B, 3, 4h, 4w)

The preprint leaves open whether the encoder copies see t: here they do not, so the whole cross-attention (its
queries from the LR copy, its keys and values from the references) depends on the request alone and runs once per
request; every step adds its output to the decoder levels, whatever the number of references. With none, the stages
are not run, the residuals are zero and the step is LDM x4's UNet. Every choice: docs/refsr.md. Networks:
`refsr_networks.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.components import diffusers_component, diffusers_config, our_component
from diffsr.export.model.dims import BATCH, NamedDim, latent_sides
from diffsr.export.model.family import ModelFamily, register
from diffsr.export.model.inputs import RequestInput
from diffsr.export.model.parts import Component, Draw, RunFn, Stage, Stages, Tensors
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.signatures import Signature, TensorSpec

F32 = "float32"
NETWORKS = "diffsr.export.model.families.refsr_networks"
MAX_REFERENCES = 10  # the preprint trained with up to 10 references a crop
# LDM x4's schedule (CompVis' linear_start 0.0015, linear_end 0.0155 on a sqrt-spaced ("scaled_linear") beta schedule)
REFSR_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0155,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0,
    "timestep_spacing": "leading", "clip_sample": False,
}
# no text and no guidance (LDM x4 is conditioned on the photo alone); no colour fix (its pipeline has none)
DEFAULTS = PipelineConfig(prompt="", negative_prompt="", caption_suffix="", steps=20, guidance_scale=1.0,
                          scheduler="ddim", color_fix="none", caption="never")
REFERENCES = NamedDim("references", "reference photos of a request (none: the stages that read them do not run)",
                      "length", trace=5, odd=3, bound=MAX_REFERENCES, native=4)


@dataclass(frozen=True)
class RefSRConfig:
    """Every width; the diffusers configs and the reference parts' config of a checkpoint derive from it."""

    preset: str
    vq_channels: tuple[int, ...]  # the VQ autoencoder's widths: one halving fewer than widths (3: factor 4)
    vq_layers_per_block: int
    vq_norm_groups: int
    vq_codes: int
    unet_channels: tuple[int, ...]
    unet_attention: tuple[bool, ...]  # per level: attention blocks (the mid block has one always)
    unet_layers_per_block: int
    unet_head_dim: int
    unet_norm_groups: int
    reference_side: int  # pixels: the square each reference is resized to
    native_latent: int
    latent_channels: int = 3
    aggregation: str = "mean"

    def __post_init__(self) -> None:
        if len(self.unet_attention) != len(self.unet_channels) or len(self.unet_channels) < 2:
            raise DiffsrError(f"unet_attention {self.unet_attention} must give each of the {len(self.unet_channels)} "
                              "levels (at least two)")


PRESETS: dict[str, RefSRConfig] = {
    # LDM x4 (CompVis ldm-super-resolution-4x-openimages; latent-diffusion's bsr_sr config): a 160-wide UNet of four
    # levels with attention at the lowest (and the mid block), 32-channel heads; the f4 VQ autoencoder (8192 codes)
    "refsr": RefSRConfig(
        preset="refsr", vq_channels=(128, 256, 512), vq_layers_per_block=2, vq_norm_groups=32, vq_codes=8192,
        unet_channels=(160, 320, 320, 640), unet_attention=(False, False, False, True), unet_layers_per_block=2,
        unet_head_dim=32, unet_norm_groups=32, reference_side=256, native_latent=128),
    # tests: the same structure at tiny widths
    "refsr-tiny": RefSRConfig(
        preset="refsr-tiny", vq_channels=(16, 32, 32), vq_layers_per_block=1, vq_norm_groups=8, vq_codes=64,
        unet_channels=(16, 32, 32), unet_attention=(False, True, True), unet_layers_per_block=1, unet_head_dim=8,
        unet_norm_groups=8, reference_side=32, native_latent=16),
}


@register
class RefSR(ModelFamily):
    name = "refsr"
    config_class = RefSRConfig
    presets = PRESETS
    stages = Stages(photo="lr_image", once=(Stage("lr_encoder", "lq", tiled=True),
                                            Stage("reference_encoder", "references"),
                                            Stage("reference_attention", "references", tiled=True)),
                    step=("unet",), decode="vq_decoder", start="z_lq")
    scheduler_config = REFSR_SCHEDULER_CONFIG
    defaults = DEFAULTS
    int8_default = ("unet",)
    int8_kept = {"time_embedding": "timestep embedding", "time_emb_proj": "timestep embedding projection"}

    @property
    def latent_channels(self) -> int:
        return int(self.config.latent_channels)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.config.vq_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        return 2 ** (len(self.config.unet_channels) - 1)

    def reference_config(self) -> Any:
        """The `reference/` folder's config: the UNet's encoder settings, the references' side, the aggregation."""
        from diffsr.export.model.families.refsr_networks import ReferenceConfig

        c, unet = self.config, self.unet_config()
        return ReferenceConfig(
            in_channels=c.latent_channels, block_out_channels=c.unet_channels,
            down_block_types=tuple(unet["down_block_types"]), layers_per_block=c.unet_layers_per_block,
            norm_num_groups=c.unet_norm_groups, attention_head_dim=c.unet_head_dim, reference_side=c.reference_side,
            vq_factor=self.latent_factor, aggregation=c.aggregation)

    def family_inputs(self) -> tuple[RequestInput, ...]:
        return (RequestInput("references", "photos", "a reference photo of similar content (any size and mode; resized "
                             "to the model's reference side, square: refsr's 256 px)", low=0, high=MAX_REFERENCES,
                             side=self.config.reference_side, tensor="references", flag="reference"),)

    def family_dims(self) -> tuple[NamedDim, ...]:
        return (BATCH, REFERENCES, *latent_sides(self.latent_multiple, self.native_latent))

    def declare(self) -> tuple[Signature, ...]:
        c, f, lat = self.config, self.latent_factor, ("latent_height", "latent_width")
        latent = ("batch", c.latent_channels, *lat)
        lr = TensorSpec("lr_image", F32, ("batch", 3, *lat))
        z = TensorSpec("z_lq", F32, latent)
        kv = TensorSpec("reference_kv", F32, ("references", self.reference_config().row()))
        residuals = TensorSpec("reference_residuals", F32, ("batch", sum(c.unet_channels), *lat))
        return (
            Signature("lr_encoder", (lr,), (z,)),
            Signature("reference_encoder", (TensorSpec("references", F32, ("references", 3, c.reference_side,
                                                                           c.reference_side)),), (kv,)),
            Signature("reference_attention", (z, kv), (residuals,)),
            Signature("unet", (TensorSpec("sample", F32, latent), TensorSpec("timestep", F32, ("batch",)), lr, residuals),
                      (TensorSpec("noise_pred", F32, latent),)),
            Signature("vq_decoder", (TensorSpec("latent", F32, latent),),
                      (TensorSpec("image", F32, ("batch", 3, f"{f}*latent_height", f"{f}*latent_width")),)),
        )

    # --- checkpoint ------------------------------------------------------------------------

    def family_components(self) -> dict[str, Component]:
        return {"unet": diffusers_component("UNet2DModel"), "vqvae": diffusers_component("VQModel"),
                "reference": our_component(f"{NETWORKS}:ReferenceParts", f"{NETWORKS}:ReferenceConfig")}

    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        from diffsr.export.model.families import refsr_networks as nets

        self.signature(submodule)
        table: dict[str, tuple[tuple[str, ...], Callable[..., nn.Module]]] = {
            "lr_encoder": (("vqvae",), nets.LREncoder),
            "reference_encoder": (("vqvae", "reference"), nets.ReferenceEncoder),
            "reference_attention": (("reference",), nets.ReferenceAttention),
            "unet": (("unet",), nets.RefSRStep),
            "vq_decoder": (("vqvae",), nets.VQDecoder),
        }
        return table[submodule]

    def family_partial(self, submodule: str) -> bool:
        return submodule not in ("unet",)  # halves of the VQ autoencoder; parts of the reference folder

    def tokenizer_folders(self) -> dict[str, str]:
        return {}

    def tokenizer(self, path: Path) -> Callable[[list[str]], dict[str, Any]]:
        return lambda texts: {}  # no text conditioning

    def unet_config(self) -> dict[str, Any]:
        """LDM x4's UNet2DModel config at the preset's widths: the latent and the RGB LR photo in, the noise out."""
        c = self.config
        return dict(
            sample_size=c.native_latent, in_channels=c.latent_channels + 3, out_channels=c.latent_channels,
            down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in c.unet_attention],
            up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.unet_attention)],
            block_out_channels=list(c.unet_channels), layers_per_block=c.unet_layers_per_block,
            attention_head_dim=c.unet_head_dim, norm_num_groups=c.unet_norm_groups, norm_eps=1e-5, act_fn="silu",
            flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional", downsample_padding=1,
            mid_block_scale_factor=1)

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        import dataclasses

        from accelerate import init_empty_weights
        from diffusers import UNet2DModel, VQModel

        from diffsr.export.model.families.refsr_networks import ReferenceParts

        c = self.config
        with init_empty_weights(include_buffers=False):
            unet = UNet2DModel(**self.unet_config())
            vq = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(c.vq_channels),
                         up_block_types=("UpDecoderBlock2D",) * len(c.vq_channels), block_out_channels=c.vq_channels,
                         layers_per_block=c.vq_layers_per_block, latent_channels=c.latent_channels,
                         num_vq_embeddings=c.vq_codes, vq_embed_dim=c.latent_channels, norm_num_groups=c.vq_norm_groups,
                         sample_size=c.native_latent * self.latent_factor)
            reference = ReferenceParts(self.reference_config())
        return {"unet": (unet, diffusers_config(unet)), "vqvae": (vq, diffusers_config(vq)),
                "reference": (reference, dataclasses.asdict(reference.config))}

    def copy_source(self, folder: str, key: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
        copy, _, inner = key.partition(".")
        if folder == "reference" and copy in ("lr_encoder", "reference_encoder") and shapes["unet"].get(inner) == \
                shapes["reference"][key]:
            return f"unet/{inner}"  # the encoder copies start as the UNet's encoder
        return f"{folder}/{key}"

    def write_extras(self, out: Path) -> None:
        return None  # no tokenizer

    def family_draws(self) -> Mapping[str, Draw]:
        photo: Draw = lambda shape, g: torch.rand(shape, generator=g) * 2 - 1  # noqa: E731
        return {"timestep": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float(),
                "lr_image": photo, "references": photo}

    # --- a step ----------------------------------------------------------------------------

    def predict(self, run: RunFn, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        return run("unet", sample=x, timestep=row[:1].expand(x.shape[0]), lr_image=tiled["lr_image"],
                   reference_residuals=tiled["reference_residuals"])["noise_pred"]
