"""Text of an image on the device, for the attachments that write prompts: the image graph once, the prefill once, then
one fixed-shape decode step per token (`CaptionLoop`, over any image-to-text model's three graphs: the BLIP-2
captioner's, the LLaVA prompter's), and the captioner's runner (`ImageCaptioner`; `prompts.py` decides when a text
prompts the model, `prompter.py` runs LLaVA).

`run(name, **inputs)` is any backend's call of the graphs (`export/model/attachments/`). The cache is allocated at its
full length once (the prefill's tokens + `max_new_tokens`); between steps only the stop check comes back to the host.
Greedy and beam search follow transformers' `generate` (5.x) rule for rule, so a text is token for token the
reference's:

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
from diffsr.export.model.attachments.captioner import BOS, MAX_PROMPT, PAD
from diffsr.export.model.attachments.clip_vision import CLIP_MEAN, CLIP_STD
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


@dataclass(frozen=True)
class Graphs:
    """An image-to-text model's three graphs, as the loop calls them: their names, the image graph's output the
    prefill takes (`features`), the end and padding tokens, the longest cache, and the positions the features take
    before the prefill's ids (BLIP-2's prefix: 32; LLaVA puts them among the ids: 0)."""

    image: str
    prefill: str
    decode: str
    features: str
    eos: int
    pad: int
    cache_limit: int
    offset: int = 0


class CaptionLoop:
    """Texts of a batch of images (token ids) through a backend's `run` of an image-to-text model's `graphs`."""

    def __init__(self, run: RunFn, graphs: Graphs):
        self.run, self.graphs = run, graphs
        self.eos, self.pad = graphs.eos, graphs.pad
        self.cancelled: Callable[[], bool] | None = None

    def __call__(self, pixels: torch.Tensor, prompt_ids: list[int], settings: CaptionSettings,
                 cancelled: Callable[[], bool] | None = None) -> list[list[int]]:
        """Token ids of each image's text (without the prefill's ids or padding, the end token kept if reached), the
        prefill's ids (`prompt_ids`: BOS and the prompt, LLaVA's image tokens among them) the same for each image;
        `cancelled` is checked before every decode step."""
        g = self.graphs
        start = g.offset + len(prompt_ids)
        length = start + settings.max_new_tokens
        if length > g.cache_limit:
            raise DiffsrError(f"a text needs {length} positions (image, prompt, max_new_tokens); {g.prefill} takes "
                              f"{g.cache_limit}")
        self.cancelled = cancelled
        features = self.run(g.image, pixel_values=pixels)[g.features]
        rows, n_beams = features.shape[0], settings.num_beams
        ids = torch.tensor([prompt_ids], dtype=torch.int32, device=features.device).expand(rows, -1)
        if n_beams > 1:  # every beam starts as its image's rows
            features, ids = features.repeat_interleave(n_beams, 0), ids.repeat_interleave(n_beams, 0)
        mask = torch.zeros(features.shape[0], length, dtype=torch.int32, device=features.device)
        mask[:, :start] = 1
        out = self.run(g.prefill, **{g.features: features}, input_ids=ids, attention_mask=mask)
        search = self._greedy if n_beams == 1 else self._beams
        return search(out, mask, start, rows, settings)

    def _step(self, tokens: torch.Tensor, position: int, mask: torch.Tensor,
              cache: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        if self.cancelled is not None and self.cancelled():
            raise DiffsrError("cancelled while writing the prompt")
        mask[:, position] = 1
        positions = torch.full_like(tokens, position)
        return self.run(self.graphs.decode, input_ids=tokens, position_ids=positions, attention_mask=mask,
                        past_keys=cache["keys"], past_values=cache["values"])

    def _greedy(self, out: Mapping[str, torch.Tensor], mask: torch.Tensor, start: int, rows: int,
                s: CaptionSettings) -> list[list[int]]:
        done = torch.zeros(rows, dtype=torch.bool, device=mask.device)
        tokens = []
        for t in range(s.max_new_tokens):
            logits = out["logits"].float()
            if t < s.min_new_tokens:
                logits[:, self.eos] = -torch.inf
            token = torch.where(done, self.pad, logits.argmax(-1)).int()
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
        running = torch.full((rows, nb, s.max_new_tokens), self.pad, dtype=torch.int32, device=device)
        scores = torch.full((rows, nb), NEG, device=device)
        scores[:, 0] = 0.0  # the first step expands one beam of identical rows
        finished = torch.full((rows, nb, s.max_new_tokens), self.pad, dtype=torch.int32, device=device)
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


def captioner_graphs(spec: CaptionerSpec) -> Graphs:
    """The BLIP-2 captioner's graphs: its 32-query prefix before BOS and the prompt."""
    return Graphs("caption_image", "caption_prefill", "caption_decode", "prefix", spec.eos, PAD, spec.cache_limit,
                  offset=spec.num_query_tokens)


