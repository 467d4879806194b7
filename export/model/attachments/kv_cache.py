"""What the language models of the attachments share: a cache of fixed length written one slot per decode step, the
masks and stacks around it, the prefill and the decode step, and their two signatures. A decode step has the same shapes at every token, so an engine is built once and,
on the GPU, a step is one CUDA-graph replay.

The language model is handed `SlotCache` as its cache object: transformers' decoders ask a cache only for
`update(k, v, layer)` (and its length, for positions they are given here), so `update` writes the new key and value
into slot `position` of the full-length buffers, functionally (`torch.where` on a one-hot of the slot), and returns
the whole buffers; the mask hides the slots not yet written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffsr.export.model.dims import NamedDim
from diffsr.export.model.settings import MAX_BEAMS
from diffsr.export.model.signatures import Signature, TensorSpec

F32_MIN = torch.finfo(torch.float32).min
F32, IDS = "float32", "int32"


def additive(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L): 0 where attended, the float minimum elsewhere."""
    return torch.where(mask.bool()[:, None, None, :], 0.0, F32_MIN)


def padded_cache(cache: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill's cache (one layer per entry of `cache.layers`) -> keys and values (N, B, H, length, Dh), the slots
    after the prefill's zero."""
    def stack(part: str) -> torch.Tensor:
        tensors = [getattr(layer, part) for layer in cache.layers]
        return torch.stack([nn.functional.pad(t, (0, 0, 0, length - t.shape[2])) for t in tensors])

    return stack("keys"), stack("values")


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


def prefill(lm: nn.Module, embeds: torch.Tensor, length: int, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """The prefill's embeddings (B, P, D) through a transformers causal language model, causally, at positions 0..P-1:
    the last position's logits (B, V) and the cache padded to `length` slots (N, B, H, L, Dh), twice. `kwargs`: the
    model's own (LLaMA's `logits_to_keep`)."""
    b, p = embeds.shape[:2]
    positions = torch.arange(p, device=embeds.device).unsqueeze(0).expand(b, p)
    mask = torch.full((p, p), F32_MIN, device=embeds.device).triu(1)[None, None].expand(b, 1, p, p)
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1], *padded_cache(out.cache, length)


class DecodeStep(nn.Module):
    """One token per row through the `language_model` of an attachment's network: its logits for the next, and the
    cache with its key and value written at its position."""

    def __init__(self, network: Any):
        super().__init__()
        self.language_model = network.language_model  # under the folder's name (the weights bind by it)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_keys: torch.Tensor, past_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = past_keys.shape[3]
        slot = (torch.arange(length, device=past_keys.device)[None, :] == position_ids).view(-1, 1, length, 1)
        cache = SlotCache(past_keys, past_values, slot)
        out = self.language_model(input_ids=input_ids, attention_mask=additive(attention_mask),
                                  position_ids=position_ids, cache=cache, use_cache=True)
        layers = range(past_keys.shape[0])
        return (out.logits[:, -1], torch.stack([cache.written[i][0] for i in layers]),
                torch.stack([cache.written[i][1] for i in layers]))


def beams_dim(name: str) -> NamedDim:
    """A language model's rows: one image's beams (1 for greedy search), up to `MAX_BEAMS` (the profiles' opt)."""
    return NamedDim(name, "language-model rows: an image's beams (1 for greedy search)", "beams", trace=5, odd=3,
                    bound=8 * MAX_BEAMS, native=MAX_BEAMS)


def lm_signatures(prefill_name: str, decode_name: str, features: TensorSpec, rows: str, length: str, cache: str,
                  layers: int, kv_heads: int, head_dim: int, vocab: int) -> tuple[Signature, Signature]:
    """The prefill's and the decode step's signatures: `features` (the image graph's output, on `rows`) with the
    prefill's ids (`rows` x `length`), and one token per row; both over a cache of `cache` slots."""
    shape = (layers, rows, kv_heads, cache, head_dim)
    kv_in = (TensorSpec("past_keys", F32, shape), TensorSpec("past_values", F32, shape))
    kv_out = (TensorSpec("keys", F32, shape), TensorSpec("values", F32, shape))
    logits = TensorSpec("logits", F32, (rows, vocab))
    mask = TensorSpec("attention_mask", IDS, (rows, cache))
    return (Signature(prefill_name, inputs=(features, TensorSpec("input_ids", IDS, (rows, length)), mask),
                      outputs=(logits, *kv_out)),
            Signature(decode_name, inputs=(TensorSpec("input_ids", IDS, (rows, 1)), TensorSpec("position_ids", IDS, (rows, 1)),
                                           mask, *kv_in), outputs=(logits, *kv_out)))


def attended_mask(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """A sample cache mask: ones and zeros, the first slot set (a row attends to something)."""
    m = torch.randint(0, 2, shape, generator=g, dtype=torch.int32)
    m[:, 0] = 1
    return m
