"""The pipeline's stages as functions, shared by the in-process pipeline and the Triton models.

    prepare_lq   image -> bicubic x scale in [-1, 1], padded to the model's pixel multiple
    prompts      the text batch: the negative prompt first with guidance
    encode_lq    the LQ stage over tiles (blended in the latent)
    decode       the decode stage over tiles (blended in pixels)
    finish       crop to exactly `scale` x the input, colour-correct, uint8

`encode_lq` and `decode` run the family's submodule for that stage, whatever it is: its image input and
outputs come from its signature, and an output's blending scale from its shape (`ModelFamily.scale`).
"""

from __future__ import annotations

import numpy as np
import torch

from diffsr.export.model.family import ModelFamily, RunFn
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.image import adain, pad_to_multiple, to_uint8, upsample, wavelet_fix
from diffsr.runtime.tiling import Blender, Tiling


def prepare_lq(model: ModelFamily, image: np.ndarray, scale: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, sH', sW') in [-1, 1], replicate-padded to the model's pixel multiple and to
    at least its `min_pixels` a side."""
    return pad_to_multiple(upsample(image, scale), model.pixel_multiple, model.min_pixels)


def prompts(cfg: PipelineConfig, prompt: str) -> list[str]:
    """The text batch of a request's prompt (`caption.prompt_of`): with guidance the negative prompt first, as the
    loop's latent batch is ordered."""
    return [cfg.negative_prompt, prompt] if cfg.cfg else [prompt]


def _over_tiles(model: ModelFamily, run: RunFn, name: str, image: torch.Tensor, scale: int,
                tiling: Tiling) -> dict[str, torch.Tensor]:
    """Submodule `name` on `image` (`scale` values per latent cell), one call if its latent fits a tile, else
    tiles of it run in batches and each output blended at its own scale."""
    sig = model.signature(name)
    source = sig.inputs[0].name
    grid = (image.shape[-2] // scale, image.shape[-1] // scale)
    if tiling.tiles(*grid) == 1:
        return dict(run(name, **{source: image}))
    scales = {t.name: model.scale(name, t.name) for t in sig.outputs}
    return Blender(tiling, grid, set(scales.values()), image.device)(
        lambda group: run(name, **{source: torch.cat([t.crop(image, scale) for t in group])}), scales)


def encode_lq(model: ModelFamily, run: RunFn, lq: torch.Tensor, tiling: Tiling) -> dict[str, torch.Tensor]:
    """(1, 3, H, W) -> the LQ stage's outputs at latent resolution (SD: f1 and z_lq)."""
    return _over_tiles(model, run, model.stages.lq, lq, model.latent_factor, tiling)


def decode(model: ModelFamily, run: RunFn, latent: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """(1, C, h, w) -> (1, 3, 8h, 8w): the decode stage's image."""
    sig = model.signature(model.stages.decode)
    return _over_tiles(model, run, sig.name, latent, 1, tiling)[sig.outputs[0].name]


def finish(decoded: torch.Tensor, lq: torch.Tensor, size: tuple[int, int], color_fix: str) -> np.ndarray:
    """Crop decoder output and LQ to the output size, colour-correct, -> (H, W, 3) uint8."""
    h, w = size
    out = decoded[..., :h, :w]
    if color_fix == "adain":
        out = adain(out, lq[..., :h, :w])
    elif color_fix == "wavelet":
        out = wavelet_fix(out, lq[..., :h, :w])
    return to_uint8(out)
