"""Seeded weights: each parameter drawn alone, from a generator seeded by (seed, its name), stored in FP16 as SDXL
checkpoints are published; the same seed and name give the same bytes whatever the order of work.

The draws follow PyTorch's own initialisation: weights and biases of linear and convolution layers uniform in
+-1/sqrt(fan_in), norms one and zero, embeddings N(0, 0.02). Layers a trained model has moved away from zero
(ControlNet's zero convolutions) are drawn like any other, so every path is alive and parity tests prove something.
`random_init` writes a family's checkpoint with them; an attachment (a captioner) draws its own folder the same way.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

STORED_DTYPE = torch.float16
NORMS = ("RMSNorm", "T5LayerNorm")  # norms of other libraries (diffusers, transformers: LlamaRMSNorm): weight one, as
# initialised


def draw(module: nn.Module, kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(NORMS):
        return torch.ones(shape) if kind == "weight" else torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=generator) * 0.02
    weight = getattr(module, "weight", None)
    fan_in = math.prod(weight.shape[1:]) if weight is not None and weight.dim() >= 2 else (
        math.prod(shape[1:]) if len(shape) >= 2 else shape[-1])
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def draw_parameter(module: nn.Module, kind: str, shape: tuple[int, ...], seed: int, name: str) -> torch.Tensor:
    """One parameter (`kind` of `module`), FP16, from a generator seeded by (seed, name): copies share a name."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return draw(module, kind, shape, generator).to(STORED_DTYPE)
