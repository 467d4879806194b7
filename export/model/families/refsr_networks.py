"""The `refsr` family's networks: LDM x4 (diffusers' `UNet2DModel` on the latent with the LR photo beside it, a
`VQModel` of factor 4) and the reference parts of the `reference/` folder, as the graphs run them.

    LREncoder           the LR photo (at the latent's sides) -> bicubic x the VQ factor -> the VQ encoder: z_lq
    ReferenceEncoder    reference photos -> the VQ encoder -> the reference copy of the UNet's encoder -> each decoder
                        level's keys and values, flattened into one row per reference
    ReferenceAttention  z_lq -> the LR copy of the UNet's encoder -> at each decoder level, queries that attend to each
                        reference's keys and values separately; the results aggregated (mean) and projected to that
                        decoder level's width, held at the latent's sides (nearest): one residual tensor
    RefSRStep           diffusers' UNet2DModel forward on [latent, LR photo], each up block's output plus its level's
                        residual (average-pooled back to the level's sides)
    VQDecoder           latent -> the nearest codebook entry per cell (VQModel.decode's quantisation) -> the decoder

Decoder level i (the UNet's i-th up block) leaves the UNet at encoder level `decoder_levels(n)[i]` (its sides halved
that many times); the copies' features at that level are its queries (LR) and keys and values (references).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.export.core.errors import DiffsrError

AGGREGATIONS = ("mean", "sum")  # both independent of the references' order


def decoder_levels(levels: int) -> tuple[int, ...]:
    """The encoder level each up block's output is at: every up block but the last upsamples once."""
    return tuple(max(levels - 2 - i, 0) for i in range(levels))


@dataclass(frozen=True)
class ReferenceConfig:
    """The `reference/` folder's config.json: the UNet's encoder settings its two copies are built with (the UNet's
    own, but for the input: the VQ latent's channels), the references' side, and the aggregation over references."""

    in_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    layers_per_block: int
    norm_num_groups: int
    attention_head_dim: int
    reference_side: int  # pixels: each reference is resized to this square before the VQ encoder
    vq_factor: int  # the VQ autoencoder's pixels per latent cell
    norm_eps: float = 1e-5
    act_fn: str = "silu"
    downsample_padding: int = 1
    aggregation: str = "mean"

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise DiffsrError(f"reference aggregation {self.aggregation!r} is not one of {list(AGGREGATIONS)}")
        if self.reference_side % (self.vq_factor * 2 ** (len(self.block_out_channels) - 2)):
            raise DiffsrError(f"reference_side {self.reference_side} must divide by the VQ factor times the copies' "
                              "halvings")
        if any(c % self.attention_head_dim for c in self.block_out_channels):
            raise DiffsrError(f"widths {self.block_out_channels} must divide by attention_head_dim "
                              f"{self.attention_head_dim}")

    @property
    def levels(self) -> tuple[int, ...]:
        return decoder_levels(len(self.block_out_channels))

    def widths(self) -> tuple[int, ...]:
        """Each decoder level's output width (the UNet's up blocks')."""
        return tuple(reversed(self.block_out_channels))

    def tokens(self) -> tuple[int, ...]:
        """A reference's positions at each decoder level."""
        side = self.reference_side // self.vq_factor
        return tuple((side >> level) ** 2 for level in self.levels)

    def row(self) -> int:
        """A reference's flattened keys and values: at each decoder level, positions x its encoder level's width, twice."""
        return sum(2 * m * self.block_out_channels[level] for m, level in zip(self.tokens(), self.levels))


