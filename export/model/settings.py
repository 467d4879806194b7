"""What one upscale request may set: a typed, validated dataclass; a checkpoint stores its defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from diffsr.export.core.configs import dataclass_from_json
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.captioner import MAX_BEAMS, MAX_NEW_TOKENS

DEFAULT_PROMPT = "clean, natural, high quality, rich detail, sharp focus, 8k"
DEFAULT_NEGATIVE_PROMPT = (
    "dotted, noise, blur, lowres, oversmooth, bad anatomy, worst quality, low quality, jpeg artifacts, watermark"
)
CAPTIONS = ("auto", "always", "never")  # when the LQ image's caption prompts the model (runtime/caption.py)
CAPTION_DROP = "blur, blurry, out of focus, noise, noisy, grainy, pixelated, low quality, low resolution, jpeg"
STARTS = ("noise", "lq")  # start the sampler from pure noise, or from z_lq noised to the first step
COLOR_FIXES = ("adain", "wavelet", "none")
TILE_BLENDS = ("ramp", "gaussian", "none")
MAX_STEPS = 1000


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
    color_fix: str = "adain"
    upscale: int = 4
    # tiles over the latent (runtime/tiling.py): side and overlap in latent cells (None: the model's
    # native side, a quarter of it), tiles per submodule call, and the blend ("none" pastes them)
    tile: int | None = None
    tile_overlap: int | None = None
    tile_batch: int = 4
    tile_blend: str = "ramp"
    # the caption (`prompt_of`): "auto" captions when there is no prompt, "always" also after a given prompt
    caption: str = "auto"
    caption_prompt: str = ""  # the captioner's text prompt, which the caption continues (e.g. "a photo of")
    caption_tokens: int = 30  # the most new tokens
    caption_beams: int = 1  # 1: greedy; more: beam search
    caption_drop: str = CAPTION_DROP  # comma-separated words: a caption's sentences naming one are dropped
    caption_suffix: str = DEFAULT_PROMPT  # appended to the caption; the prompt where there is none

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise DiffsrError(f"steps={self.steps} is out of range: use 1 to {MAX_STEPS}")
        if not (math.isfinite(self.guidance_scale) and 1.0 <= self.guidance_scale <= 50.0):
            raise DiffsrError(f"guidance_scale={self.guidance_scale} is out of range: use 1.0 (no CFG) to 50.0")
        if not 0 <= self.seed < 2**63:
            raise DiffsrError(f"seed={self.seed} is out of range: use 0 to 2**63-1")
        if self.tile is not None and self.tile < 1:
            raise DiffsrError(f"tile={self.tile} must be at least 1 latent cell")
        if self.tile_overlap is not None and self.tile_overlap < 0:
            raise DiffsrError(f"tile_overlap={self.tile_overlap} must not be negative")
        if not 1 <= self.tile_batch <= 64:
            raise DiffsrError(f"tile_batch={self.tile_batch} is out of range: use 1 to 64")
        if not 1 <= self.upscale <= 8:
            raise DiffsrError(f"upscale={self.upscale} is out of range: use 1 to 8")
        if not 1 <= self.caption_tokens <= MAX_NEW_TOKENS:
            raise DiffsrError(f"caption_tokens={self.caption_tokens} is out of range: use 1 to {MAX_NEW_TOKENS}")
        if not 1 <= self.caption_beams <= MAX_BEAMS:
            raise DiffsrError(f"caption_beams={self.caption_beams} is out of range: use 1 (greedy) to {MAX_BEAMS}")
        for name, value, choices in (
            ("caption", self.caption, CAPTIONS),
            ("start", self.start, STARTS),
            ("color_fix", self.color_fix, COLOR_FIXES),
            ("tile_blend", self.tile_blend, TILE_BLENDS),
        ):
            if value not in choices:
                raise DiffsrError(f"{name}={value!r} is not supported; choose one of {list(choices)}")

    @property
    def cfg(self) -> bool:
        return self.guidance_scale != 1.0

    def replace(self, **overrides: Any) -> PipelineConfig:
        """A copy with the given fields changed; None means 'keep the default'."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineConfig:
        return dataclass_from_json(cls, data, "pipeline setting")
