"""The DiT4SR family's networks (`dit4sr.py` declares the family): the PyTorch reference of its submodules.

    text_encoder    input_ids, input_ids_2 (B, 77)     -> clip_embeddings (B, 77, J), pooled_projections (B, P)
    t5_encoder      input_ids_3 (B, T)                 -> t5_embeddings (B, T, J)
    lr_encoder      lq_image (B, 3, 8h, 8w) in [-1, 1]  -> lr_latent (B, 16, h, w)
    transformer     sample (2B, 16, h, w), timestep (2B,), lr_latent (B, 16, h, w),
                    prompt_embeds (2B, 77 + T, J), pooled_projections (2B, P)  -> velocity (2B, 16, h, w)
    vae_decoder     latent (B, 16, h, w)               -> image (B, 3, 8h, 8w) in [-1, 1]

The transformer is SD3.5's MM-DiT (diffusers' `SD3Transformer2DModel`, whose modules it holds under the
same names) with DiT4SR's LR stream, as DiT4SR's official code (Duan et al., ICCV 2025) computes it:

- the LR latent goes through the same patch embedding and centre-cropped positional embedding; its
  tokens follow the noisy ones and share their AdaLN modulation, projections, norms and MLP;
- joint attention over [noisy, LR, text]: the LR queries and values are control projections applied to
  the shared ones' outputs (`to_q_control(to_q(lr))`); the LR keys are, as the official processor
  computes them, the noisy tokens' normalised keys normalised once more by `norm_k` (its `to_k_control`
  is then unused; without a key norm the keys are `to_k_control(to_k(lr))`); the LR output is
  `to_out_control(attention + the modulated LR input)`; the dual attention (`attn2`) likewise, without text;
- in the MLP, the LR tokens' activations (after the GELU), laid out on the token grid, go through a
  depthwise 3x3 convolution (`ff.control_conv`) and are added, x 1.2, to the noisy tokens' activations;
- the LR half is dropped after the last block.

Weights load under the official key names, dead ones included (`attn2`'s text projections, unused, are
in the published files). The official code asserts a square token grid; here the grid is the latent's
own (h/2, w/2), so any even latent shape works, with the same numbers on square ones. Without an LR
latent (`velocity(..., lr=None)`) the forward is SD3.5's, which the tests hold to diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.models.normalization import RMSNorm
from torch import nn
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from diffsr.export.model.families.sd_networks import _positions

CONTROL_FF_SCALE = 1.2  # the official code's weight of the LR stream's convolved MLP activations
CONTROLS = ("to_q_control", "to_k_control", "to_v_control", "to_out_control")


def _add_controls(attn: nn.Module, dim: int, with_text_projections: bool) -> None:
    for name in CONTROLS:
        setattr(attn, name, nn.Linear(dim, dim))
    if with_text_projections:  # the official attn2 is built with text projections it never uses
        for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            setattr(attn, name, nn.Linear(dim, dim))
        if attn.norm_q is not None:
            attn.norm_added_q = RMSNorm(dim // attn.heads, eps=1e-6)
            attn.norm_added_k = RMSNorm(dim // attn.heads, eps=1e-6)


class DiT4SRTransformer(nn.Module):
    """DiT4SR's transformer, built from a diffusers `SD3Transformer2DModel` config (the official `transformer/`
    folder's config.json)."""

    def __init__(self, config: dict):
        super().__init__()
        base = SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
        self.config = base.config
        self.pos_embed, self.time_text_embed = base.pos_embed, base.time_text_embed
        self.context_embedder, self.transformer_blocks = base.context_embedder, base.transformer_blocks
        self.norm_out, self.proj_out = base.norm_out, base.proj_out
        dim = base.inner_dim
        for block in self.transformer_blocks:
            _add_controls(block.attn, dim, with_text_projections=False)
            if block.attn2 is not None:
                _add_controls(block.attn2, dim, with_text_projections=True)
            width = block.ff.net[2].in_features
            block.ff.control_conv = nn.Conv2d(width, width, 3, padding=1, groups=width)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, lr_latent: torch.Tensor,
                prompt_embeds: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        lr = lr_latent.repeat(sample.shape[0] // lr_latent.shape[0], 1, 1, 1)  # both guidance branches see it
        return self.velocity(sample, timestep, prompt_embeds, pooled_projections, lr)

    def velocity(self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor,
                 pooled_projections: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = sample.shape
        p, channels = self.config.patch_size, self.config.out_channels
        grid = (h // p, w // p)
        x = _patch_embed(self.pos_embed, sample)  # (B, N, D): patches plus the centre-cropped positional embedding
        n = x.shape[1]
        temb = self.time_text_embed(timestep, pooled_projections)
        ctx: torch.Tensor | None = self.context_embedder(prompt_embeds)
        if lr is not None:
            x = torch.cat([x, _patch_embed(self.pos_embed, lr)], dim=1)  # [noisy, LR] tokens
        for block in self.transformer_blocks:
            ctx, x = _block(block, x, ctx, temb, grid, lr is not None)
        x = self.proj_out(self.norm_out(x[:, :n], temb))
        x = x.reshape(b, grid[0], grid[1], p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, channels, h, w)


def _patch_embed(embed: nn.Module, latent: torch.Tensor) -> torch.Tensor:
    """diffusers' `PatchEmbed` (SD3's: no norm, the positional grid centre-cropped to the latent's patches),
    the crop's corner computed on tensors: the slice arithmetic of the original, exported with symbolic
    sides, came out one row and column too large on odd patch counts."""
    p, m = embed.patch_size, embed.pos_embed_max_size
    gh, gw = latent.shape[-2] // p, latent.shape[-1] // p
    if gh > m or gw > m:
        raise ValueError(f"a latent of {gh}x{gw} patches exceeds the positional embedding's {m}x{m}")
    x = embed.proj(latent).flatten(2).transpose(1, 2)
    corner = torch.div(m - torch.arange(m + 1, device=latent.device), 2, rounding_mode="floor")  # per side length
    grid = embed.pos_embed.reshape(1, m, m, -1)
    rows = torch.arange(gh, device=latent.device) + corner[gh]
    cols = torch.arange(gw, device=latent.device) + corner[gw]
    return x + grid.index_select(1, rows).index_select(2, cols).reshape(1, gh * gw, -1)


def _block(block: nn.Module, x: torch.Tensor, ctx: torch.Tensor | None, temb: torch.Tensor, grid: tuple[int, int],
           with_lr: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One MM-DiT block (diffusers' `JointTransformerBlock` math) over the image tokens, LR ones included."""
    if block.use_dual_attention:
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = block.norm1(x, emb=temb)
    else:
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
    if block.context_pre_only:
        nctx = block.norm1_context(ctx, temb)
    else:
        nctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(ctx, emb=temb)
    out, ctx_out = _attention(block.attn, nx, nctx, with_lr)
    x = x + gate_msa.unsqueeze(1) * out
    if block.use_dual_attention:
        x = x + gate_msa2.unsqueeze(1) * _attention(block.attn2, nx2, None, with_lr)[0]
    nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    x = x + gate_mlp.unsqueeze(1) * _feed_forward(block.ff, nx, grid, with_lr)
    if block.context_pre_only:
        return None, x
    ctx = ctx + c_gate_msa.unsqueeze(1) * ctx_out
    nctx = block.norm2_context(ctx) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
    return ctx + c_gate_mlp.unsqueeze(1) * block.ff_context(nctx), x


def _attention(attn: nn.Module, x: torch.Tensor, ctx: torch.Tensor | None,
               with_lr: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Joint attention over [noisy, LR, text] tokens (diffusers' `JointAttnProcessor2_0` without the LR)."""
    b = x.shape[0]

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    half = x.shape[1] // 2
    xs, xc = (x[:, :half], x[:, half:]) if with_lr else (x, x)  # slices, not chunk: ONNX keeps them plain Slices
    q, k, v = heads(attn.to_q(xs)), heads(attn.to_k(xs)), heads(attn.to_v(xs))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    qs, ks, vs = [q], [k], [v]
    if with_lr:
        qc = heads(attn.to_q_control(attn.to_q(xc)))
        qs.append(attn.norm_q(qc) if attn.norm_q is not None else qc)
        ks.append(attn.norm_k(k) if attn.norm_k is not None else heads(attn.to_k_control(attn.to_k(xc))))
        vs.append(heads(attn.to_v_control(attn.to_v(xc))))
    if ctx is not None:
        qt, kt = heads(attn.add_q_proj(ctx)), heads(attn.add_k_proj(ctx))
        qs.append(attn.norm_added_q(qt) if attn.norm_added_q is not None else qt)
        ks.append(attn.norm_added_k(kt) if attn.norm_added_k is not None else kt)
        vs.append(heads(attn.add_v_proj(ctx)))
    o = F.scaled_dot_product_attention(torch.cat(qs, dim=2), torch.cat(ks, dim=2), torch.cat(vs, dim=2))
    o = o.transpose(1, 2).reshape(b, -1, x.shape[-1])
    img, txt = o[:, : x.shape[1]], o[:, x.shape[1]:]
    if with_lr:
        noisy, lr = img[:, :half], img[:, half:]
        img = torch.cat([attn.to_out[0](noisy), attn.to_out_control(lr + xc)], dim=1)
    else:
        img = attn.to_out[0](img)
    if ctx is None:
        return img, None
    return img, (txt if attn.context_pre_only else attn.to_add_out(txt))


def _feed_forward(ff: nn.Module, x: torch.Tensor, grid: tuple[int, int], with_lr: bool) -> torch.Tensor:
    """The shared MLP; the LR tokens' activations, as an image on the token grid, convolved into the noisy ones'."""
    a = ff.net[1](ff.net[0](x))  # GELU(tanh) projection, dropout
    if with_lr:
        half = a.shape[1] // 2
        noisy, lr = a[:, :half], a[:, half:]
        image = lr.transpose(1, 2).reshape(a.shape[0], a.shape[-1], *grid)
        noisy = noisy + CONTROL_FF_SCALE * ff.control_conv(image).flatten(2).transpose(1, 2)
        a = torch.cat([noisy, lr], dim=1)
    for layer in ff.net[2:]:
        a = layer(a)
    return a


# --- wrappers that give the standard parts the signatures' interfaces --------------------------------


class ClipTextEncoders(nn.Module):
    """CLIP-L and CLIP-G (both with projection): penultimate states side by side, zero-padded to the joint
    attention width; their pooled, projected outputs side by side (SD3's text conditioning, its CLIP part)."""

    def __init__(self, text_encoder: CLIPTextModelWithProjection, text_encoder_2: CLIPTextModelWithProjection,
                 joint_dim: int):
        super().__init__()
        self.text_encoder, self.text_encoder_2, self.joint_dim = text_encoder, text_encoder_2, joint_dim

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [enc(ids.long(), position_ids=_positions(ids), output_hidden_states=True)
                for enc, ids in ((self.text_encoder, input_ids), (self.text_encoder_2, input_ids_2))]
        states = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
        states = F.pad(states, (0, self.joint_dim - states.shape[-1]))
        return states, torch.cat([o.text_embeds for o in outs], dim=-1)


class T5Encoder(nn.Module):
    """T5's last hidden states (SD3's third text encoder; its own graph: 4.7 B parameters at full size)."""

    def __init__(self, text_encoder_3: T5EncoderModel):
        super().__init__()
        self.text_encoder_3 = text_encoder_3

    def forward(self, input_ids_3: torch.Tensor) -> torch.Tensor:
        return self.text_encoder_3(input_ids_3.long()).last_hidden_state


class LatentEncoder(nn.Module):
    """image in [-1, 1] -> the VAE posterior's mean, shifted and scaled as the transformer sees latents
    ((mean - shift_factor) * scaling_factor): never a sample inside a graph."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder, self.quant_conv = vae.encoder, vae.quant_conv or nn.Identity()
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)

    def forward(self, lq_image: torch.Tensor) -> torch.Tensor:
        mean = self.quant_conv(self.encoder(lq_image)).chunk(2, dim=1)[0]
        return (mean - self.shift_factor) * self.scaling_factor
