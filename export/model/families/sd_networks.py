"""The SD family's networks (`sd.py` declares the family): the PyTorch reference of its five submodules.

    text_encoder        input_ids (B, 77)                     -> text_embeddings (B, 77, D)
      SDXL              + input_ids_2 (B, 77)                 -> D = 768 + 1280, + text_embeds (B, 1280)
    lq_encoder          lq_image (B, 3, 8h, 8w) in [-1, 1]     -> f1 (B, C1, h, w), z_lq (B, 4, h, w)
    fusion_transformer  f1, sample x_t (B, 4, h, w)           -> f2 (B, C2, h, w)
    controlnet_unet     sample (2B, 4, h, w), timestep (2B,),
                        text_embeddings (2B, 77, D), f2 (B, ..) -> noise_pred (2B, 4, h, w)
      SDXL              + text_embeds (2B, 1280), time_ids (2B, 6), before f2
    vae_decoder         latent (B, 4, h, w)                   -> image (B, 3, 8h, 8w) in [-1, 1]

Each `forward` takes exactly the signature's inputs in order and returns its outputs, so a module
exports to ONNX as it stands. diffusers and transformers supply the standard parts (VAE, UNet,
ControlNet, CLIP); the multi-layer LQ fusion and the fusion transformer are ours, below.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from diffusers.models.autoencoders.vae import Encoder
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection


class Attention(nn.Module):
    """Multi-head self-attention over the token axis of (N, T, C)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, C/heads)
        return self.out(y.transpose(1, 2).reshape(n, t, c))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention + MLP, the GPT-2 block."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --- multi-layer VAE LQ encoder ------------------------------------------------------------------


@dataclass(frozen=True)
class LQEncoderConfig:
    vae_channels: tuple[int, ...]
    layers_per_block: int
    norm_groups: int
    f1_channels: int
    heads: int
    scaling_factor: float
    latent_channels: int = 4


class LQEncoder(nn.Module):
    """The SD VAE encoder, read at three depths and fused across scales into f1; plus z_lq.

    The first three down blocks end at 1/2, 1/4 and 1/8 of the image (shallow: edges and texture;
    middle: structure; deep: semantics; a factor-4 VAE's third block stays at 1/4). Each is average-pooled
    to latent resolution and projected
    to f1_channels; at every latent cell the three scale tokens attend to each other, and their mean
    is f1. z_lq is the mean of the latent distribution times the scaling factor: never a sample.
    """

    def __init__(self, cfg: LQEncoderConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(
            in_channels=3, out_channels=cfg.latent_channels, down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            block_out_channels=cfg.vae_channels, layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_groups, double_z=True,
        )
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.proj = nn.ModuleList(nn.Conv2d(c, cfg.f1_channels, 1) for c in cfg.vae_channels[:3])
        self.scale_embedding = nn.Parameter(torch.zeros(3, cfg.f1_channels))
        self.norm = nn.LayerNorm(cfg.f1_channels)
        self.attn = Attention(cfg.f1_channels, cfg.heads)
        self.proj_out = nn.Linear(cfg.f1_channels, cfg.f1_channels)

    def pools(self) -> list[int]:
        """The average-pool that brings each of the first three taps to latent resolution: every block
        but the last halves the image."""
        blocks = len(self.config.vae_channels)
        return [2 ** (blocks - 1) // 2 ** min(i + 1, blocks - 1) for i in range(3)]

    def forward(self, lq_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.encoder
        x = enc.conv_in(lq_image)
        taps = []
        for block in enc.down_blocks:
            x = block(x)
            taps.append(x)  # (B, C_i, H/2^(i+1), W/2^(i+1)) for the first three
        x = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(x))))
        mean = self.quant_conv(x)[:, : self.config.latent_channels]  # (B, C, h, w): the distribution's mean
        z_lq = mean * self.config.scaling_factor

        b, _, h, w = z_lq.shape
        scales = [
            proj(F.avg_pool2d(tap, pool) if pool > 1 else tap)  # (B, C1, h, w)
            for proj, tap, pool in zip(self.proj, taps[:3], self.pools())
        ]
        tokens = torch.stack(scales, 1).permute(0, 3, 4, 1, 2).reshape(b * h * w, 3, -1)  # (Bhw, 3, C1)
        tokens = tokens + self.scale_embedding
        tokens = tokens + self.attn(self.norm(tokens))
        f1 = self.proj_out(tokens.mean(1))  # (Bhw, C1)
        return f1.view(b, h, w, -1).permute(0, 3, 1, 2), z_lq


# --- fusion transformer --------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionConfig:
    f1_channels: int
    width: int
    heads: int
    blocks: int
    latent_channels: int = 4


