"""The one input loader parity checks, calibration and benchmarks share.

`sample_inputs` draws random feeds of a signature's shapes; `photos` and `PROMPTS` are the real
calibration data: photographs that ship inside scikit-image and a few prompts.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from export.config import VOCAB_SIZE
from export.signatures import Signature

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
PROMPTS = (
    "clean, natural, high quality, rich detail, sharp focus, 8k",
    "a photograph of a person, detailed skin and hair",
    "",
)
_RANDOM = {
    "input_ids": lambda shape, g: torch.randint(0, VOCAB_SIZE, shape, generator=g, dtype=torch.int32),
    "timestep": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float(),
    "lq_image": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
}


def sample_inputs(sig: Signature, dims: Mapping[str, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs of a signature's shapes: ids in the vocabulary, timesteps in [0, 1000),
    images in [-1, 1], N(0, 1) for latents and features."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: _RANDOM.get(name, lambda s, g: torch.randn(s, generator=g))(shape, g)
        for name, shape in sig.input_shapes(dims).items()
    }


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """A scikit-image photograph as (H, W, 3) uint8 RGB, resized (bicubic) to size = (width, height)."""
    from PIL import Image
    from skimage import data

    from runtime.image import to_rgb

    return to_rgb(Image.fromarray(np.asarray(getattr(data, name)())).resize(size, Image.BICUBIC))


def photos(size: tuple[int, int] = (128, 128), names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    return [photo(n, size) for n in names]
