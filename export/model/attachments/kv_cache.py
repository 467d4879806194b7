"""What the language models of the attachments share: a cache of fixed length written one slot per decode step, and
the masks and stacks around it. A decode step has the same shapes at every token, so an engine is built once and,
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

F32_MIN = torch.finfo(torch.float32).min


def additive(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/0 -> (B, 1, 1, L): 0 where attended, the float minimum elsewhere."""
    return torch.where(mask.bool()[:, None, None, :], 0.0, F32_MIN)


def causal(length: int, device: torch.device) -> torch.Tensor:
    """(1, 1, P, P): each position attends to itself and those before it (additive)."""
    return torch.full((length, length), F32_MIN, device=device).triu(1)[None, None]


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


def decode_step(lm: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                past_keys: torch.Tensor, past_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One token per row through a transformers causal language model: its logits for the next, and the cache with
    its key and value written at its position."""
    length = past_keys.shape[3]
    slot = (torch.arange(length, device=past_keys.device)[None, :] == position_ids).view(-1, 1, length, 1)
    cache = SlotCache(past_keys, past_values, slot)
    out = lm(input_ids=input_ids, attention_mask=additive(attention_mask), position_ids=position_ids, cache=cache,
             use_cache=True)
    layers = range(past_keys.shape[0])
    return (out.logits[:, -1], torch.stack([cache.written[i][0] for i in layers]),
            torch.stack([cache.written[i][1] for i in layers]))