class FusionTransformer(nn.Module):
    """f1 and the noisy latent x_t -> f2, the control feature of this step.

    Light convs bring both to one width; concatenated, they become h*w tokens that two transformer
    blocks mix. No positional embedding: the convs give locality, and any latent size works.
    """

    def __init__(self, cfg: FusionConfig):
        super().__init__()
        self.config = cfg
        self.align_f1 = nn.Conv2d(cfg.f1_channels, cfg.width, 3, padding=1)
        self.align_x = nn.Conv2d(cfg.latent_channels, cfg.width, 3, padding=1)
        self.proj_in = nn.Linear(2 * cfg.width, cfg.width)
        self.blocks = nn.ModuleList(TransformerBlock(cfg.width, cfg.heads) for _ in range(cfg.blocks))
        self.norm_out = nn.LayerNorm(cfg.width)
        self.proj_out = nn.Linear(cfg.width, cfg.width)

    def forward(self, f1: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        b, _, h, w = sample.shape
        x = torch.cat([self.align_f1(f1), self.align_x(sample)], 1)  # (B, 2W, h, w)
        x = self.proj_in(x.flatten(2).transpose(1, 2))  # (B, hw, W)
        for block in self.blocks:
            x = block(x)
        x = self.proj_out(self.norm_out(x))
        return x.transpose(1, 2).reshape(b, -1, h, w)  # (B, C2, h, w)


# --- wrappers that give the standard parts the signatures' interfaces -----------------------------


# Wrappers hold their components under the checkpoint's folder names (text_encoder, controlnet, ...), so
# a parameter's name in the wrapper says where its weights are stored (see checkpoint.weight_source).


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    """0..76 computed in the graph, rather than read from CLIP's non-persistent buffer (which a model
    traced with fake weights would need a value for)."""
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)


class TextEncoder(nn.Module):
    """SD: CLIP's last hidden states. SDXL (with `text_encoder_2`): the penultimate hidden states of
    CLIP-L and OpenCLIP bigG concatenated, and bigG's pooled, projected output as `text_embeds`."""

    def __init__(self, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection | None = None):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None):
        ids = input_ids.long()
        if self.text_encoder_2 is None:
            return self.text_encoder(ids, position_ids=_positions(ids)).last_hidden_state  # (B, 77, D)
        if input_ids_2 is None:
            raise ValueError("SDXL's text encoder takes input_ids_2 (the second tokenizer's ids)")
        ids_2 = input_ids_2.long()
        first = self.text_encoder(ids, position_ids=_positions(ids), output_hidden_states=True)
        second = self.text_encoder_2(ids_2, position_ids=_positions(ids_2), output_hidden_states=True)
        states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (B, 77, 768 + 1280)
        return states, second.text_embeds  # (B, 1280): pooled at the end token, projected


class ControlNetUNet(nn.Module):
    """ControlNet residuals added into the UNet: one network per denoising step.

    f2 enters the ControlNet at latent resolution through its conditioning embedding, configured
    with a single width (conv, SiLU, zero-initialised conv: no pixel-space downsampling). With CFG the
    latent batch is doubled (negative, positive) and f2 is shared, so it is repeated to match.
    """

    def __init__(self, controlnet: ControlNetModel, unet: UNet2DConditionModel):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor, f2: torch.Tensor
    ) -> torch.Tensor:
        return self.predict(sample, timestep, text_embeddings, f2, None)

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor, f2: torch.Tensor,
                added: dict[str, torch.Tensor] | None) -> torch.Tensor:
        control = f2.repeat(sample.shape[0] // f2.shape[0], 1, 1, 1)  # (2B, C2, h, w)
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=text_embeddings, controlnet_cond=control,
            added_cond_kwargs=added, return_dict=False,
        )
        return self.unet(
            sample, timestep, encoder_hidden_states=text_embeddings, added_cond_kwargs=added,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False,
        )[0]


class ControlNetUNetXL(ControlNetUNet):
    """SDXL: the pooled text (`text_embeds`) and the size micro-conditioning (`time_ids`) reach both
    networks' "text_time" embedding. time_ids are a graph input, computed by the pipeline per image
    (and per tile), never constants of the graph."""

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor, text_embeds: torch.Tensor,
        time_ids: torch.Tensor, f2: torch.Tensor,
    ) -> torch.Tensor:
        return self.predict(sample, timestep, text_embeddings, f2, {"text_embeds": text_embeds, "time_ids": time_ids})


class VAEDecoder(nn.Module):
    """latent -> image in [-1, 1]: the latent unscaled and unshifted as the VAE's config says (diffusers:
    latent / scaling_factor + shift_factor; SD's shift is none, SD3's 0.0609), then the decoder half of the
    VAE (its post-quant conv where it has one)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.post_quant_conv, self.decoder = vae.post_quant_conv or nn.Identity(), vae.decoder
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.post_quant_conv(latent / self.scaling_factor + self.shift_factor)
        return self.decoder(x).clamp(-1.0, 1.0)


def config_to_json(cfg: LQEncoderConfig | FusionConfig) -> dict:
    return {"_class_name": type(cfg).__name__, **dataclasses.asdict(cfg)}
