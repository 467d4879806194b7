"""The real data that calibration, parity checks and benchmarks share: photographs that ship inside
scikit-image, a few prompts (the checkpoint's default first), and requests made of them (`sample_request`: the
family's every photo input filled)."""

from __future__ import annotations

import numpy as np

from diffsr.export.model.family import ModelFamily
from diffsr.export.model.inputs import PHOTO_KINDS
from diffsr.export.model.settings import DEFAULT_PROMPT, PipelineConfig, Request
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


def sample_request(model: ModelFamily, image: np.ndarray, settings: PipelineConfig, seed: int = 0) -> Request:
    """A request of `image` under `settings` with the family's other photo inputs filled from the other photos, so
    that calibration, parity, bench and eval run every input's path: a single photo input one photo, a list as many
    as it allows up to two (at least its least); `seed` turns which photos are taken."""
    photos: dict[str, tuple[np.ndarray, ...]] = {}
    for spec in model.family_inputs():
        if spec.kind not in PHOTO_KINDS:
            continue
        count = 1 if spec.kind == "photo" else max(int(spec.low or 0), min(int(spec.high if spec.high is not None else 2), 2))
        names = [PHOTOS[(seed + 1 + i) % len(PHOTOS)] for i in range(count)]
        photos[spec.name] = tuple(photo(n, (image.shape[1], image.shape[0])) for n in names)
    return Request(image, settings, photos)
