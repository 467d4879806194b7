"""The request's texts, and the attachment that writes them (an image-to-text model: the LLaVA prompter, a captioner)
at run time.

`PROMPTERS` gives each kind of attachment its runner (`Prompter`: photo, settings, a slot's instruction -> the text
it writes). A family names the texts a prompter may write (`ModelFamily.prompt_slots`: the prompt; XPSR's low-level
prompt too); the prompt policy (`slot_text`) decides, slot by slot, when the prompter's text is used:
`caption="auto"` when the request gives none of its own, `"always"` after the given one, `"never"`. `request_texts`
makes every text a family's token ids are made from: the slots, the negative prompt and the family's other texts.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.typing import NDArray

from diffsr.export.model.attachment import Attachment
from diffsr.export.model.attachments.captioner import Captioner
from diffsr.export.model.attachments.prompter import Prompter as LlavaSpec
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.inputs import PromptSlot
from diffsr.export.model.parts import RunFn
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.caption import ImageCaptioner
from diffsr.runtime.prompter import LlavaPrompter

Cancelled = Callable[[], bool] | None


class Prompter(Protocol):
    """An attachment's runner: (H, W, 3) uint8 photo, settings, a slot's instruction (None: the request's
    `caption_prompt`), cancel check -> its text. `timings`: the last call's parts in seconds; `tokens`: tokens made so
    far (for the metrics)."""

    timings: dict[str, float]
    tokens: int

    def __call__(self, rgb: NDArray[np.uint8], cfg: PipelineConfig, instruction: str | None = None,
                 cancelled: Cancelled = None) -> str: ...


# each kind of attachment's runner: (its spec with its folder, a backend's run, the device) -> Prompter
PROMPTERS: dict[type[Attachment], Callable[[Any, RunFn, torch.device | str], Prompter]] = {
    Captioner: ImageCaptioner, LlavaSpec: LlavaPrompter}


def make_prompter(model: ModelFamily, run: RunFn, device: torch.device | str, root: Path) -> Prompter | None:
    """The runner of the model's attachment that writes its texts (None: it has none), on a backend's `run`; `root`
    holds its folder (a checkpoint, or a Triton model's copy of its files)."""
    spec = model.prompter()
    if spec is None:
        return None
    return PROMPTERS[type(spec)](dataclasses.replace(spec, path=root / spec.folder), run, device)  # type: ignore[type-var]


Write = Callable[[PromptSlot], str]


def request_texts(model: ModelFamily, cfg: PipelineConfig, write: Write | None,
                  words: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every text of a request: each prompt slot under the policy (`write(slot)` makes the prompter's text; None: the
    model has no prompter; `words`: what the family's prompting stages said, by slot), the negative prompt, the
    family's other text inputs (not given: their defaults)."""
    declared = {i.name for i in model.family_inputs() if i.kind == "text"}
    texts = {"negative_prompt": cfg.negative_prompt}
    texts |= {k: v or "" for k, v in model.input_values(cfg).items() if k in declared}
    prompter = model.prompter()
    for slot in model.prompt_slots():
        typed = cfg.prompt if slot.text == "prompt" else cfg.inputs.get(slot.text)
        default = cfg.caption_suffix if slot.text == "prompt" else texts.get(slot.text, "")
        written = None
        if write is not None and prompter is not None and prompter.writes_slot(slot):
            written = functools.partial(write, slot)
        texts[slot.text] = slot_text(slot, cfg, typed, default, written, (words or {}).get(slot.text, ""))
    return texts


def used_prompts(model: ModelFamily, texts: dict[str, str]) -> dict[str, str]:
    """The prompt slots' texts a request ran with, by slot (what a response returns)."""
    return {slot.text: texts[slot.text] for slot in model.prompt_slots()}


def wants_caption(cfg: PipelineConfig, typed: str | None = None) -> bool:
    """Whether a slot's text is (or includes) the prompter's: "auto" when the request gives none, "always"."""
    return cfg.caption == "always" or (cfg.caption == "auto" and typed is None)


def slot_text(slot: PromptSlot, cfg: PipelineConfig, typed: str | None, default: str,
              written: Callable[[], str] | None, words: str = "") -> str:
    """A slot's text under the policy. `written()` makes the prompter's (None: the checkpoint has none for this slot;
    `requests.check` refuses caption="always" without any). A given text always stays: with `caption="always"` the
    written one follows it after a comma. A cleaned slot's written text is completed by `caption_suffix`
    (`clean_caption`); with no text given and none written, the default (the prompt's: the suffix alone).

    `words` (what the family's prompting stages said: SISRM's label words) join every prompt: the given text, the
    written one, the words, then the suffix (a cleaned slot's), comma-separated."""
    made = None
    if wants_caption(cfg, typed) and written is not None:
        made = written()
        made = clean_caption(made, cfg.caption_drop, "" if words else cfg.caption_suffix) if slot.cleaned \
            else " ".join(made.split())
    if words:
        suffix = cfg.caption_suffix if slot.cleaned else ""
        return ", ".join(p for p in (typed, made, words, suffix.strip()) if p)
    if made is None:
        return typed if typed is not None else default
    return made if typed is None else ", ".join(p for p in (typed, made) if p)


def prompt_of(cfg: PipelineConfig, caption: Callable[[], str] | None) -> str:
    """The prompt a request runs with (the prompt slot alone; `caption()` makes the photo's caption, None: no
    prompter). With no prompt and no caption: the suffix alone (by default `DEFAULT_PROMPT`, what a checkpoint
    without a prompter is prompted with)."""
    return slot_text(PromptSlot("prompt"), cfg, cfg.prompt, cfg.caption_suffix, caption)


def clean_caption(text: str, drop: str, suffix: str) -> str:
    """A caption as a prompt, as the published SR pipelines make it: its sentences that name a degradation (a
    word of `drop`, comma-separated, whole words, any case) dropped, the final full stop removed, `suffix`
    appended after a comma."""
    words = [w.strip().lower() for w in drop.split(",") if w.strip()]
    names = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b") if words else None
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+|\n", text) if x.strip()]
    kept = [x for x in sentences if names is None or not names.search(x.lower())]
    return ", ".join(p for p in (" ".join(kept).rstrip(" ."), suffix.strip()) if p)