class TextWriter:
    """An image-to-text model on a backend's `run`, the loop timed: `timings` holds the last text's image part
    (`<part>_image`) and its mean seconds per decode step (`<part>_token`; each step ends in the stop check, which
    waits for the device); `tokens` counts the new tokens made so far (for the metrics)."""

    @staticmethod
    def graphs_of(spec: Any) -> Graphs:
        """The attachment's graphs, as the loop calls them (each kind of writer says)."""
        raise NotImplementedError

    def __init__(self, spec: Any, run: RunFn, device: torch.device | str = "cpu"):
        self.spec, self.run, self.device, self.part = spec, run, torch.device(device), spec.part
        self.loop = CaptionLoop(self._timed, type(self).graphs_of(spec))
        self.tokens = 0
        self.timings: dict[str, float] = {}
        self._spent: dict[str, list[float]] = {}

    def _timed(self, name: str, **feed: torch.Tensor) -> Mapping[str, torch.Tensor]:
        start = time.perf_counter()
        out = self.run(name, **feed)
        self._spent.setdefault(name, []).append(time.perf_counter() - start)
        return out

    def write(self, pixels: torch.Tensor, ids: list[int], settings: CaptionSettings,
              cancelled: Callable[[], bool] | None) -> list[int]:
        """One image's new token ids."""
        self._spent = {}
        (made,) = self.loop(pixels.to(self.device), ids, settings, cancelled)
        self.tokens += len(made)
        g = self.loop.graphs
        steps = self._spent.get(g.decode, [])
        self.timings = {f"{self.part}_image": sum(self._spent[g.image]),
                        f"{self.part}_token": sum(steps) / len(steps) if steps else 0.0}
        return made

    @cached_property
    def tokenizer(self) -> Any:
        """The attachment folder's tokenizer."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.spec.path))


class ImageCaptioner(TextWriter):
    """A checkpoint's captioner: an (H, W, 3) uint8 image -> its caption, as text (the new tokens only, as
    transformers' `batch_decode` of them gives it), continuing the request's `caption_prompt` (a captioner takes no
    instruction)."""

    spec: CaptionerSpec
    graphs_of = staticmethod(captioner_graphs)

    def __call__(self, rgb: NDArray[np.uint8], cfg: PipelineConfig, instruction: str | None = None,
                 cancelled: Callable[[], bool] | None = None) -> str:
        prompt_ids = self.tokenizer(cfg.caption_prompt, add_special_tokens=False).input_ids if cfg.caption_prompt else []
        if len(prompt_ids) > MAX_PROMPT:
            raise DiffsrError(f"a caption prompt of {len(prompt_ids)} tokens is too long: at most {MAX_PROMPT}")
        settings = CaptionSettings(max_new_tokens=cfg.caption_tokens, num_beams=cfg.caption_beams)
        ids = self.write(pixel_values(rgb, self.spec.image_size), [BOS, *prompt_ids], settings, cancelled)
        return str(self.tokenizer.decode(ids, skip_special_tokens=True)).strip()
