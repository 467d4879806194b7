"""The super-resolution pipeline: caption, text, LQ, denoise loop, decode. It asks the model's family which
submodule plays each part and what a step computes; it knows no backend.

Every tensor between the runners stays on `device`; the per-step guidance and scheduler update are
element-wise torch ops next to the latents, so nothing returns to the host inside the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.caption import ImageCaptioner, prompt_of
from diffsr.runtime.cuda_graph import StepGraphs
from diffsr.runtime.image import output_size
from diffsr.runtime.loop import denoise
from diffsr.runtime.schedulers import make_scheduler
from diffsr.runtime.stages import decode, encode_lq, finish, prepare_lq, prompts
from diffsr.runtime.step import StepCallback
from diffsr.runtime.tiling import tiling_for


@dataclass
class UpscaleResult:
    image: np.ndarray  # (H, W, 3) uint8
    prompt: str  # the prompt it was made with (a caption of the image where the prompt policy asked for one)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


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
        self.captioner = None if self.model.captioner is None else ImageCaptioner(self.model.captioner, self.run, device)
        self.timings: dict[str, float] = {}

    def run(self, name: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.runners[name].infer(feed)

    def __call__(
        self, image: np.ndarray, config: PipelineConfig | None = None, on_step: StepCallback | None = None
    ) -> UpscaleResult:
        cfg = config or self.checkpoint.defaults
        model = self.model
        scheduler = make_scheduler(cfg.scheduler, self.checkpoint.scheduler_config)  # a bad name fails before any work
        tiling = tiling_for(model, cfg)
        self.timings = {}
        start = time.perf_counter()

        # 1. Pre-process: bicubic upsample to exactly `upscale` x the input, in [-1, 1]; pad to the model's multiple.
        with self.stage("preprocess"):
            size = output_size(image.shape[0], image.shape[1], cfg.upscale)
            lq = prepare_lq(model, image, cfg.upscale).to(self.device)

        # 2. Caption: the prompt policy's prompt (the LQ image's caption where it asks for one).
        captioner = self.captioner
        if captioner is None:
            prompt = prompt_of(cfg, None)
        else:
            with self.stage("caption"):
                prompt = prompt_of(cfg, lambda: self._caption(captioner, image, cfg))

        # 3. Text: the prompt, and with guidance the negative prompt first (the batch order of the loop); the
        #    family's conditioning of a step (SDXL adds the size micro-conditioning).
        with self.stage("text"):
            ids = {name: torch.from_numpy(v).to(self.device) for name, v in self.tokenizer(prompts(cfg, prompt)).items()}
            cond = model.conditioning(model.encode_text(self.run, ids), size)

        # 4. LQ: the LQ image's latent features (SD: the fused multi-layer feature f1 and the LQ latent z_lq).
        with self.stage("lq"):
            lq_features = encode_lq(model, self.run, lq, tiling)

        # 5. Denoise: the sampler loop on the device, guided (a CUDA graph replay per step, if asked).
        with self.stage("denoise"):
            x = denoise(model, self.run, lq_features, cond, cfg, scheduler, on_step, graphs=self.graphs, tiling=tiling)

        # 6. Decode (over tiles if large); crop the padding, correct colours against the upsampled LQ.
        with self.stage("decode"):
            decoded = decode(model, self.run, x, tiling)
        with self.stage("postprocess"):
            rgb = finish(decoded, lq, size, cfg.color_fix)
        self.timings["total"] = time.perf_counter() - start
        return UpscaleResult(rgb, prompt, dict(self.timings))

    def _caption(self, captioner: ImageCaptioner, image: np.ndarray, cfg: PipelineConfig) -> str:
        """The image's caption; its image part and seconds per token join the timings."""
        caption = captioner(image, cfg)
        self.timings |= captioner.timings
        return caption

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; on a GPU, wait for its kernels so the number is the stage's own."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
