"""The request's texts, and the attachments that write them (image-to-text models, a captioner) at run time.

`PROMPTERS` gives each kind of attachment its runner (`Prompter`: photo and settings -> the text it writes); the
prompt policy (`prompt_of`) decides when a prompter's text prompts the model: `caption="auto"` when the request gives
no prompt, `"always"` after the given one, `"never"`. `request_texts` makes every text a family's token ids are made
from: the prompt, the negative prompt and the family's own text inputs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from diffsr.export.model.attachment import Attachment
from diffsr.export.model.attachments.captioner import Captioner
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.parts import RunFn
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.caption import ImageCaptioner

Cancelled = Callable[[], bool] | None


class Prompter(Protocol):
    """An attachment's runner: (H, W, 3) uint8 photo, settings, cancel check -> its text. `timings`: the last call's
    parts in seconds; `tokens`: tokens made so far (for the metrics)."""

    timings: dict[str, float]
    tokens: int

    def __call__(self, rgb: NDArray[np.uint8], cfg: PipelineConfig, cancelled: Cancelled = None) -> str: ...


def _captioner(spec: Any, run: RunFn, device: torch.device | str, folder: Path) -> Prompter:
    return ImageCaptioner(dataclasses.replace(spec, path=folder), run, device)


# each kind of attachment's runner: (its spec, a backend's run, the device, its folder) -> Prompter
PROMPTERS: dict[type[Attachment], Callable[[Any, RunFn, torch.device | str, Path], Prompter]] = {Captioner: _captioner}


def make_prompters(model: ModelFamily, run: RunFn, device: torch.device | str, root: Path) -> dict[str, Prompter]:
    """The model's attachments that write a text, by the text they write, on a backend's `run`; `root` holds their
    folders (a checkpoint, or a Triton model's copy of their files)."""
    return {a.writes: PROMPTERS[type(a)](a, run, device, root / a.folder) for a in model.attachments if a.writes}


def request_texts(model: ModelFamily, cfg: PipelineConfig, write: Callable[[str], str] | None) -> dict[str, str]:
    """Every text of a request: the prompt under the policy (`write("prompt")` makes an attachment's, None: the model
    has none), the negative prompt, the family's own text inputs."""
    texts = {"prompt": prompt_of(cfg, None if write is None else lambda: write("prompt")),
             "negative_prompt": cfg.negative_prompt}
    declared = {i.name for i in model.family_inputs() if i.kind == "text"}
    return texts | {k: v or "" for k, v in model.input_values(cfg).items() if k in declared}  # not given: empty


def wants_caption(cfg: PipelineConfig) -> bool:
    """Whether a request's prompt is (or includes) a caption: "auto" when it gives no prompt, "always"."""
    return cfg.caption == "always" or (cfg.caption == "auto" and cfg.prompt is None)


def prompt_of(cfg: PipelineConfig, caption: Callable[[], str] | None) -> str:
    """The prompt a request runs with. `caption()` makes the LQ image's caption (None: the checkpoint has no
    captioner; `requests.check` refuses caption="always" then). A given prompt always stays: with `caption="always"`
    the caption follows it. The caption is cleaned (`clean_caption`) and completed by `caption_suffix`. With no
    prompt and no caption: the suffix alone (by default `DEFAULT_PROMPT`, what a checkpoint without a captioner is
    prompted with)."""
    if not wants_caption(cfg) or caption is None:
        return cfg.prompt if cfg.prompt is not None else cfg.caption_suffix
    made = clean_caption(caption(), cfg.caption_drop, cfg.caption_suffix)
    return made if cfg.prompt is None else ", ".join(p for p in (cfg.prompt, made) if p)


def clean_caption(text: str, drop: str, suffix: str) -> str:
    """A caption as a prompt, as the published SR pipelines make it: its sentences that name a degradation (a
    word of `drop`, comma-separated, whole words, any case) dropped, the final full stop removed, `suffix`
    appended after a comma."""
    words = [w.strip().lower() for w in drop.split(",") if w.strip()]
    names = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b") if words else None
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+|\n", text) if x.strip()]
    kept = [x for x in sentences if names is None or not names.search(x.lower())]
    return ", ".join(p for p in (" ".join(kept).rstrip(" ."), suffix.strip()) if p)
