"""Random inputs of a signature's shapes: what tracing, parity checks and tests feed a submodule.

Token ids in the vocabulary, timesteps in [0, 1000), images in [-1, 1], SDXL's time ids as sizes and
crop offsets in pixels, N(0, 1) for latents, features and text states; seeded, so the same dims and
seed give the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffsr.export.model.config import VOCAB_SIZE
from diffsr.export.model.signatures import Signature

_RANDOM = {
    "input_ids": lambda shape, g: torch.randint(0, VOCAB_SIZE, shape, generator=g, dtype=torch.int32),
    "input_ids_2": lambda shape, g: torch.randint(0, VOCAB_SIZE, shape, generator=g, dtype=torch.int32),
    "time_ids": lambda shape, g: torch.randint(0, 1024, shape, generator=g).float(),
    "timestep": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float(),
    "lq_image": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}


def sample_inputs(sig: Signature, dims: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: _RANDOM.get(name, lambda s, g: torch.randn(s, generator=g))(shape, g)
        for name, shape in sig.input_shapes(dims).items()
    }
