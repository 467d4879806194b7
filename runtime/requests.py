"""A request, parsed once at the edge and checked once against the model (diffusers' `check_inputs` habit).

    parse_request   raw values by input name (the command line's options, the endpoint's tensors) -> a `Request`:
                    every input held to its declaration (`ModelFamily.request_inputs`), photos decoded, absent
                    settings the checkpoint's
    check           the settings against the model -> the `Plan` they imply: the scheduler (set to the steps), the
                    tiling, the output size (`plan_of`: the same plan of settings already checked, not checked again)

Each mistake is one line naming the input; several mistakes are reported together, one message each. Everything
past the edge (the pipeline, the Triton models) takes the request and its plan as they are, and re-parses nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.inputs import PHOTO_KINDS, RequestInput
from diffsr.export.model.settings import SETTING_INPUTS, PipelineConfig, Request
from diffsr.runtime.image import decode_image, load_image, output_size
from diffsr.runtime.schedulers import make_scheduler
from diffsr.runtime.schedulers.base import Scheduler
from diffsr.runtime.tiling import Tiling, tiling_for

Photo = bytes | str | Path | NDArray[np.uint8]  # encoded bytes, a file, or decoded (H, W, 3) uint8 pixels


@dataclass
class Plan:
    """What checked settings imply: the scheduler set to the request's steps, the tiling, the output's (h, w)."""

    scheduler: Scheduler
    tiling: Tiling
    size: tuple[int, int]


def _photo(value: Photo, what: str) -> NDArray[np.uint8]:
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[2] != 3:
            raise DiffsrError(f"{what}: pixels must be (H, W, 3) uint8, not {value.dtype} {list(value.shape)}")
        return value
    if isinstance(value, bytes):
        return decode_image(value, what)
    return load_image(value)


def _value(declared: RequestInput, raw: Any) -> Any:
    if declared.kind == "photo":
        return _photo(raw, declared.name)
    if declared.kind == "photos":
        photos = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        declared.check(photos)  # the count first: nothing is decoded for a request that sends too many
        return tuple(_photo(p, f"{declared.name}[{i}]") for i, p in enumerate(photos))
    return declared.check(raw)


def parse_request(model: ModelFamily, defaults: PipelineConfig, values: Mapping[str, Any]) -> Request:
    """The request of `values` (None: not given), over the checkpoint's `defaults`. Unknown names, missing required
    inputs, values of the wrong kind or out of range and photos that do not decode are each one message."""
    declared = {i.name: i for i in model.request_inputs()}
    unknown = sorted(k for k, v in values.items() if k not in declared and v is not None)
    errors = [f"this {model.name} model takes no input {name!r} (it takes {list(declared)})" for name in unknown]
    settings: dict[str, Any] = {}
    inputs = dict(defaults.inputs)
    photos: dict[str, tuple[NDArray[np.uint8], ...]] = {}
    for name, spec in declared.items():
        raw = values.get(name)
        if raw is None:
            if spec.required:
                errors.append(f"{name} is required: {spec.help}")
            continue
        try:
            value = _value(spec, raw)
        except DiffsrError as e:
            errors.append(str(e))
            continue
        if spec.kind in PHOTO_KINDS:
            photos[name] = value if spec.kind == "photos" else (value,)
        elif name in SETTING_INPUTS:
            settings[name] = value
        else:
            inputs[name] = value
    if errors:
        raise DiffsrError("; ".join(errors))
    (photo,) = photos.pop("image")
    try:
        return Request(photo, defaults.replace(**settings, inputs=inputs), photos)
    except DiffsrError as e:  # a setting the declaration allows but the settings' own rules refuse
        raise DiffsrError(str(e)) from None


def check(model: ModelFamily, settings: PipelineConfig, scheduler_config: dict[str, Any], photo_size: tuple[int, int],
          max_pixels: int | None = None) -> Plan:
    """The plan of a request's settings for a photo of (height, width): its scheduler, tiling and output size, or one
    error listing every mistake (an output too large, an unknown or unfit scheduler, a bad tiling, a caption asked of
    a checkpoint without a captioner)."""
    errors: list[str] = []
    scheduler = tiling = size = None
    try:
        size = output_size(photo_size[0], photo_size[1], settings.upscale)
        if max_pixels is not None and size[0] * size[1] > max_pixels:
            raise DiffsrError(f"output {size[1]}x{size[0]} is above this server's {max_pixels} pixel limit: send a "
                              "smaller image")
    except DiffsrError as e:
        errors.append(str(e))
    try:
        scheduler = make_scheduler(settings.scheduler, scheduler_config)
        scheduler.set_timesteps(settings.steps)
    except DiffsrError as e:
        errors.append(str(e))
    try:
        tiling = tiling_for(model, settings)
    except DiffsrError as e:
        errors.append(str(e))
    errors += model.settings_errors(settings)
    if errors or scheduler is None or tiling is None or size is None:
        raise DiffsrError("; ".join(errors))
    return Plan(scheduler, tiling, size)


def plan_of(model: ModelFamily, settings: PipelineConfig, scheduler_config: dict[str, Any],
            size: tuple[int, int]) -> Plan:
    """The plan of settings `check` has passed already (the ensemble's sampler: its preprocessing checked them), for
    an output of `size`: made, not checked again."""
    scheduler = make_scheduler(settings.scheduler, scheduler_config)
    scheduler.set_timesteps(settings.steps)
    return Plan(scheduler, tiling_for(model, settings), size)
