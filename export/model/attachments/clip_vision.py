"""CLIP's vision transformer as the attachments' graphs run it (LLaVA's vision tower, the gallery's encoder): the patch
and position embeddings, the pre-norm, then the first `depth` encoder layers. The position embedding is read whole
(every patch has one) rather than through CLIP's non-persistent index buffer, which an export cannot bind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json

# CLIP's image normalisation (OpenAI's mean and deviation), which every CLIP image processor here uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_processing(folder: Path, image_size: int) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """A folder's CLIP image processor's settings (the short side's size, the crop, the mean and deviation), read from
    the processor's own file or the processor's entry (transformers 5 writes it there); what they leave out is CLIP's
    at the vision tower's `image_size`. Settings that do not parse, or do not make the tower's input, are refused
    naming the file."""
    config: dict[str, Any] = {}
    source = folder
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (folder / name).is_file():
            data = read_json(folder / name, "image processor file")
            config, source = (data.get(key) or {} if key else data), folder / name
            if config:
                break
    try:
        crop, size = config.get("crop_size", image_size), config.get("size", image_size)
        crop = int(crop["height"] if isinstance(crop, dict) else crop)  # an int: the square's side (older files)
        size = int(size["shortest_edge"] if isinstance(size, dict) else size)  # an int: the short side's
        mean = tuple(float(v) for v in config.get("image_mean", CLIP_MEAN))
        std = tuple(float(v) for v in config.get("image_std", CLIP_STD))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DiffsrError(f"{source}: its image processor settings do not parse ({e})") from None
    if crop != image_size:
        raise DiffsrError(f"{source}: the image processor crops {crop} px, the vision tower takes {image_size}")
    if size < crop or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DiffsrError(f"{source}: the image processor's short side ({size} px) must be at least its crop ({crop}), "
                          f"its image_mean and image_std three numbers each, the deviations above 0")
    return size, crop, mean, std


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
