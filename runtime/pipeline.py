"""The super-resolution pipeline: text, LQ, denoise loop, decode. It knows submodules, not backends.

Every tensor between the runners stays on `device`; the per-step CFG combine and scheduler update
are element-wise torch ops next to the latents, so nothing returns to the host inside the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from export.checkpoint import SUBMODULES, Checkpoint
from export.config import LATENT_FACTOR
from export.errors import DiffsrError
from runtime.backends.base import Runner
from runtime.config import PipelineConfig
from runtime.image import adain, pad_to_multiple, to_uint8, upsample
from runtime.scheduler import make_scheduler

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)


@dataclass
class UpscaleResult:
    image: np.ndarray  # (H, W, 3) uint8
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


class Pipeline:
    def __init__(self, runners: Mapping[str, Runner], checkpoint: Checkpoint, device: str = "cpu"):
        missing = [name for name in SUBMODULES if name not in runners]
        if missing:
            raise DiffsrError(f"pipeline needs a runner for every submodule; missing {missing}")
        self.runners, self.checkpoint = runners, checkpoint
        self.tokenizer = checkpoint.tokenizer()
        self.device = torch.device(device)
        self.timings: dict[str, float] = {}

    def run(self, name: str, **feed: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.runners[name].infer(feed)

    def __call__(
        self, image: np.ndarray, config: PipelineConfig | None = None, on_step: StepCallback | None = None
    ) -> UpscaleResult:
        cfg = config or self.checkpoint.defaults
        self.timings = {}
        start = time.perf_counter()

        # 1. Pre-process: bicubic upsample to the output size in [-1, 1]; pad to the UNet's multiple.
        with self.stage("preprocess"):
            lq = upsample(image, cfg.upscale).to(self.device)  # (1, 3, H, W)
            lq_padded = pad_to_multiple(lq, LATENT_FACTOR * self.checkpoint.model.latent_multiple)

        # 2. Text: the prompt, and with CFG the negative prompt first (the batch order of the loop).
        with self.stage("text_encoder"):
            prompts = [cfg.negative_prompt, cfg.prompt] if cfg.cfg else [cfg.prompt]
            ids = torch.from_numpy(self.tokenizer(prompts)).to(self.device)
            text = self.run("text_encoder", input_ids=ids)["text_embeddings"]  # (1 or 2, 77, D)

        # 3. LQ encoder: the fused multi-layer feature f1 and the LQ latent z_lq.
        with self.stage("lq_encoder"):
            lq_out = self.run("lq_encoder", lq_image=lq_padded)
            f1, z_lq = lq_out["f1"], lq_out["z_lq"]  # (1, C1, h, w), (1, 4, h, w)

        # 4. Denoise: seeded noise (drawn on the CPU, so every device starts alike), or noised z_lq.
        scheduler = make_scheduler(cfg.scheduler, self.checkpoint.scheduler_config)
        scheduler.set_timesteps(cfg.steps)
        noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(self.device)
        x = noise if cfg.start == "noise" else scheduler.add_noise(z_lq, noise, scheduler.timesteps[0])
        with self.stage("denoise"):
            for i, t in enumerate(scheduler.timesteps):
                x = self.denoise_step(x, t, f1, text, cfg.guidance_scale, scheduler)
                if on_step is not None:
                    on_step(i + 1, cfg.steps)

        # 5. Decode, crop the padding, correct colours against the upsampled LQ, to uint8.
        with self.stage("vae_decoder"):
            out = self.run("vae_decoder", latent=x)["image"][..., : lq.shape[-2], : lq.shape[-1]]
        with self.stage("postprocess"):
            if cfg.color_fix == "adain":
                out = adain(out, lq)
            rgb = to_uint8(out)
        self.timings["total"] = time.perf_counter() - start
        return UpscaleResult(rgb, dict(self.timings))

    def denoise_step(self, x: torch.Tensor, t: int, f1: torch.Tensor, text: torch.Tensor, guidance: float, scheduler) -> torch.Tensor:
        """One sampler step: f2 from (f1, x_t); eps from ControlNet+UNet with CFG; x_{t-1}."""
        cfg = text.shape[0] == 2
        f2 = self.run("fusion_transformer", f1=f1, sample=x)["f2"]  # shared by both CFG branches
        batch = torch.cat([x, x]) if cfg else x  # (2B or B, 4, h, w)
        timestep = torch.full((batch.shape[0],), float(t), device=x.device)
        eps = self.run("controlnet_unet", sample=batch, timestep=timestep, text_embeddings=text, f2=f2)["noise_pred"]
        if cfg:
            eps_neg, eps_pos = eps.chunk(2)
            eps = eps_neg + guidance * (eps_pos - eps_neg)
        return scheduler.step(eps, t, x)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; on a GPU, wait for its kernels so the number is the stage's own."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
