"""The real data that calibration, parity checks and benchmarks share: photographs that ship inside
scikit-image, and a few prompts (the checkpoint's default first)."""

from __future__ import annotations

import numpy as np

from diffsr.export.model.settings import DEFAULT_PROMPT
from diffsr.runtime.image import to_rgb

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
PROMPTS = (DEFAULT_PROMPT, "a photograph of a person, detailed skin and hair", "")


def photo(name: str, size: tuple[int, int] | None) -> np.ndarray:
    """A scikit-image photograph as (H, W, 3) uint8 RGB, resized (bicubic) to size = (width, height),
    or at its own size where `size` is None."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(np.asarray(getattr(data, name)()))
    return to_rgb(img if size is None else img.resize(size, Image.BICUBIC))


def photos(size: tuple[int, int] = (128, 128), names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    return [photo(n, size) for n in names]
