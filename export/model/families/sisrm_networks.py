"""The `sisrm` family's networks: SD-2-base's ControlNet and UNet (diffusers' own classes, loaded strictly from their
folders), transformers' SegFormer, and SISRM's own modules in the `semantic/` folder, as the graphs run them.

    Segmenter          pixel_values (the folder's image processor's) -> SegFormer's logits (B, L, H/4, W/4)
    LabelStage         the label generator (global average pooling of the logits, a linear layer, softmax: the
                       classes' scores) and the segmentation at the latent's sides: the logits' class probabilities,
                       resized (bilinear) to the photo's latent grid
    MaskStage          the mask encoder over a tile of the segmentation: 3x3 conv, ReLU, 1x1 conv -> E_m (B, C_m, h, w);
                       beside it, a 1x1 conv and a sigmoid -> the fusion mask M (B, 1, h, w)
    SISRMStep          ControlNet then UNet, each transformer block's text cross-attention followed by a segmentation
                       cross-attention to E_m (pooled `mask_pool` cells a token), the ControlNet's residuals fused with M

Segmentation cross-attention (the paper's Eq. 7-8), in every transformer block of both networks: with h the block's
normalised hidden states (the text attention's input), c the text states and E the mask tokens,

    t = Attn_text(h, c)        s = softmax((h + t) W_q (E W_k)^T / sqrt(d)) (E W_v) W_o        block += t + s

so the block's output is the sum of the three: its input, t and s. The projections have no biases: with E_m zero, s is
zero and the block is SD's. Mask fusion (Eq. 10): each ControlNet residual G enters the UNet's skip F as F + M * G, M
average-pooled to the residual's sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.families.xpsr_networks import as_tokens


@dataclass(frozen=True)
class SemanticConfig:
    """The `semantic/` folder's config.json: SISRM's modules beside SD's networks and the segmenter."""

    num_labels: int  # the segmenter's classes
    mask_hidden: int  # the mask encoder's 3x3 conv width
    mask_channels: int  # E_m's width: what the segmentation attentions' keys and values are projected from
    mask_pool: int  # latent cells a side pooled into one E_m token
    latent_factor: int  # pixels per latent cell: the segmentation is resized to the photo's latent grid
    unet_blocks: tuple[tuple[int, int], ...]  # (width, heads) of the UNet's transformer blocks, in module order
    controlnet_blocks: tuple[tuple[int, int], ...]  # the ControlNet's

    def __post_init__(self) -> None:
        bad = [(w, h) for w, h in (*self.unet_blocks, *self.controlnet_blocks) if w % h]
        if bad:
            raise DiffsrError(f"semantic config: block widths must divide by their heads ({bad})")


