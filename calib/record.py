"""Recording what the real pipeline feeds each submodule: the data the FP16 check and INT8 quantization
decide from.

`calibration_feeds` runs the PyTorch reference pipeline over real photos and prompts, every timestep of
`steps`, with one stage's weights in memory at a time, and keeps a CPU copy of every submodule call's
inputs (`Recorder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from diffsr.calib.data import PHOTOS, PROMPTS, photos, sample_request
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline

Feeds = dict[str, list[dict[str, torch.Tensor]]]  # submodule -> every call's inputs


@dataclass(frozen=True)
class Calibration:
    """The real data the FP16 check runs: each photo (size x size LQ) with each prompt, every timestep
    of `steps`. The default spans every timestep the sampler visits at its default 20 steps."""

    photos: tuple[str, ...] = PHOTOS[:3]
    prompts: tuple[str, ...] = PROMPTS[:2]
    steps: int = 20
    size: int = 64

    def __post_init__(self) -> None:
        unknown = [p for p in self.photos if p not in PHOTOS]
        if not self.photos or unknown:
            raise DiffsrError(f"calibration photos {list(self.photos)} must be one or more of {list(PHOTOS)}")
        if not self.prompts:
            raise DiffsrError("the FP16 check needs at least one calibration prompt")
        if not 1 <= self.steps <= 1000 or not 8 <= self.size <= 1024:
            raise DiffsrError(f"calibration steps={self.steps} (1 to 1000) or size={self.size} (8 to 1024) is out of range")


class Recorder(Runner):
    """Passes calls through to a runner and keeps a CPU copy of every feed."""

    def __init__(self, inner: Runner):
        super().__init__(inner.signature)
        self.inner, self.feeds = inner, []

    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        self.feeds.append({k: v.detach().cpu().clone() for k, v in feed.items()})
        return self.inner.infer(feed)


def record_feeds(
    ckpt: Checkpoint, runners: Mapping[str, Runner], images: Iterable[np.ndarray], prompts: Iterable[str],
    steps: int = 20, on_run: Callable[[], None] | None = None,
) -> Feeds:
    """Every submodule's inputs over full pipeline runs: each image with each prompt, all timesteps."""
    recorders = {name: Recorder(r) for name, r in runners.items()}
    pipe = Pipeline(recorders, ckpt)
    prompts = list(prompts)
    # an attachment that writes the prompts (a prompter, a captioner) is run on every photo, so its graphs are recorded
    caption = "always" if ckpt.model.prompter() is not None else None
    texts = bool(ckpt.model.tokenizer_folders())  # a model without text (refsr) refuses a prompt (settings_errors)
    for i, image in enumerate(images):
        for j, prompt in enumerate(prompts):
            config = ckpt.defaults.replace(prompt=prompt if texts else None, steps=steps, seed=100 * i + j,
                                           caption=caption)
            # the model's native tiles, one a call: batches of several would be ragged (the last batch of tiles
            # smaller), which ONNX Runtime's INT8 calibrators cannot stack (a photo larger than one tile: refsr-tiny's)
            tiles = dataclasses.replace(config, tile=None, tile_overlap=None, tile_batch=1)
            pipe(sample_request(ckpt.model, image, tiles, i))
            if on_run is not None:
                on_run()
    return {name: r.feeds for name, r in recorders.items()}


def calibration_feeds(ckpt: Checkpoint, cal: Calibration, task: str, total: int,
                      on_progress: OnProgress = ignore) -> Feeds:
    """`record_feeds` over the calibration data on the PyTorch reference, a progress event per run (of
    `total` for `task`). Lean runners: one stage's FP32 weights in memory at a time (SDXL's reference does
    not fit twice), all released before the caller loads anything else."""
    runs, done = len(cal.photos) * len(cal.prompts), 0

    def finished_run() -> None:
        nonlocal done
        done += 1
        on_progress(Progress(task, f"calibration run {done}/{runs}", done, total))

    on_progress(Progress(task, "calibration runs", 0, total))
    runners = load_runners("torch", ckpt, lean=True)
    try:
        return record_feeds(ckpt, runners, photos((cal.size, cal.size), cal.photos), cal.prompts, cal.steps,
                            on_run=finished_run)
    finally:
        for runner in runners.values():
            runner.release()
