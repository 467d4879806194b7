"""The super-resolution pipeline: prepare, prompt, the once-per-request stages, the denoise loop, decode. It asks the
model's family what a request carries and which submodule runs when (`Stages`); it knows no backend, and names no
submodule.

Every tensor between the runners stays on `device`; the per-step guidance and scheduler update are
element-wise torch ops next to the latents, so nothing returns to the host inside the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.inputs import PromptSlot
from diffsr.export.model.settings import Request
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.cuda_graph import StepGraphs
from diffsr.runtime.loop import denoise
from diffsr.runtime.prompts import Write, make_prompter, request_texts, used_prompts
from diffsr.runtime.requests import Plan, check
from diffsr.runtime.stages import decode, finish, prepare, prompting, run_once, token_ids
from diffsr.runtime.step import StepCallback


@dataclass
class UpscaleResult:
    image: np.ndarray  # (H, W, 3) uint8
    prompts: dict[str, str]  # each prompt slot's text it was made with (a caption where the prompt policy asked for one)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"

    @property
    def prompt(self) -> str:
        return self.prompts["prompt"]


class Pipeline:
    """`cuda_graph`: capture one whole denoising step as a CUDA graph and replay it for every step
    (runners on CUDA whose calls can be captured: PyTorch and TensorRT)."""

    def __init__(self, runners: Mapping[str, Runner], checkpoint: Checkpoint, device: str = "cpu",
                 cuda_graph: bool = False):
        self.model = checkpoint.model
        missing = [name for name in self.model.submodules if name not in runners]
        if missing:
            raise DiffsrError(f"pipeline needs a runner for every submodule; missing {missing}")
        self.runners, self.checkpoint = runners, checkpoint
        self.tokenizer = checkpoint.tokenizer()
        self.device = torch.device(device)
        if cuda_graph and self.device.type != "cuda":
            raise DiffsrError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        self.graphs = StepGraphs() if cuda_graph else None
        self.prompter = make_prompter(self.model, self.run, device, checkpoint.path)
        self.timings: dict[str, float] = {}

    def run(self, name: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.runners[name].infer(feed)

    def plan(self, request: Request) -> Plan:
        """The request checked against the model: its scheduler, tiling and output size (one error for every mistake)."""
        return check(self.model, request.settings, self.checkpoint.scheduler_config, request.photo.shape[:2])

    def __call__(self, request: Request, on_step: StepCallback | None = None,
                 cancelled: Callable[[], bool] | None = None, plan: Plan | None = None) -> UpscaleResult:
        """`plan`: the request's checked plan where the caller (a command line) checked it before loading weights."""
        model, cfg = self.model, request.settings
        plan = plan or self.plan(request)  # every mistake fails before any work
        self.timings = {}
        start = time.perf_counter()

        # 1. Pre-process: the photo bicubic x `upscale` in [-1, 1], padded to the model's multiple; the family's
        #    other photos as it declares them, and as its own processors take them.
        with self.stage("preprocess"):
            tensors = prepare(model, request, self.checkpoint.path, self.device)

        # 2. Prompt: the request's texts; an attachment (a prompter, a captioner) writes the family's prompt slots where
        #    the policy asks; the family's prompting stages (SISRM's segmenter) add their words.
        tensors, words = prompting(model, self.run, tensors, cfg, self.checkpoint.path, self.stage)
        texts = request_texts(model, cfg, self._writer(request, cancelled), words)

        # 3. Once per request: the texts' token ids, then the family's stages in order (SD: the text encoder, then
        #    the LQ encoder over tiles); the step's conditioning from the untiled ones, the output size and the
        #    family's own inputs.
        with self.stage(model.token_part()):
            tensors |= token_ids(model, self.tokenizer, texts, cfg.cfg, self.device)
        tiled, once = run_once(model, self.run, tensors, plan.tiling, self.stage)
        cond = model.conditioning(once, plan.size, model.input_values(cfg))

        # 4. Denoise: the sampler loop on the device, guided (a CUDA graph replay per step, if asked).
        with self.stage("denoise"):
            x = denoise(model, self.run, tiled, cond, cfg, plan.scheduler, on_step, cancelled, self.graphs, plan.tiling)

        # 5. Decode (over tiles if large); crop the padding, correct colours against the upsampled photo.
        with self.stage("decode"):
            decoded = decode(model, self.run, x, plan.tiling)
        with self.stage("postprocess"):
            rgb = finish(decoded, tensors[model.stages.photo], plan.size, cfg.color_fix)
        self.timings["total"] = time.perf_counter() - start
        return UpscaleResult(rgb, used_prompts(model, texts), dict(self.timings))

    def _writer(self, request: Request, cancelled: Callable[[], bool] | None) -> Write | None:
        """The prompter's text of the request's photo for a slot, timed as its part (its own parts join the timings);
        None without a prompter."""
        prompter, spec = self.prompter, self.model.prompter()
        if prompter is None or spec is None:
            return None

        def write(slot: PromptSlot) -> str:
            with self.stage(spec.part):
                made = prompter(request.photo, request.settings, slot.instruction, cancelled)
            self.timings |= prompter.timings
            return made

        return write

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; on a GPU, wait for its kernels so the number is the stage's own."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