class SegmentationAttention(nn.Module):
    """Eq. 8: queries (the text attention's input plus its result) attend to the mask tokens projected to keys and
    values; no biases."""

    def __init__(self, width: int, heads: int, kv_width: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_k = nn.Linear(kv_width, width, bias=False)
        self.to_v = nn.Linear(kv_width, width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, n, width = query.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, width // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.to_q(query)), split(self.to_k(tokens)), split(self.to_v(tokens)))
        return self.to_out(out.transpose(1, 2).reshape(b, n, width))


class MaskEncoder(nn.Module):
    """The segmentation's class probabilities -> (E_m, M): 3x3 conv, ReLU, 1x1 conv; M a 1x1 conv and a sigmoid on the
    same hidden features."""

    def __init__(self, num_labels: int, hidden: int, channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(num_labels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 1)
        self.conv_mask = nn.Conv2d(hidden, 1, 1)

    def forward(self, segmentation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.conv_in(segmentation))
        return self.conv_out(h), torch.sigmoid(self.conv_mask(h))


class SemanticParts(nn.Module):
    """The `semantic/` folder: the label generator's linear layer, the mask encoder, and one segmentation attention per
    transformer block of the UNet and of the ControlNet."""

    def __init__(self, config: SemanticConfig):
        super().__init__()
        self.config = config
        self.label_generator = nn.Linear(config.num_labels, config.num_labels)
        self.mask_encoder = MaskEncoder(config.num_labels, config.mask_hidden, config.mask_channels)
        self.unet_attentions = nn.ModuleList(SegmentationAttention(w, h, config.mask_channels)
                                             for w, h in config.unet_blocks)
        self.controlnet_attentions = nn.ModuleList(SegmentationAttention(w, h, config.mask_channels)
                                                   for w, h in config.controlnet_blocks)


def transformer_blocks(net: nn.Module) -> list[nn.Module]:
    """A diffusers network's transformer blocks (those with a cross-attention `attn2`), in module order."""
    return [m for m in net.modules() if getattr(m, "attn2", None) is not None and hasattr(m, "norm2")]


def block_shapes(net: nn.Module) -> tuple[tuple[int, int], ...]:
    """(width, heads) of each transformer block's cross-attention, in module order."""
    return tuple((int(b.attn2.to_q.in_features), int(b.attn2.heads)) for b in transformer_blocks(net))


def add_segmentation_attention(net: nn.Module, attentions: nn.ModuleList, tokens: dict[str, torch.Tensor]) -> None:
    """Each transformer block's text cross-attention (`attn2`) followed by its segmentation attention: a forward hook
    makes attn2's output t + s of Eq. 7-8 (the block adds its input), with s = attention(input + t, the mask tokens
    the step set in `tokens`). A hook leaves the network's modules, and so its weights' names, as diffusers has them."""
    blocks = transformer_blocks(net)
    if len(blocks) != len(attentions):
        raise DiffsrError(f"{type(net).__name__} has {len(blocks)} transformer blocks; the semantic folder holds "
                          f"{len(attentions)} segmentation attentions for it")
    for block, attention in zip(blocks, attentions):
        def then_segmentation(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], t: torch.Tensor,
                              attention: SegmentationAttention = attention) -> torch.Tensor:
            query = args[0] if args else kwargs["hidden_states"]
            return t + attention(query + t, tokens["mask"])

        block.attn2.register_forward_hook(then_segmentation, with_kwargs=True)


def residual_levels(controlnet: Any) -> tuple[int, ...]:
    """The level (sides halved that many times) of each ControlNet down residual, then the mid one's: conv_in's at 0,
    each down block's layers at its level, its downsampler's at the next."""
    levels = [0]
    for i, block in enumerate(controlnet.down_blocks):
        levels += [i] * len(block.resnets) + [i + 1] * len(block.downsamplers or [])
    return (*levels, len(controlnet.down_blocks) - 1)


class SISRMStep(nn.Module):
    """One denoising step: SD-2's ControlNet and UNet (diffusers' forwards) with segmentation attention in every
    transformer block and mask-fused residuals. The ControlNet's conditioning embedding runs once per request
    (`LREncoder`), so the step's ControlNet takes it as its conditioning image."""

    def __init__(self, controlnet: Any, unet: Any, semantic: SemanticParts):
        super().__init__()
        controlnet.controlnet_cond_embedding = nn.Identity()
        self.levels = residual_levels(controlnet)
        self.tokens: dict[str, torch.Tensor] = {}
        add_segmentation_attention(controlnet, semantic.controlnet_attentions, self.tokens)
        add_segmentation_attention(unet, semantic.unet_attentions, self.tokens)
        self.controlnet, self.unet, self.pool = controlnet, unet, semantic.config.mask_pool
        self.semantic = nn.Module()  # only the attentions it runs, under the folder's names
        self.semantic.unet_attentions, self.semantic.controlnet_attentions = (semantic.unet_attentions,
                                                                              semantic.controlnet_attentions)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text_embeddings: torch.Tensor,
                cond_embedding: torch.Tensor, mask_embedding: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = sample.shape[0] // cond_embedding.shape[0]  # guided: the tiles' negative rows, then their positive
        self.tokens["mask"] = as_tokens(F.avg_pool2d(mask_embedding, self.pool)).repeat(rows, 1, 1)
        try:
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states=text_embeddings,
                                        controlnet_cond=cond_embedding.repeat(rows, 1, 1, 1), return_dict=False)
            masks = mask.repeat(rows, 1, 1, 1)
            fused = [_pooled(masks, level) * r for level, r in zip(self.levels, [*down, mid])]
            return self.unet(sample, timestep, encoder_hidden_states=text_embeddings,
                             down_block_additional_residuals=fused[:-1], mid_block_additional_residual=fused[-1],
                             return_dict=False)[0]
        finally:
            self.tokens.clear()


def _pooled(mask: torch.Tensor, level: int) -> torch.Tensor:
    return F.avg_pool2d(mask, 2 ** level) if level else mask


class Segmenter(nn.Module):
    """SegFormer's logits of the processor's pixel values."""

    def __init__(self, segmenter: nn.Module):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.segmenter(pixel_values=pixel_values).logits


class LabelStage(nn.Module):
    """The label generator's class scores (global average pooling of the segmentation, linear, softmax), and the
    segmentation (the class probabilities) at the photo's latent grid; the logits cover the prepared photo's frame."""

    def __init__(self, semantic: SemanticParts):
        super().__init__()
        self.label_generator, self.factor = semantic.label_generator, semantic.config.latent_factor

    def forward(self, seg_logits: torch.Tensor, lq_image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = seg_logits.softmax(dim=1)  # the segmentation, at the logits' cells
        scores = torch.softmax(self.label_generator(probabilities.mean(dim=(2, 3))), dim=-1)
        size = (lq_image.shape[-2] // self.factor, lq_image.shape[-1] // self.factor)
        segmentation = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)
        return scores, segmentation


class MaskStage(nn.Module):
    def __init__(self, semantic: SemanticParts):
        super().__init__()
        self.mask_encoder = semantic.mask_encoder

    def forward(self, segmentation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out: tuple[torch.Tensor, torch.Tensor] = self.mask_encoder(segmentation)
        return out
