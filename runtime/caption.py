"""Captions on the device: the image graph once, the prefill once, then one fixed-shape decode step per token (the
captioner attachment's runner; `prompts.py` decides when its caption prompts the model).

`run(name, **inputs)` is any backend's call of the captioner's graphs (`export/model/captioner.py`). The cache
is allocated at its full length once (prefix + BOS + prompt + `max_new_tokens`); between steps only the stop
check comes back to the host. Greedy and beam search follow transformers' `generate` (5.x) rule for rule, so a
caption is token for token the reference's:

- greedy: argmax of the last logits; a finished row gets `<pad>`; stop when every row has ended or at
  `max_new_tokens`; `min_new_tokens` bars the end token before then.
- beam search: log-softmax, scores summed along each beam; 2 x `num_beams` candidates a step; a candidate
  ending (the end token, or the last allowed token) ranked among the first `num_beams` joins the finished ones,
  scored sum / (generated length) ** `length_penalty`; the search stops when no running beam can beat the
  worst finished one (`early_stopping` False: judged at the current length; True: as soon as `num_beams` have
  finished); the best finished beam is the caption.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachments.captioner import BOS, CLIP_MEAN, CLIP_STD, MAX_PROMPT, PAD
from diffsr.export.model.attachments.captioner import Captioner as CaptionerSpec
from diffsr.export.model.settings import MAX_BEAMS, MAX_NEW_TOKENS, PipelineConfig

RunFn = Callable[..., Mapping[str, torch.Tensor]]
NEG = -1e9  # the score of an empty slot (transformers' too)


@dataclass(frozen=True)
class CaptionSettings:
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1  # 1: greedy
    length_penalty: float = 1.0
    early_stopping: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise DiffsrError(f"max_new_tokens={self.max_new_tokens} is out of range: use 1 to {MAX_NEW_TOKENS}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise DiffsrError(f"min_new_tokens={self.min_new_tokens} must be 0 to max_new_tokens")
        if not 1 <= self.num_beams <= MAX_BEAMS:
            raise DiffsrError(f"num_beams={self.num_beams} is out of range: use 1 (greedy) to {MAX_BEAMS}")


def pixel_values(rgb: NDArray[np.uint8], size: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size) float32 as BLIP-2's image processor makes them: Pillow's bicubic
    resize to a square, scaled to [0, 1], normalised with CLIP's mean and deviation."""
    img = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1))[None]


