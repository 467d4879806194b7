"""The endpoint's own metrics, on Triton's metrics port beside its built-in ones (python backend's
`MetricFamily`; scraped from `/metrics`):

    diffsr_step_seconds            histogram: one denoising step (every tile of it), per request
    diffsr_steps_total             counter: denoising steps run
    diffsr_requests_cancelled_total  counter: requests stopped by their client's cancel
    diffsr_requests_rejected_total   counter: requests refused as the client's fault (INVALID_ARGUMENT)
    diffsr_output_pixels_total     counter: pixels of the images returned
    diffsr_caption_seconds         histogram: one caption (image graph, prefill, every decode step)
    diffsr_caption_tokens_total    counter: caption tokens made (tokens/s: its rate over the seconds' sum's)

The last two are named after the part of the model's prompt writer: `caption` for a BLIP-2 captioner,
`prompter` for a LLaVA prompter (`diffsr_prompter_seconds`: one prompt slot's text; `diffsr_prompter_tokens_total`).

Each carries the label `model` (the model that runs the loop)."""

from __future__ import annotations

import time
from collections.abc import Callable

import triton_python_backend_utils as pb_utils

STEP_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]  # seconds: CPU tiny to SDXL tiles
CAPTION_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]  # seconds: the tiny ones to a 7B on a CPU


class Metrics:
    """`writer`: the part of the model's prompt writer (an attachment's `part`: caption, prompter)."""

    def __init__(self, model: str, writer: str = "caption"):
        labels = {"model": model}

        def counter(name: str, description: str):  # type: ignore[no-untyped-def]
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.COUNTER)
            self._families.append(family)
            return family.Metric(labels=labels)

        def histogram(name: str, description: str, buckets: list[float]):  # type: ignore[no-untyped-def]
            family = pb_utils.MetricFamily(name=name, description=description, kind=pb_utils.MetricFamily.HISTOGRAM)
            self._families.append(family)
            return family.Metric(labels=labels, buckets=buckets)

        self._families: list = []  # kept alive as long as their metrics
        self.step = histogram("diffsr_step_seconds", "seconds per denoising step", STEP_BUCKETS)
        self.caption = histogram(f"diffsr_{writer}_seconds", f"seconds per {writer} text", CAPTION_BUCKETS)
        self.caption_tokens = counter(f"diffsr_{writer}_tokens_total", f"{writer} tokens made")
        self.steps = counter("diffsr_steps_total", "denoising steps run")
        self.cancelled = counter("diffsr_requests_cancelled_total", "requests stopped by their client's cancel")
        self.rejected = counter("diffsr_requests_rejected_total", "requests refused as the client's fault")
        self.pixels = counter("diffsr_output_pixels_total", "pixels of the images returned")

    def step_timer(self, steps: int) -> Callable[[int, int], None]:
        """An `on_step(done, total)` for `runtime.loop.denoise` (which counts tile-steps) that observes
        each whole step's seconds."""
        last = [time.perf_counter()]

        def on_step(done: int, total: int) -> None:
            per_step = max(1, total // max(1, steps))
            if done % per_step == 0:
                now = time.perf_counter()
                self.step.observe(now - last[0])
                self.steps.increment(1)
                last[0] = now

        return on_step
