"""CLIP's vision transformer as the attachments' graphs run it (LLaVA's vision tower, the gallery's encoder): the patch
and position embeddings, the pre-norm, then the first `depth` encoder layers. The position embedding is read whole
(every patch has one) rather than through CLIP's non-persistent index buffer, which an export cannot bind."""

from __future__ import annotations

from typing import Any

import torch

# CLIP's image normalisation (OpenAI's mean and deviation), which every CLIP image processor here uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_hidden(tower: Any, pixel_values: torch.Tensor, depth: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1 + N, D): the hidden states after `depth` layers of `tower` (a transformers
    `CLIPVisionModel`), CLS first."""
    e = tower.embeddings
    patches = e.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    x = torch.cat([e.class_embedding.expand(patches.shape[0], 1, -1), patches], 1) + e.position_embedding.weight[None]
    x = tower.pre_layrnorm(x)
    for layer in tower.encoder.layers[:depth]:
        x = layer(x, attention_mask=None)
    return x