class CaptionLoop:
    """Captions of a batch of images (token ids) through a backend's `run` (`spec`: the captioner's end-of-caption
    token, its prefix length and its graphs' longest cache)."""

    def __init__(self, run: RunFn, spec: CaptionerSpec):
        self.run, self.eos, self.cache_limit, self.prefix_length = run, spec.eos, spec.cache_limit, spec.num_query_tokens
        self.cancelled: Callable[[], bool] | None = None

    def __call__(self, pixels: torch.Tensor, prompt_ids: list[int], settings: CaptionSettings,
                 cancelled: Callable[[], bool] | None = None) -> list[list[int]]:
        """Token ids of each image's caption (without BOS, prompt or padding, the end token kept if reached);
        `cancelled` is checked before every decode step."""
        if len(prompt_ids) > MAX_PROMPT:
            raise DiffsrError(f"a caption prompt of {len(prompt_ids)} tokens is too long: at most {MAX_PROMPT}")
        start = self.prefix_length + 1 + len(prompt_ids)
        length = start + settings.max_new_tokens
        if length > self.cache_limit:
            raise DiffsrError(f"a caption needs {length} positions (prefix, prompt, max_new_tokens); the captioner "
                              f"has {self.cache_limit}")
        self.cancelled = cancelled
        prefix = self.run("caption_image", pixel_values=pixels)["prefix"]
        rows, n_beams = prefix.shape[0], settings.num_beams
        ids = torch.tensor([[BOS, *prompt_ids]], dtype=torch.int32, device=prefix.device).expand(rows, -1)
        if n_beams > 1:  # every beam starts as its image's rows
            prefix, ids = prefix.repeat_interleave(n_beams, 0), ids.repeat_interleave(n_beams, 0)
        mask = torch.zeros(prefix.shape[0], length, dtype=torch.int32, device=prefix.device)
        mask[:, :start] = 1
        out = self.run("caption_prefill", prefix=prefix, input_ids=ids, attention_mask=mask)
        search = self._greedy if n_beams == 1 else self._beams
        return search(out, mask, start, rows, settings)

    def _step(self, tokens: torch.Tensor, position: int, mask: torch.Tensor,
              cache: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.cancelled is not None and self.cancelled():
            raise DiffsrError("cancelled while captioning")
        mask[:, position] = 1
        positions = torch.full_like(tokens, position)
        return self.run("caption_decode", input_ids=tokens, position_ids=positions, attention_mask=mask,
                        past_keys=cache["keys"], past_values=cache["values"])

    def _greedy(self, out: Mapping[str, torch.Tensor], mask: torch.Tensor, start: int, rows: int,
                s: CaptionSettings) -> list[list[int]]:
        done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
        tokens = []
        for t in range(s.max_new_tokens):
            logits = out["logits"].float()
            if t < s.min_new_tokens:
                logits[:, self.eos] = -torch.inf
            token = torch.where(done, PAD, logits.argmax(-1)).int()
            tokens.append(token)
            done |= token == self.eos
            if bool(done.all()) or t + 1 == s.max_new_tokens:  # the one host round trip of a step
                break
            out = self._step(token[:, None], start + t, mask, out)
        table = torch.stack(tokens, 1).tolist()
        return [_trim(row, self.eos) for row in table]

    def _beams(self, out: Mapping[str, torch.Tensor], mask: torch.Tensor, start: int, rows: int,
               s: CaptionSettings) -> list[list[int]]:
        nb, device = s.num_beams, mask.device
        keep = 2 * nb
        running = torch.full((rows, nb, s.max_new_tokens), PAD, dtype=torch.int32, device=device)
        scores = torch.full((rows, nb), NEG, device=device)
        scores[:, 0] = 0.0  # the first step expands one beam of identical rows
        finished = torch.full((rows, nb, s.max_new_tokens), PAD, dtype=torch.int32, device=device)
        finished_scores = torch.full((rows, nb), NEG, device=device)
        finished_lengths = torch.zeros(rows, nb, dtype=torch.int64, device=device)
        improvable = torch.ones(rows, 1, dtype=torch.bool, device=device)
        rank = torch.arange(keep, device=device)[None] < nb
        for t in range(s.max_new_tokens):
            logp = torch.log_softmax(out["logits"].float(), -1)
            if t < s.min_new_tokens:
                logp[:, self.eos] = -torch.inf
            vocab = logp.shape[-1]
            total = (logp.view(rows, nb, vocab) + scores[:, :, None]).view(rows, -1)
            top, index = torch.topk(total, keep)
            parent, token = index // vocab, index % vocab
            candidates = torch.take_along_dim(running, parent[:, :, None], 1).clone()
            candidates[:, :, t] = token.int()
            ends = (token == self.eos) | (t + 1 >= s.max_new_tokens)
            # the next running beams: the best candidates that did not end
            chosen = torch.topk(top + ends.float() * NEG, nb)[1]
            running = torch.take_along_dim(candidates, chosen[:, :, None], 1)
            scores = torch.take_along_dim(top + ends.float() * NEG, chosen, 1)
            parents = torch.take_along_dim(parent, chosen, 1)
            # the finished: candidates that ended among the first nb, length-normalised, merged with the kept ones
            normalised = top / (t + 1) ** s.length_penalty
            closed = ~improvable
            if s.early_stopping:
                closed |= (finished_scores > NEG / 2).all(-1, keepdim=True)
            normalised = torch.where(ends & rank & ~closed, normalised, NEG)
            merged = torch.cat([finished_scores, normalised], 1)
            best = torch.topk(merged, nb)[1]
            finished_scores = torch.take_along_dim(merged, best, 1)
            finished = torch.take_along_dim(torch.cat([finished, candidates], 1), best[:, :, None], 1)
            lengths = torch.cat([finished_lengths, torch.full((rows, keep), t + 1, device=device)], 1)
            finished_lengths = torch.take_along_dim(lengths, best, 1)
            # can a running beam still beat the worst finished one?
            full = (finished_scores > NEG / 2).all(-1, keepdim=True)
            worst = torch.where(full, finished_scores.min(1, keepdim=True)[0], torch.tensor(NEG, device=device))
            improvable &= (scores[:, :1] / (t + 1) ** s.length_penalty > worst).any(-1, keepdim=True)
            if not bool(improvable.any()) or (s.early_stopping and bool(full.all())) or bool(ends.all()):
                break
            rows_of = (parents + torch.arange(rows, device=device)[:, None] * nb).view(-1)
            cache = {"keys": out["keys"].index_select(1, rows_of), "values": out["values"].index_select(1, rows_of)}
            out = self._step(running[:, :, t].reshape(-1, 1), start + t, mask, cache)
        best_tokens, best_lengths = finished[:, 0].tolist(), finished_lengths[:, 0].tolist()
        return [row[:n] for row, n in zip(best_tokens, best_lengths)]


def _trim(row: list[int], eos: int) -> list[int]:
    """A greedy row up to and with its end token; the padding after it dropped."""
    return row[: row.index(eos) + 1] if eos in row else row


class ImageCaptioner:
    """A checkpoint's captioner on a backend's `run`: an (H, W, 3) uint8 image -> its caption, as text (the new
    tokens only, as transformers' `batch_decode` of them gives it). `timings` holds the last caption's image
    part and its mean seconds per decode step (each step ends in the stop check, which waits for the device)."""

    def __init__(self, spec: CaptionerSpec, run: RunFn, device: torch.device | str = "cpu"):
        self.spec, self.device, self.run = spec, torch.device(device), run
        self.loop = CaptionLoop(self._timed, spec)
        self.tokens = 0  # new tokens made so far (for the metrics)
        self.timings: dict[str, float] = {}
        self._spent: dict[str, list[float]] = {}

    def _timed(self, name: str, **feed: torch.Tensor) -> Mapping[str, torch.Tensor]:
        start = time.perf_counter()
        out = self.run(name, **feed)
        self._spent.setdefault(name, []).append(time.perf_counter() - start)
        return out

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.spec.path))

    def __call__(self, rgb: NDArray[np.uint8], cfg: PipelineConfig, cancelled: Callable[[], bool] | None = None) -> str:
        pixels = pixel_values(rgb, self.spec.image_size).to(self.device)
        prompt_ids = self.tokenizer(cfg.caption_prompt, add_special_tokens=False).input_ids if cfg.caption_prompt else []
        settings = CaptionSettings(max_new_tokens=cfg.caption_tokens, num_beams=cfg.caption_beams)
        self._spent = {}
        (ids,) = self.loop(pixels, prompt_ids, settings, cancelled)
        self.tokens += len(ids)
        steps = self._spent.get("caption_decode", [])
        self.timings = {"caption_image": sum(self._spent["caption_image"]),
                        "caption_token": sum(steps) / len(steps) if steps else 0.0}
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()
