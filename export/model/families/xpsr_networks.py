"""XPSR's networks (Qu et al., ECCV 2024; github qyp2000/XPSR, `models/xpsr/`), rebuilt from diffusers' blocks
under the official module names, so the release's `controlnet/` and `unet/` folders load as they stand and the
official classes load a folder `diffsr init` writes.

    ControlNet  SD's ControlNet with semantic-fusion attention in its cross-attention down blocks and its mid
                block: after each resnet, the block's text attention (`attentions`) on the high-level prompt and a
                second (`attentions_lowlevel`) on the low-level prompt, both on the resnet's output, then
                `attentions_connect`: the first's output attends to the second's H*W pixels. Its conditioning
                embedding (`controlnet_cond_embedding`: a 3x3 conv, SiLU, pairs of convs the second strided, each
                SiLU, a 3x3 conv out) takes the x4-upsampled photo in [0, 1] at 8x the latent. Its outputs: the
                12 (SD-1.5) zero-conv residuals and the mid one, times `conditioning_scale`.
    UNet        SD-1.5's UNet whose every up-block layer ends in a pixel attention (`pixel_attentions`): the
                layer's output attends to the ControlNet residual of its skip connection (the same index),
                flattened to (H*W, C); the skips and the mid block take the residuals additively, as SD's.

Heads the release holds but inference never reads are built and loaded, and left out of every graph: the
conditioning embedding's `to_rgbs` and the ControlNet's `conv_degradation*` (training's degradation-free
constraint).

Configs: each network's config.json holds the official class's own `__init__` arguments (`CONTROLNET_ARGS`,
`UNET_ARGS`: diffusers 0.21's and XPSR's four, with their defaults), nothing else. What this runtime does not
build (an RRDB preprocesser, class or addition embeddings, low-level prompts in the UNet) is refused by name.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, Transformer2DModel, UNet2DConditionModel
from torch import nn

from diffsr.export.core.errors import DiffsrError

XPSR_CONTROLNET_DEFAULTS = {"return_rgbs": True, "use_rrdb": False, "use_lowlevel_prompt": True, "use_latent_pred": True}
XPSR_UNET_DEFAULTS = {"up_use_lowlevel_prompt": [False, False, False, False], "mid_use_lowlevel_prompt": False,
                      "down_use_lowlevel_prompt": False}
# diffusers 0.21's arguments (the release's: requirements.txt pins diffusers 0.21.4); 0.42's defaults are the same
CONTROLNET_021 = (
    "in_channels", "conditioning_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "only_cross_attention",
    "block_out_channels", "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "controlnet_conditioning_channel_order",
    "conditioning_embedding_out_channels", "global_pool_conditions", "addition_embed_type_num_heads")
UNET_021 = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "cross_attention_dim", "transformer_layers_per_block", "encoder_hid_dim", "encoder_hid_dim_type",
    "attention_head_dim", "num_attention_heads", "dual_cross_attention", "use_linear_projection", "class_embed_type",
    "addition_embed_type", "addition_time_embed_dim", "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "resnet_skip_time_act", "resnet_out_scale_factor", "time_embedding_type", "time_embedding_dim",
    "time_embedding_act_fn", "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel",
    "projection_class_embeddings_input_dim", "attention_type", "class_embeddings_concat",
    "mid_block_only_cross_attention", "cross_attention_norm", "addition_embed_type_num_heads")


def _defaults(cls: Any, names: tuple[str, ...], extra: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {name: params[name].default for name in names} | extra


CONTROLNET_ARGS = _defaults(ControlNetModel, CONTROLNET_021, XPSR_CONTROLNET_DEFAULTS)
UNET_ARGS = _defaults(UNet2DConditionModel, UNET_021, XPSR_UNET_DEFAULTS)


def official_config(config: dict[str, Any], args: dict[str, Any], what: str) -> dict[str, Any]:
    """A config.json read as the official class reads it: its keys only (diffusers' private ones ignored), the rest
    at their defaults."""
    unknown = sorted(k for k in config if k not in args and not k.startswith("_"))
    if unknown:
        raise DiffsrError(f"{what}: keys {unknown} are no argument of the official class; it takes {sorted(args)}")
    return args | {k: v for k, v in config.items() if k in args}


def _refuse(config: dict[str, Any], what: str, **supported: Any) -> None:
    for key, value in supported.items():
        got = config[key]
        if (list(got) if isinstance(got, tuple) else got) != value:
            raise DiffsrError(f"{what}: {key}={got!r} is not supported by diffsr's XPSR (it builds {key}={value!r})")


def _like(attn: Transformer2DModel, cross_attention_dim: int) -> Transformer2DModel:
    """A transformer with `attn`'s hyper-parameters but another width of the states it attends to."""
    return Transformer2DModel(**{k: v for k, v in attn.config.items() if not k.startswith("_")}
                              | {"cross_attention_dim": cross_attention_dim})


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C): a feature map as tokens, row by row."""
    return t.flatten(2).transpose(1, 2)


class ConditioningEmbedding(nn.Module):
    """`controlnet_cond_embedding`: the photo in [0, 1] -> (B, C, h, w) at latent resolution."""

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...], return_rgbs: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()  # training's supervision of each scale: loaded, never run
        for cin, cout in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(cin, cin, 3, padding=1))
            self.blocks.append(nn.Conv2d(cin, cout, 3, padding=1, stride=2))
            if return_rgbs:
                self.to_rgbs.append(nn.Conv2d(cout, 3, 3, padding=1))
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.conv_in(image))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class XPSRControlNet(nn.Module):
    """The official `ControlNetModel` of `models/xpsr/controlnet.py`, from its config.json's arguments."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        c = self.config = official_config(config, CONTROLNET_ARGS, "XPSR controlnet config")
        _refuse(c, "XPSR controlnet config", use_rrdb=False, use_lowlevel_prompt=True, class_embed_type=None,
                addition_embed_type=None, encoder_hid_dim=None, controlnet_conditioning_channel_order="rgb",
                global_pool_conditions=False)
        base = ControlNetModel(**{k: c[k] for k in CONTROLNET_021})
        for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "controlnet_down_blocks",
                     "controlnet_mid_block"):
            setattr(self, name, getattr(base, name))
        self.controlnet_cond_embedding = ConditioningEmbedding(c["conditioning_channels"], c["block_out_channels"][0],
                                                               tuple(c["conditioning_embedding_out_channels"]),
                                                               c["return_rgbs"])
        # 2. semantic-fusion attention beside each text attention: the low-level prompt's, and the fusing one
        for block in [*self.down_blocks, self.mid_block]:
            if getattr(block, "attentions", None) is not None:
                block.attentions_lowlevel = nn.ModuleList(_like(a, a.config.cross_attention_dim) for a in block.attentions)
                block.attentions_connect = nn.ModuleList(_like(a, a.config.in_channels) for a in block.attentions)
        if c["use_latent_pred"]:  # training's degradation-free latent predictions: loaded, never run
            widths = [zc.in_channels for zc in self.controlnet_down_blocks]
            latent = c["in_channels"]
            self.conv_degradation = nn.ModuleList(nn.Sequential(nn.Conv2d(w, latent, 3, padding=1)) for w in widths)
            self.conv_degradation_mid = nn.Sequential(nn.Conv2d(self.controlnet_mid_block.in_channels, latent, 3,
                                                                padding=1))

    def embed_time(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.time_embedding(self.time_proj(timestep.expand(sample.shape[0])).to(sample.dtype))

    def _fused(self, block: nn.Module, j: int, h: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """Semantic fusion: both prompts' attentions on the resnet's output, then the high-level one's output
        attending to the low-level one's pixels."""
        hh = block.attentions[j](h, encoder_hidden_states=high, return_dict=False)[0]
        hl = block.attentions_lowlevel[j](h, encoder_hidden_states=low, return_dict=False)[0]
        return block.attentions_connect[j](hh, encoder_hidden_states=as_tokens(hl), return_dict=False)[0]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, high: torch.Tensor, low: torch.Tensor,
                cond_embedding: torch.Tensor, conditioning_scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(down residuals, mid residual). `cond_embedding` is `controlnet_cond_embedding` of the photo (computed
        once per request: it does not depend on t), shared by the guided rows."""
        emb = self.embed_time(sample, timestep)
        h = self.conv_in(sample) + cond_embedding.repeat(sample.shape[0] // cond_embedding.shape[0], 1, 1, 1)
        residuals = [h]
        for block in self.down_blocks:
            if getattr(block, "attentions", None) is None:
                h, more = block(h, emb)
                residuals += list(more)
                continue
            for j, resnet in enumerate(block.resnets):
                h = self._fused(block, j, resnet(h, emb), high, low)
                residuals.append(h)
            for down in block.downsamplers or []:
                h = down(h)
                residuals.append(h)
        mid = self.mid_block
        h = mid.resnets[0](h, emb)
        for j, resnet in enumerate(mid.resnets[1:]):
            h = resnet(self._fused(mid, j, h, high, low), emb)
        down = [zc(r) * conditioning_scale for zc, r in zip(self.controlnet_down_blocks, residuals)]
        return down, self.controlnet_mid_block(h) * conditioning_scale


class XPSRUNet(nn.Module):
    """The official `UNet2DConditionModel` of `models/xpsr/unet_2d_condition.py`, from its config.json's arguments:
    SD's, with a pixel attention after every up-block layer."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        c = self.config = official_config(config, UNET_ARGS, "XPSR unet config")
        _refuse(c, "XPSR unet config", down_use_lowlevel_prompt=False, mid_use_lowlevel_prompt=False,
                up_use_lowlevel_prompt=[False] * len(c["block_out_channels"]), class_embed_type=None,
                addition_embed_type=None, encoder_hid_dim=None, time_cond_proj_dim=None, transformer_layers_per_block=1)
        base = UNet2DConditionModel(**{k: c[k] for k in UNET_021})
        for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "up_blocks",
                     "conv_norm_out", "conv_act", "conv_out"):
            setattr(self, name, getattr(base, name))
        heads = c["num_attention_heads"] or c["attention_head_dim"]
        heads = list(heads)[::-1] if isinstance(heads, (list, tuple)) else [heads] * len(self.up_blocks)
        widths = list(c["block_out_channels"])[::-1]
        for i, block in enumerate(self.up_blocks):
            out, skip_in = widths[i], widths[min(i + 1, len(widths) - 1)]
            n = len(block.resnets)
            if getattr(block, "attentions", None) is not None:  # cross-attention blocks: the skip's width
                dims = [out if j < n - 1 else skip_in for j in range(n)]
                block.pixel_attentions = nn.ModuleList(_like(a, d) for a, d in zip(block.attentions, dims))
            else:  # the official UpBlock2D: its own width
                block.pixel_attentions = nn.ModuleList(
                    Transformer2DModel(heads[i], out // heads[i], in_channels=out, num_layers=1, cross_attention_dim=out,
                                       norm_num_groups=c["norm_num_groups"], use_linear_projection=c["use_linear_projection"],
                                       upcast_attention=c["upcast_attention"]) for _ in range(n))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, high: torch.Tensor, down: list[torch.Tensor],
                mid: torch.Tensor) -> torch.Tensor:
        """The noise prediction; `down`, `mid`: the ControlNet's residuals."""
        emb = self.time_embedding(self.time_proj(timestep.expand(sample.shape[0])).to(sample.dtype))
        h = self.conv_in(sample)
        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "attentions", None) is not None:
                h, more = block(h, emb, encoder_hidden_states=high)
            else:
                h, more = block(h, emb)
            skips += list(more)
        skips = [s + r for s, r in zip(skips, down)]
        h = self.mid_block(h, emb, encoder_hidden_states=high) + mid
        pixels = list(down)
        for block in self.up_blocks:
            n = len(block.resnets)
            layer_skips, skips, layer_pixels, pixels = skips[-n:], skips[:-n], pixels[-n:], pixels[:-n]
            attentions = getattr(block, "attentions", None)
            for j, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, layer_skips[-1 - j]], dim=1), emb)
                if attentions is not None:
                    h = attentions[j](h, encoder_hidden_states=high, return_dict=False)[0]
                h = block.pixel_attentions[j](h, encoder_hidden_states=as_tokens(layer_pixels[-1 - j]), return_dict=False)[0]
            for up in block.upsamplers or []:
                h = up(h, skips[-1].shape[2:] if skips else None)
        return self.conv_out(self.conv_act(self.conv_norm_out(h)))


