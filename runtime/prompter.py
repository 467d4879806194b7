"""The LLaVA prompter's runner: a prompt slot's instruction and the LQ photo -> the text it writes, on any backend's
`run` of the prompter's graphs (`export/model/attachments/prompter.py`), decoded as the captioner's are
(`caption.CaptionLoop`: greedy or beam search, token for token transformers' `generate`).

The photo is prepared as the folder's CLIP image processor prepares it (Pillow bicubic of the short side to S, the
centre S x S, CLIP's mean and deviation) and the instruction as `LlavaProcessor` does: put in the folder's chat
template (unless it holds `<image>` itself, as XPSR's high-level question does), `<image>` repeated once per image
token, BOS first. Both are tested equal to the processor's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachments.clip_vision import CLIP_MEAN, CLIP_STD, clip_processing
from diffsr.export.model.attachments.prompter import (
    CHAT_TEMPLATE,
    DEFAULT_INSTRUCTION,
    IMAGE,
    MAX_TEXT,
    parse_template,
)
from diffsr.export.model.attachments.prompter import Prompter as PrompterSpec
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.caption import CaptionSettings, Graphs, TextWriter


def clip_pixels(rgb: NDArray[np.uint8], size: int, crop: int, mean: tuple[float, ...] = CLIP_MEAN,
                std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, crop, crop) float32 as CLIP's image processor makes them: Pillow's bicubic resize of
    the short side to `size` (the long one in proportion, rounded down), the centre `crop` square, [0, 1], normalised.
    A photo over 16 times longer than wide (or wide than long) has only the crop's source region resized (Pillow's
    `box`: the same sampling, within a level of 8 bits), not the whole photo, which took gigabytes at 200,000 px."""
    h, w = rgb.shape[:2]
    nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
    top, left = (nh - crop) // 2, (nw - crop) // 2
    if max(h, w) > 16 * min(h, w):
        sy, sx = h / nh, w / nw
        y0, y1, x0, x1 = top * sy, (top + crop) * sy, left * sx, (left + crop) * sx
        # a window of whole pixels around the region, wider than the kernel's reach (Pillow's box offsets lose
        # precision far from the origin)
        my, mx = math.ceil(2 * max(1.0, sy)) + 1, math.ceil(2 * max(1.0, sx)) + 1
        wy, wx = max(0, math.floor(y0) - my), max(0, math.floor(x0) - mx)
        window = Image.fromarray(rgb[wy: min(h, math.ceil(y1) + my), wx: min(w, math.ceil(x1) + mx)])
        img = np.asarray(window.resize((crop, crop), Image.Resampling.BICUBIC, box=(x0 - wx, y0 - wy, x1 - wx, y1 - wy)),
                         dtype=np.float32)
    else:
        img = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC),
                         dtype=np.float32)[top: top + crop, left: left + crop]
    x = torch.from_numpy(img / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))[None].float()


@dataclass(frozen=True)
class ClipPreparation:
    """A folder's CLIP image processor's settings (the prompter's, the gallery encoder's): a photo -> its pixels."""

    size: int  # the short side's
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, folder: Path, image_size: int) -> ClipPreparation:
        """Read from the folder's image processor settings (`clip_processing`)."""
        return cls(*clip_processing(folder, image_size))

    def __call__(self, rgb: NDArray[np.uint8]) -> torch.Tensor:
        return clip_pixels(rgb, self.size, self.crop, self.mean, self.std)


def prompter_graphs(spec: PrompterSpec) -> Graphs:
    """LLaVA's graphs: the image features among the prefill's ids."""
    return Graphs("prompter_image", "prompter_prefill", "prompter_decode", "image_features", spec.eos, spec.pad,
                  spec.cache_limit)


class LlavaPrompter(TextWriter):
    """A checkpoint's prompter: (H, W, 3) uint8 photo, settings, a slot's instruction -> the text it writes (the new
    tokens, as `batch_decode` gives them, on one line)."""

    spec: PrompterSpec
    graphs_of = staticmethod(prompter_graphs)

    @cached_property
    def template(self) -> str:
        """The folder's chat template (the processor's file, or the tokenizer's), else LLaVA-1.5's."""
        folder = self.spec.path
        for name in ("chat_template.jinja", "chat_template.json"):
            if (folder / name).is_file():
                return parse_template(folder / name)
        return str(getattr(self.tokenizer, "chat_template", None) or CHAT_TEMPLATE)

    @cached_property
    def pixels(self) -> ClipPreparation:
        return ClipPreparation.of(self.spec.path, self.spec.image_size)

    def ids(self, instruction: str) -> list[int]:
        """The prefill's ids: the instruction templated, `<image>` once per image token, BOS first."""
        text = instruction
        if IMAGE not in instruction:
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            text = self.tokenizer.apply_chat_template(chat, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        if text.count(IMAGE) != 1:
            raise DiffsrError(f"a prompter's input takes the photo once; {text!r} holds {text.count(IMAGE)} {IMAGE}")
        ids = list(self.tokenizer(text.replace(IMAGE, IMAGE * self.spec.image_tokens)).input_ids)
        if len(ids) - self.spec.image_tokens > MAX_TEXT:
            raise DiffsrError(f"a prompter instruction of {len(ids) - self.spec.image_tokens} tokens is too long: at "
                              f"most {MAX_TEXT} with its template")
        return ids

    def __call__(self, rgb: NDArray[np.uint8], cfg: PipelineConfig, instruction: str | None = None,
                 cancelled: Callable[[], bool] | None = None) -> str:
        asked = instruction if instruction is not None else (cfg.caption_prompt or DEFAULT_INSTRUCTION)
        settings = CaptionSettings(max_new_tokens=cfg.caption_tokens, num_beams=cfg.caption_beams)
        made = self.write(self.pixels(rgb), self.ids(asked), settings, cancelled)
        return " ".join(str(self.tokenizer.decode(made, skip_special_tokens=True)).split())
