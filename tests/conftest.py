"""Shared fixtures: a seeded tiny checkpoint made once per session, and sample inputs from signatures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export.checkpoint import init_checkpoint, load_reference
from export.signatures import Signature


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return init_checkpoint("tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    return load_reference(tiny_checkpoint.path)[1]


def sample_inputs(sig: Signature, dims: dict[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of a signature's shapes: ids in the vocabulary, timesteps in [0, 1000), N(0, 1) else."""
    g = torch.Generator().manual_seed(seed)
    feed = {}
    for name, shape in sig.input_shapes(dims).items():
        if name == "input_ids":
            feed[name] = torch.randint(0, 49408, shape, generator=g, dtype=torch.int32)
        elif name == "timestep":
            feed[name] = torch.randint(0, 1000, shape, generator=g).float()
        elif name == "lq_image":
            feed[name] = torch.rand(shape, generator=g) * 2 - 1
        else:
            feed[name] = torch.randn(shape, generator=g)
    return feed


@pytest.fixture(scope="session")
def photo_lq():
    """A real photo (skimage's astronaut), 64x64, as a small LQ input."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((64, 64), Image.BICUBIC))
