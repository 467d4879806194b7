"""The captioner's three graphs (`captioner.py` declares them) around transformers' `Blip2ForConditionalGeneration`.

What `generate` does, split where a deployment splits it: the 32 `<image>` placeholders it puts before BOS and
the prompt are replaced by the projected Q-Former outputs, which is the prefix at positions 0..31 followed by
the token embeddings; OPT's learned positions are given explicitly (0, 1, ... with no padding). The language
model runs with eager attention (an explicit additive mask, what ONNX and TensorRT take).

The decode step hands OPT a cache object of its own: OPT asks a cache only for `update(k, v, layer)` (and its
length, for positions it is given here), so `SlotCache.update` writes the new key and value into slot
`position` of the full-length buffers, functionally (`torch.where` on a one-hot of the slot), and returns the
whole buffers; the mask hides the slots not yet written. Every call has the same shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json


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


def _additive(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L): 0 where attended, the float minimum elsewhere."""
    return torch.where(mask.bool()[:, None, None, :], 0.0, torch.finfo(torch.float32).min)


class CaptionPrefill(nn.Module):
    """prefix + BOS and prompt ids -> the next token's logits and the cache, padded to the mask's length."""

    def __init__(self, blip2: Any):
        super().__init__()
        self.language_model = blip2.language_model

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        lm = self.language_model
        embeds = torch.cat([prefix, lm.get_input_embeddings()(input_ids)], dim=1)  # (B, P, D)
        b, p = embeds.shape[:2]
        positions = torch.arange(p, device=embeds.device).unsqueeze(0).expand(b, p)
        causal = torch.full((p, p), torch.finfo(torch.float32).min, device=embeds.device).triu(1)[None, None]
        out = lm(inputs_embeds=embeds, attention_mask=causal.expand(b, 1, p, p), position_ids=positions, use_cache=True)
        pad = attention_mask.shape[1] - p
        keys = torch.stack([nn.functional.pad(layer.keys, (0, 0, 0, pad)) for layer in out.cache.layers])
        values = torch.stack([nn.functional.pad(layer.values, (0, 0, 0, pad)) for layer in out.cache.layers])
        return out.logits[:, -1], keys, values  # (B, V), (N, B, H, L, Dh) twice


class SlotCache:
    """A cache of fixed length that writes each layer's new key and value at one slot (per row)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor):
        self.keys, self.values, self.slot = keys, values, slot  # slot: (B, 1, L, 1) bool, one-hot
        self.written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # asked only when positions are not given; they always are

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        k = torch.where(self.slot, key, self.keys[layer_idx])  # key (B, H, 1, Dh) broadcast along L
        v = torch.where(self.slot, value, self.values[layer_idx])
        self.written[layer_idx] = (k, v)
        return k, v


class CaptionDecode(nn.Module):
    """One token per row: its logits for the next, and the cache with its key and value written at its position."""

    def __init__(self, blip2: Any):
        super().__init__()
        self.language_model = blip2.language_model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_keys: torch.Tensor, past_values: torch.Tensor):
        lm = self.language_model
        length = past_keys.shape[3]
        slot = (torch.arange(length, device=past_keys.device)[None, :] == position_ids).view(-1, 1, length, 1)
        cache = SlotCache(past_keys, past_values, slot)
        out = lm(input_ids=input_ids, attention_mask=_additive(attention_mask), position_ids=position_ids, cache=cache,
                 use_cache=True)
        layers = range(past_keys.shape[0])
        return (out.logits[:, -1], torch.stack([cache.written[i][0] for i in layers]),
                torch.stack([cache.written[i][1] for i in layers]))


GRAPHS = {"caption_image": CaptionImage, "caption_prefill": CaptionPrefill, "caption_decode": CaptionDecode}
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
