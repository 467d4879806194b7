"""Random inputs of a submodule's signature: what tracing, parity checks and tests feed it.

The family says what an input's values are (token ids in the vocabulary, timesteps in [0, 1000), images
in [-1, 1], SDXL's time ids as sizes in pixels: `ModelFamily.sample_draws`); anything else is N(0, 1) for
floats. Seeded: the same dims and seed give the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from diffsr.export.model.family import ModelFamily


def sample_inputs(model: ModelFamily, name: str, dims: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    sig, draws = model.signature(name), model.sample_draws(name)
    g = torch.Generator().manual_seed(seed)
    feed = {}
    for spec, shape in zip(sig.inputs, sig.input_shapes(dims).values()):
        if spec.name in draws:
            feed[spec.name] = draws[spec.name](shape, g)
        elif spec.dtype.startswith("int"):
            feed[spec.name] = torch.randint(0, 2, shape, generator=g, dtype=getattr(torch, spec.dtype))
        else:
            feed[spec.name] = torch.randn(shape, generator=g)
    return feed