class EncoderCopy(nn.Module):
    """A copy of the UNet's encoder without its time embedding (the copies do not see t): its input conv and its down
    blocks up to the deepest level a decoder level reads; forward gives each level's features (before downsampling)."""

    def __init__(self, cfg: ReferenceConfig):
        from diffusers.models.unets.unet_2d_blocks import get_down_block

        super().__init__()
        ch, deepest = cfg.block_out_channels, max(cfg.levels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList(
            get_down_block(cfg.down_block_types[i], num_layers=cfg.layers_per_block, in_channels=ch[max(i - 1, 0)],
                           out_channels=ch[i], temb_channels=None, add_downsample=i < deepest, resnet_eps=cfg.norm_eps,
                           resnet_act_fn=cfg.act_fn, resnet_groups=cfg.norm_num_groups,
                           attention_head_dim=cfg.attention_head_dim, downsample_padding=cfg.downsample_padding)
            for i in range(deepest + 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, levels = self.conv_in(x), []
        for block in self.down_blocks:
            h, states = block(hidden_states=h, temb=None)
            levels.append(states[len(block.resnets) - 1])  # the last resnet's (and attention's) output
        return levels


class LevelAttention(nn.Module):
    """One decoder level's cross-attention: queries from the LR features, keys and values from one reference's, per
    reference; multi-head, `head_dim` channels a head. The queries go in `bands` bands of rows, one after the other
    (the result is the same: each query attends alone), so that where a backend does not fuse attention (ONNX
    Runtime) the scores it holds at once are a band's, not the whole tile's."""

    def __init__(self, channels: int, out_channels: int, head_dim: int, groups: int, eps: float, bands: int = 1):
        super().__init__()
        self.heads, self.bands = channels // head_dim, bands
        self.norm_query = nn.GroupNorm(groups, channels, eps=eps)
        self.norm_reference = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.Linear(channels, out_channels)

    def keys_values(self, features: torch.Tensor) -> torch.Tensor:
        """(R, C, H, W) -> (R, 2 * H * W * C): the keys, then the values, flattened."""
        tokens = self.norm_reference(features).flatten(2).transpose(1, 2)
        return torch.cat([self.to_k(tokens).flatten(1), self.to_v(tokens).flatten(1)], dim=1)

    def forward(self, features: torch.Tensor, keys_values: torch.Tensor, aggregation: str) -> torch.Tensor:
        """(B, C, H, W) LR features, (R, 2 * M * C) -> (B, out, H, W): each reference attended to alone, the R results
        aggregated."""
        b, c, h, w = features.shape
        r, d = keys_values.shape[0], c // self.heads
        q = self.to_q(self.norm_query(features).flatten(2).transpose(1, 2))  # (B, N, C), row after row
        k, v = keys_values.view(r, 2, -1, self.heads, d).transpose(2, 3).unbind(1)  # (R, heads, M, d) each
        m = k.shape[2]
        k, v = (t.unsqueeze(0).expand(b, r, self.heads, m, d).reshape(b * r, self.heads, m, d) for t in (k, v))
        bands = q.view(b, self.bands, -1, self.heads, d)  # h divides by `bands`: whole rows in each band
        out = []
        for i in range(self.bands):
            n = bands.shape[2]
            part = bands[:, i].view(b, 1, n, self.heads, d).transpose(2, 3).expand(b, r, self.heads, n, d)
            attended = F.scaled_dot_product_attention(part.reshape(b * r, self.heads, n, d), k, v)
            out.append(attended.view(b, r, self.heads, n, d).sum(1))
        summed = torch.cat(out, dim=2)  # (B, heads, N, d)
        if aggregation == "mean":
            summed = summed / max(r, 1)  # no reference: nothing to add
        result = self.to_out(summed.transpose(1, 2).reshape(b, h * w, c))
        return result.transpose(1, 2).reshape(b, -1, h, w)


class ReferenceParts(nn.Module):
    """The `reference/` folder: the LR copy and the reference copy of the UNet's encoder, one attention per decoder
    level."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.config = cfg
        self.lr_encoder, self.reference_encoder = EncoderCopy(cfg), EncoderCopy(cfg)
        ch, deepest = cfg.block_out_channels, len(cfg.block_out_channels) - 1
        # a latent side divides by 2 ** deepest cells, so a level's rows divide by 2 ** (deepest - level): its bands
        self.attentions = nn.ModuleList(
            LevelAttention(ch[level], width, cfg.attention_head_dim, cfg.norm_num_groups, cfg.norm_eps,
                           bands=2 ** (deepest - level))
            for level, width in zip(cfg.levels, cfg.widths()))


class LREncoder(nn.Module):
    """The LR photo at the latent's sides -> bicubic to the VQ autoencoder's input size -> its encoder: z_lq (the
    LR copy's input, and the sampler's start where it starts from the photo)."""

    def __init__(self, vqvae: Any):
        super().__init__()
        self.vqvae = nn.Module()
        self.vqvae.encoder, self.vqvae.quant_conv = vqvae.encoder, vqvae.quant_conv
        self.factor = 2 ** (len(vqvae.config.block_out_channels) - 1)

    def forward(self, lr_image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(lr_image, scale_factor=self.factor, mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
        return self.vqvae.quant_conv(self.vqvae.encoder(x))


class ReferenceEncoder(nn.Module):
    """references (R, 3, S, S) in [-1, 1] -> (R, row): the VQ encoder, the reference copy, each decoder level's keys
    and values (its attention's projections), concatenated in level order."""

    def __init__(self, vqvae: Any, reference: ReferenceParts):
        super().__init__()
        self.vqvae = nn.Module()  # the VQ encoder alone: references are at their own side
        self.vqvae.encoder, self.vqvae.quant_conv = vqvae.encoder, vqvae.quant_conv
        self.reference = nn.Module()
        self.reference.reference_encoder, self.reference.attentions = reference.reference_encoder, reference.attentions
        self.levels = reference.config.levels

    def forward(self, references: torch.Tensor) -> torch.Tensor:
        features = self.reference.reference_encoder(self.vqvae.quant_conv(self.vqvae.encoder(references)))
        return torch.cat([a.keys_values(features[level]) for a, level in zip(self.reference.attentions, self.levels)], 1)


class ReferenceAttention(nn.Module):
    """z_lq (B, C, h, w) and the references' rows -> (B, sum of the decoder widths, h, w): each decoder level's
    aggregated attention output, nearest-upsampled to the latent's sides (so that it tiles with the latent), in level
    order."""

    def __init__(self, reference: ReferenceParts):
        super().__init__()
        self.reference = nn.Module()
        self.reference.lr_encoder, self.reference.attentions = reference.lr_encoder, reference.attentions
        cfg = reference.config
        self.levels, self.aggregation = cfg.levels, cfg.aggregation
        self.splits = [2 * m * cfg.block_out_channels[level] for m, level in zip(cfg.tokens(), cfg.levels)]

    def forward(self, z_lq: torch.Tensor, reference_kv: torch.Tensor) -> torch.Tensor:
        features = self.reference.lr_encoder(z_lq)
        rows = reference_kv.split(self.splits, dim=1)
        out = [F.interpolate(a(features[level], kv, self.aggregation), scale_factor=2**level, mode="nearest")
               if level else a(features[level], kv, self.aggregation)
               for a, kv, level in zip(self.reference.attentions, rows, self.levels)]
        return torch.cat(out, 1)


class RefSRStep(nn.Module):
    """diffusers' `UNet2DModel.forward` on the latent with the LR photo concatenated after it (LDM x4's input), each up
    block's output plus its level's reference residual. With zero residuals it is the UNet's own forward."""

    def __init__(self, unet: Any):
        super().__init__()
        c = unet.config
        unsupported = {"time_embedding_type": c.time_embedding_type != "positional",
                       "class_embed_type": c.class_embed_type is not None, "center_input_sample": c.center_input_sample,
                       "skip blocks": any(t.startswith("Skip") for t in (*c.down_block_types, *c.up_block_types))}
        if any(unsupported.values()):
            raise DiffsrError(f"refsr's UNet2DModel: {[k for k, v in unsupported.items() if v]} are not supported "
                              "(LDM x4's UNet has none)")
        self.unet = unet
        self.levels = decoder_levels(len(c.block_out_channels))
        self.widths = list(reversed(c.block_out_channels))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, lr_image: torch.Tensor,
                reference_residuals: torch.Tensor) -> torch.Tensor:
        u = self.unet
        emb = u.time_embedding(u.time_proj(timestep).to(sample.dtype))
        h = u.conv_in(torch.cat([sample, lr_image], dim=1))
        skips: tuple[torch.Tensor, ...] = (h,)
        for block in u.down_blocks:
            h, states = block(hidden_states=h, temb=emb)
            skips += states
        if u.mid_block is not None:
            h = u.mid_block(h, emb)
        residuals = reference_residuals.split(self.widths, dim=1)
        for block, residual, level in zip(u.up_blocks, residuals, self.levels):
            n = len(block.resnets)
            h = block(h, skips[-n:], emb)
            skips = skips[:-n]
            h = h + (F.avg_pool2d(residual, 2**level) if level else residual)
        return u.conv_out(u.conv_act(u.conv_norm_out(h)))


class VQDecoder(nn.Module):
    """latent -> image in [-1, 1]: each cell replaced by its nearest codebook entry (`VQModel.decode`'s quantisation,
    as squared distances), then the post-quant conv and the decoder."""

    def __init__(self, vqvae: Any):
        super().__init__()
        self.vqvae = nn.Module()
        self.vqvae.quantize, self.vqvae.post_quant_conv = nn.Module(), vqvae.post_quant_conv
        self.vqvae.quantize.embedding, self.vqvae.decoder = vqvae.quantize.embedding, vqvae.decoder

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        codes = self.vqvae.quantize.embedding.weight  # (K, C)
        z = latent.permute(0, 2, 3, 1)
        distance = (codes * codes).sum(1) - 2 * z @ codes.t()  # |z - e|^2 less |z|^2, the same for every code
        quantized = F.embedding(distance.argmin(-1), codes).permute(0, 3, 1, 2)
        return self.vqvae.decoder(self.vqvae.post_quant_conv(quantized)).clamp(-1.0, 1.0)