class XPSRStep(nn.Module):
    """One denoising step's graph: ControlNet then UNet (the pipeline's guidance stays outside). The ControlNet's
    conditioning embedding runs once per request (`LREncoder`), its training heads never: neither is held here."""

    def __init__(self, controlnet: XPSRControlNet, unet: XPSRUNet):
        super().__init__()
        for unused in ("controlnet_cond_embedding", "conv_degradation", "conv_degradation_mid"):
            setattr(controlnet, unused, None)
        self.controlnet, self.unet = controlnet, unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                lowlevel_embeddings: torch.Tensor, cond_embedding: torch.Tensor) -> torch.Tensor:
        down, mid = self.controlnet(sample, timestep, text_embeddings, lowlevel_embeddings, cond_embedding)
        return self.unet(sample, timestep, text_embeddings, down, mid)


class LREncoder(nn.Module):
    """Once per request, over the photo's tiles: the ControlNet's conditioning embedding of the photo (in [0, 1])
    and the photo's latent (the VAE posterior's mean, scaled): what every step reads, and the sampler's start."""

    def __init__(self, controlnet: XPSRControlNet, vae: Any):
        super().__init__()
        self.controlnet, self.vae = nn.Module(), nn.Module()  # only the parts it runs, under their folders' names
        self.controlnet.controlnet_cond_embedding = controlnet.controlnet_cond_embedding
        self.vae.encoder, self.vae.quant_conv = vae.encoder, vae.quant_conv
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, lq_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.controlnet.controlnet_cond_embedding((lq_image + 1) / 2)  # the photo in [0, 1]
        moments = self.vae.quant_conv(self.vae.encoder(lq_image))
        return cond, moments.chunk(2, dim=1)[0] * self.scaling  # the posterior's mean, scaled
