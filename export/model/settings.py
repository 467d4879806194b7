"""What one upscale request carries: the settings (a typed, validated dataclass whose defaults a checkpoint stores), the
base request inputs every model takes, and the parsed request itself (`Request`: the photo, the settings, the
family's other photos).

The base inputs' limits are declared once, in `BASE_INPUTS`; `PipelineConfig` checks its fields against them, so a
`diffsr.json`, a command line and the endpoint are held to the same ranges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from diffsr.export.core.configs import dataclass_from_json
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.inputs import RequestInput

DEFAULT_PROMPT = "clean, natural, high quality, rich detail, sharp focus, 8k"
DEFAULT_NEGATIVE_PROMPT = (
    "dotted, noise, blur, lowres, oversmooth, bad anatomy, worst quality, low quality, jpeg artifacts, watermark"
)
CAPTIONS = ("auto", "always", "never")  # when a prompter (a captioner) writes the prompt: runtime/prompts.py
CAPTION_DROP = "blur, blurry, out of focus, noise, noisy, grainy, pixelated, low quality, low resolution, jpeg"
STARTS = ("noise", "lq")  # start the sampler from pure noise, or from z_lq noised to the first step
COLOR_FIXES = ("adain", "wavelet", "none")
TILE_BLENDS = ("ramp", "gaussian", "none")
MAX_STEPS = 1000
MAX_BEAMS = 5  # a caption's beams: LAVIS's captioning default, and the most the captioner's graphs' profiles hold
MAX_NEW_TOKENS = 128  # a caption's tokens at most

# Every model's request inputs; a family adds its own (`ModelFamily.family_inputs`). All but the photo are
# `PipelineConfig` fields of the same name: absent from a request, they are the checkpoint's.
BASE_INPUTS = (
    RequestInput("image", "photo", "the low-quality photo (PNG or JPEG, any size and mode): the output is exactly "
                 "`upscale` times its size", required=True, tiled=True, tensor="photo"),  # named by the family's stages
    RequestInput("prompt", "text", "the prompt (default: the checkpoint's, or the photo's caption where it has a "
                 "captioner or a prompter)"),
    RequestInput("negative_prompt", "text", "the negative prompt of classifier-free guidance"),
    RequestInput("steps", "int", "denoising steps", low=1, high=MAX_STEPS, dtype="int32"),
    RequestInput("guidance_scale", "float", "classifier-free guidance scale (1.0: no guidance)", low=1.0, high=50.0,
                 dtype="float32", flag="guidance"),
    RequestInput("seed", "int", "the starting noise's seed", low=0, high=2**63 - 1, dtype="int64"),
    RequestInput("scheduler", "choice", "the sampler (`diffsr families` lists each family's)"),
    RequestInput("caption", "choice", "when the photo's caption prompts the model: auto (when no prompt is given), "
                 "always (after a given prompt) or never", choices=CAPTIONS),
)
SETTING_INPUTS = {i.name: i for i in BASE_INPUTS if i.kind not in ("photo", "photos")}


@dataclass(frozen=True)
class PipelineConfig:
    # None: no prompt given, so the LQ image's caption where the checkpoint has a captioner, completed by
    # `caption_suffix`; without one, the suffix alone (DEFAULT_PROMPT by default)
    prompt: str | None = None
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    steps: int = 20
    guidance_scale: float = 5.5  # 1.0 runs no negative branch
    seed: int = 0
    scheduler: str = "ddim"  # a name of the runtime's scheduler registry (`runtime.schedulers`), checked there
    start: str = "noise"
    # start "lq": the LQ latent noised to the first step, then noised again to this training timestep (XPSR's 800)
    added_noise_level: int | None = None
    color_fix: str = "adain"
    upscale: int = 4
    # tiles over the latent (runtime/tiling.py): side and overlap in latent cells (None: the model's
    # native side, a quarter of it), tiles per submodule call, and the blend ("none" pastes them)
    tile: int | None = None
    tile_overlap: int | None = None
    tile_batch: int = 4
    tile_blend: str = "ramp"
    # the caption (`runtime.prompts`): "auto" captions when there is no prompt, "always" also after a given prompt
    caption: str = "auto"
    caption_prompt: str = ""  # the captioner's text prompt, which the caption continues (e.g. "a photo of")
    caption_tokens: int = 30  # the most new tokens
    caption_beams: int = 1  # 1: greedy; more: beam search
    caption_drop: str = CAPTION_DROP  # comma-separated words: a caption's sentences naming one are dropped
    caption_suffix: str = DEFAULT_PROMPT  # appended to the caption; the prompt where there is none
    # the family's own request inputs (name -> value) where the checkpoint sets them (`ModelFamily.family_inputs`)
    inputs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, declared in SETTING_INPUTS.items():
            value = getattr(self, name)
            if value is not None or name != "prompt":
                declared.check(value)
        if self.added_noise_level is not None and not 0 <= self.added_noise_level < MAX_STEPS:
            raise DiffsrError(f"added_noise_level={self.added_noise_level} is out of range: use 0 to {MAX_STEPS - 1}")
        if self.tile is not None and self.tile < 1:
            raise DiffsrError(f"tile={self.tile} must be at least 1 latent cell")
        if self.tile_overlap is not None and self.tile_overlap < 0:
            raise DiffsrError(f"tile_overlap={self.tile_overlap} must not be negative")
        for name, value, low, high in (("tile_batch", self.tile_batch, 1, 64), ("upscale", self.upscale, 1, 8),
                                       ("caption_tokens", self.caption_tokens, 1, MAX_NEW_TOKENS),
                                       ("caption_beams", self.caption_beams, 1, MAX_BEAMS)):
            if not low <= value <= high:
                raise DiffsrError(f"{name}={value} is out of range: use {low} to {high}")
        for name, text, choices in (("start", self.start, STARTS), ("color_fix", self.color_fix, COLOR_FIXES),
                                    ("tile_blend", self.tile_blend, TILE_BLENDS)):
            if text not in choices:
                raise DiffsrError(f"{name}={text!r} is not supported; choose one of {list(choices)}")

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def replace(self, **overrides: Any) -> PipelineConfig:
        """A copy with the given fields changed; None means 'keep the default'."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not data["inputs"]:  # a family without inputs of its own writes what it always wrote
            del data["inputs"]
        return data

    @classmethod
    def parsed(cls, data: dict[str, Any]) -> PipelineConfig:
        """Settings a request's parse already made and checked (`to_json`'s), taken as they are: the ensemble's
        sampler reads its preprocessing's, and re-parses nothing."""
        config = object.__new__(cls)
        for f in dataclasses.fields(cls):
            value = data.get(f.name, f.default if f.default is not dataclasses.MISSING else {})
            object.__setattr__(config, f.name, tuple(value) if isinstance(value, list) else value)
        return config

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineConfig:
        config: PipelineConfig = dataclass_from_json(cls, data, "pipeline setting")
        return config


@dataclass(frozen=True)
class Request:
    """One upscale request, parsed and validated at the edge (`runtime.requests.parse_request`): what runs past the
    edge trusts it. `photos`: the family's other photo inputs, by name, each a tuple of (H, W, 3) uint8 images; its
    other inputs' values are in `settings.inputs`."""

    photo: NDArray[np.uint8]  # (H, W, 3)
    settings: PipelineConfig = PipelineConfig()
    photos: Mapping[str, tuple[NDArray[np.uint8], ...]] = field(default_factory=dict)
