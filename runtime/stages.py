"""The pipeline's stages as functions, shared by the in-process pipeline and the Triton models; each reads the family's
declaration (`Stages`, the request inputs, the signatures), none names a submodule.

    prepare      the request's photos -> pixels in [-1, 1]: the photo bicubic x `upscale` and padded to the model's
                 multiple; the family's tiled photos laid over it alike, its global photos resized to their side; the
                 photo, edge-padded to the prepared photo's frame, as the family's own processors take it
                 (`ModelFamily.view`)
    prompting    the prompting stages (SISRM's segmenter and label generator) on the prepared photos, and the words
                 the family reads from them (`ModelFamily.words`)
    token_ids    the request's texts -> token ids, as the family lays out its text batch
    run_once     the once-per-request stages in order, each on the named tensors made so far: tiled stages over the
                 photo's tiles (blended in the latent), the others once
    decode       the decode stage over tiles (blended in pixels)
    finish       crop to exactly `upscale` x the input, colour-correct, uint8
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

from diffsr.export.model.family import ModelFamily
from diffsr.export.model.inputs import PHOTO_KINDS
from diffsr.export.model.parts import RunFn
from diffsr.export.model.settings import PipelineConfig, Request
from diffsr.export.model.signatures import Signature, parse_dim
from diffsr.runtime.image import adain, output_size, pad_to_multiple, resized, to_uint8, upsample, wavelet_fix
from diffsr.runtime.tiling import Blender, Tiling

Timer = Callable[[str], AbstractContextManager[None]]  # a stage's name -> a context timing it


@contextmanager
def untimed(_: str) -> Iterator[None]:
    yield


def prepare_lq(model: ModelFamily, image: NDArray[np.uint8], scale: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, sH', sW') in [-1, 1], replicate-padded to the model's pixel multiple and to at
    least its `min_pixels` a side. A photo the model takes at the latent's sides (`photo_scale` 1: LDM x4's) is
    resized to the output's latent cells instead (the photo itself where `scale` is the latent factor), padded alike."""
    at, f = model.photo_scale, model.latent_factor
    if at == f:
        return pad_to_multiple(upsample(image, scale), model.pixel_multiple, model.min_pixels)
    return pad_to_multiple(resized(image, photo_size(model, image, scale)), model.pixel_multiple * at // f,
                           model.min_pixels * at // f)


def photo_size(model: ModelFamily, image: NDArray[np.uint8], scale: int) -> tuple[int, int]:
    """The prepared photo's (h, w) before padding: the output size at the photo's scale (rounded up)."""
    at, f = model.photo_scale, model.latent_factor
    h, w = output_size(image.shape[0], image.shape[1], scale)
    return -(-h * at // f), -(-w * at // f)


def _laid_over(image: NDArray[np.uint8], size: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """A tiled photo on the request's photo's pixels: resized (bicubic) to the output size, padded as it is."""
    return F.pad(resized(image, size), (0, padded[1] - size[1], 0, padded[0] - size[0]), mode="replicate")


def framed(image: NDArray[np.uint8], size: tuple[int, int], padded: tuple[int, int]) -> NDArray[np.uint8]:
    """The photo at its own pixels, edge-padded as the prepared photo is (`size` its sides before padding, `padded`
    after): what covers the prepared photo's whole frame, so that a map made of it lines up with the prepared photo."""
    h, w = image.shape[:2]
    rows, cols = -(-h * padded[0] // size[0]), -(-w * padded[1] // size[1])
    return np.pad(image, ((0, rows - h), (0, cols - w), (0, 0)), mode="edge")


def prepare(model: ModelFamily, request: Request, root: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The request's photos as the stages take them, by tensor name: the photo (1, 3, H, W), then each of the
    family's photo inputs (N, 3, H, W) (a tiled one on the photo's padded pixels, a global one at its side), then the
    photo, framed as the prepared photo is, as the family's own processors prepare it (their files under `root`)."""
    scale = request.settings.upscale
    lq = prepare_lq(model, request.photo, scale)
    size = photo_size(model, request.photo, scale)
    out = {model.stages.photo: lq}
    for spec in model.family_inputs():
        if spec.kind not in PHOTO_KINDS:
            continue
        photos = request.photos.get(spec.name, ())
        padded = (int(lq.shape[-2]), int(lq.shape[-1]))
        made = [_laid_over(p, size, padded) if spec.tiled else resized(p, (spec.side, spec.side)) for p in photos]
        empty = lq.new_zeros((0, 3, *(lq.shape[-2:] if spec.tiled else (spec.side, spec.side))))
        out[spec.tensor] = torch.cat(made) if made else empty
    if model.photo_views():
        out |= model.view(framed(request.photo, size, (int(lq.shape[-2]), int(lq.shape[-1]))), root)
    return {name: t.to(device) for name, t in out.items()}


def prompting(model: ModelFamily, run: RunFn, tensors: Mapping[str, torch.Tensor], settings: PipelineConfig,
              root: Path, timed: Timer = untimed) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The prompting stages, in order, on the prepared tensors -> (the tensors and their outputs, the words the family
    reads from them by prompt slot; `root` holds the files it reads them with)."""
    made = dict(tensors)
    stages = [s for s in model.stages.once if s.prompting]
    for stage in stages:
        with timed(stage.part):
            made |= run(stage.submodule, **{t.name: made[t.name] for t in model.signature(stage.submodule).inputs})
    return made, model.words(made, model.input_values(settings), root) if stages else {}


def token_ids(model: ModelFamily, tokenize: Callable[[list[str]], dict[str, Any]], texts: Mapping[str, str],
              guided: bool, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(v).to(device) for name, v in model.token_ids(tokenize, texts, guided).items()}


def over_tiles(model: ModelFamily, run: RunFn, name: str, feeds: Mapping[str, torch.Tensor],
               tiling: Tiling) -> dict[str, torch.Tensor]:
    """Submodule `name` on `feeds`, one call if the latent fits a tile, else batches of tiles: every input with the
    latent's sides cropped to each tile (at its own scale), any other repeated for each tile; each output with the
    latent's sides blended at its own scale."""
    sig = model.signature(name)
    scales_in = {t.name: model.side_scale(t) for t in sig.inputs}
    source, scale = next((n, s) for n, s in scales_in.items() if s is not None)
    grid = (feeds[source].shape[-2] // scale, feeds[source].shape[-1] // scale)
    if tiling.tiles(*grid) == 1:
        return dict(run(name, **feeds))
    scales = {t.name: s for t in sig.outputs if (s := model.side_scale(t)) is not None}

    per_image = set(model.batched_inputs(sig))

    def one(group: list[Any]) -> Mapping[str, torch.Tensor]:
        """A batch of tiles: inputs with the latent's sides cropped to each tile, other per-image inputs repeated for
        each, the rest (the references' keys and values) shared by all as they are."""
        crops = {k: torch.cat([t.crop(v, scales_in[k]) for t in group]) if scales_in[k] is not None
                 else v.repeat_interleave(len(group), dim=0) if k in per_image else v for k, v in feeds.items()}
        return run(name, **crops)

    return Blender(tiling, grid, set(scales.values()), feeds[source].device)(one, scales)


def run_once(model: ModelFamily, run: RunFn, tensors: Mapping[str, torch.Tensor], tiling: Tiling,
             timed: Timer = untimed) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The once-per-request stages, in the family's order, on the prepared tensors and each earlier stage's outputs
    -> (the tiled stages' outputs, the others' outputs). Each stage is timed under its part. A stage whose outputs
    `tensors` already holds (the Triton ensemble ran it as a step of its own) is not run again, nor is a prompting
    stage (`prompting` ran it)."""
    made = dict(tensors)
    tiled = {name: made[name] for name in model.tiled_scales() if name in made}  # the photos the step reads
    whole: dict[str, torch.Tensor] = {}
    for stage in model.stages.once:
        if stage.prompting:  # run with the preparation (`prompting`), which handed on what later stages take
            continue
        sig = model.signature(stage.submodule)
        if all(t.name in made for t in sig.outputs):
            (tiled if stage.tiled else whole).update({t.name: made[t.name] for t in sig.outputs})
            continue
        feeds = {t.name: made[t.name] for t in sig.inputs}
        with timed(stage.part):
            out = (not_run(sig, feeds) if any(0 in v.shape for v in feeds.values())
                   else over_tiles(model, run, stage.submodule, feeds, tiling) if stage.tiled
                   else dict(run(stage.submodule, **feeds)))
        made |= out
        (tiled if stage.tiled else whole).update(out)
    return tiled, whole


def not_run(sig: Signature, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A stage given an empty list (a request without references) is not run: its outputs are zeros, their sizes
    those of its inputs (the list's dim 0). The family's networks agree: nothing aggregated over no photos adds
    nothing."""
    sizes: dict[str, int] = {}
    for spec in sig.inputs:
        for size, dim in zip(feeds[spec.name].shape, spec.shape):
            if isinstance(dim, str):
                factor, name = parse_dim(dim)
                sizes.setdefault(name, int(size) // factor)
    device = next(iter(feeds.values())).device
    return {t.name: torch.zeros(t.resolve(sizes), device=device) for t in sig.outputs}


def decode(model: ModelFamily, run: RunFn, latent: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """(1, C, h, w) -> (1, 3, fh, fw): the decode stage's image."""
    sig = model.signature(model.stages.decode)
    return over_tiles(model, run, sig.name, {sig.inputs[0].name: latent}, tiling)[sig.outputs[0].name]


def finish(decoded: torch.Tensor, lq: torch.Tensor, size: tuple[int, int], color_fix: str) -> NDArray[np.uint8]:
    """Crop decoder output and LQ to the output size, colour-correct, -> (H, W, 3) uint8."""
    h, w = size
    out = decoded[..., :h, :w]
    if lq.shape[-2:] != decoded.shape[-2:]:  # a photo prepared at the latent's sides: bicubic to the output's
        lq = F.interpolate(lq, size=tuple(decoded.shape[-2:]), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
    if color_fix == "adain":
        out = adain(out, lq[..., :h, :w])
    elif color_fix == "wavelet":
        out = wavelet_fix(out, lq[..., :h, :w])
    return to_uint8(out)
