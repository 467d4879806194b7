"""The captioner's three graphs (`captioner.py` declares them) around transformers' `Blip2ForConditionalGeneration`.

What `generate` does, split where a deployment splits it: the 32 `<image>` placeholders it puts before BOS and
the prompt are replaced by the projected Q-Former outputs, which is the prefix at positions 0..31 followed by
the token embeddings; OPT's learned positions are given explicitly (0, 1, ... with no padding). The language
model runs with eager attention (an explicit additive mask, what ONNX and TensorRT take). The decode step writes
one slot of a cache of fixed length (`kv_cache.py`, shared with the prompter's LLaMA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.attachments.kv_cache import DecodeStep, prefill


class CaptionImage(nn.Module):
    """pixel_values -> the language model's prefix: ViT, Q-Former over the learned queries, projection (what
    `get_image_features` computes). It holds those parts under their names in the weights file."""

    def __init__(self, blip2: Any):
        super().__init__()
        self.vision_model, self.qformer = blip2.vision_model, blip2.qformer
        self.query_tokens, self.language_projection = blip2.query_tokens, blip2.language_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state
        seen = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        queries = self.query_tokens.expand(image.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=seen, return_dict=True)
        return self.language_projection(out.last_hidden_state)  # (B, 32, D)


class CaptionPrefill(nn.Module):
    """prefix + BOS and prompt ids -> the next token's logits and the cache, padded to the mask's length."""

    def __init__(self, blip2: Any):
        super().__init__()
        self.language_model = blip2.language_model

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        lm = self.language_model
        embeds = torch.cat([prefix, lm.get_input_embeddings()(input_ids)], dim=1)  # (B, P, D)
        return prefill(lm, embeds, attention_mask.shape[1])  # (B, V), (N, B, H, L, Dh) twice


GRAPHS = {"caption_image": CaptionImage, "caption_prefill": CaptionPrefill, "caption_decode": DecodeStep}
LM_HEAD, EMBED_TOKENS = "language_model.lm_head.weight", "language_model.model.decoder.embed_tokens.weight"


def build_blip2(folder: Path) -> nn.Module:
    """The captioner's network from its folder's config.json, without weights (a checkpoint `Component`), every
    attention eager: explicit masks, the kind ONNX and TensorRT take."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration
    from transformers.initialization import no_init_weights

    try:
        config = Blip2Config.from_dict(read_json(folder / "config.json", "captioner file"), attn_implementation="eager")
        with no_init_weights():  # the checkpoint assigns every weight; and drawing them cannot run on fake tensors
            module: nn.Module = Blip2ForConditionalGeneration(config)
    except (ValueError, TypeError, KeyError) as e:
        raise DiffsrError(f"{folder / 'config.json'} is not a valid Blip2Config: {e}") from None
    return module


def load_blip2(folder: Any) -> Any:
    """The captioner's reference as transformers loads it, FP32 on the CPU, eager attention (the graphs' kind)."""
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval().requires_grad_(False)


def caption_graphs(blip2: Any) -> dict[str, nn.Module]:
    return {name: cls(blip2).eval() for name, cls in GRAPHS.items()}
