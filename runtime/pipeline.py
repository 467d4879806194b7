"""The super-resolution pipeline: text, LQ, denoise loop, decode. It knows submodules, not backends.

Every tensor between the runners stays on `device`; the per-step CFG combine and scheduler update
are element-wise torch ops next to the latents, so nothing returns to the host inside the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from export.config import LATENT_FACTOR
from export.errors import DiffsrError
from export.signatures import SUBMODULES
from runtime.backends.base import Runner
from runtime.config import PipelineConfig
from runtime.image import adain, output_size, pad_to_multiple, to_uint8, upsample
from runtime.scheduler import make_scheduler

if TYPE_CHECKING:
    from export.checkpoint import Checkpoint

StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
RunFn = Callable[..., dict[str, torch.Tensor]]  # run(submodule, **inputs) -> outputs


@dataclass
class UpscaleResult:
    image: np.ndarray  # (H, W, 3) uint8
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


class Pipeline:
    def __init__(self, runners: Mapping[str, Runner], checkpoint: "Checkpoint", device: str = "cpu"):
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
            size = output_size(image.shape[0], image.shape[1], cfg.upscale)
            lq = prepare_lq(image, cfg.upscale, self.checkpoint.model.latent_multiple).to(self.device)

        # 2. Text: the prompt, and with CFG the negative prompt first (the batch order of the loop).
        with self.stage("text_encoder"):
            ids = torch.from_numpy(self.tokenizer(prompts(cfg))).to(self.device)
            text = self.run("text_encoder", input_ids=ids)["text_embeddings"]  # (1 or 2, 77, D)

        # 3. LQ encoder: the fused multi-layer feature f1 and the LQ latent z_lq.
        with self.stage("lq_encoder"):
            lq_out = self.run("lq_encoder", lq_image=lq)
            f1, z_lq = lq_out["f1"], lq_out["z_lq"]  # (1, C1, h, w), (1, 4, h, w)

        # 4. Denoise: the sampler loop, on the device, with CFG.
        with self.stage("denoise"):
            x = denoise(self.run, f1, z_lq, text, cfg, self.checkpoint.scheduler_config, on_step)

        # 5. Decode; crop the padding, correct colours against the upsampled LQ, to uint8.
        with self.stage("vae_decoder"):
            decoded = self.run("vae_decoder", latent=x)["image"]
        with self.stage("postprocess"):
            rgb = finish(decoded, lq, size, cfg.color_fix)
        self.timings["total"] = time.perf_counter() - start
        return UpscaleResult(rgb, dict(self.timings))

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; on a GPU, wait for its kernels so the number is the stage's own."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def prepare_lq(image: np.ndarray, scale: int, latent_multiple: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, sH', sW') in [-1, 1], replicate-padded to the UNet's multiple."""
    return pad_to_multiple(upsample(image, scale), LATENT_FACTOR * latent_multiple)


def prompts(cfg: PipelineConfig) -> list[str]:
    """The text batch: with CFG the negative prompt first, as the loop's latent batch is ordered."""
    return [cfg.negative_prompt, cfg.prompt] if cfg.cfg else [cfg.prompt]


def finish(decoded: torch.Tensor, lq: torch.Tensor, size: tuple[int, int], color_fix: str) -> np.ndarray:
    """Crop decoder output and LQ to the output size, colour-correct, -> (H, W, 3) uint8."""
    h, w = size
    out = decoded[..., :h, :w]
    if color_fix == "adain":
        out = adain(out, lq[..., :h, :w])
    return to_uint8(out)


def denoise(
    run: RunFn, f1: torch.Tensor, z_lq: torch.Tensor, text: torch.Tensor, cfg: PipelineConfig,
    scheduler_config: dict[str, Any], on_step: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The sampler: seeded noise (drawn on the CPU, so every device starts alike) or noised z_lq,
    then `cfg.steps` steps. Shared by the pipeline and the Triton sampler model."""
    scheduler = make_scheduler(cfg.scheduler, scheduler_config)
    scheduler.set_timesteps(cfg.steps)
    noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(z_lq.device)
    x = noise if cfg.start == "noise" else scheduler.add_noise(z_lq, noise, scheduler.timesteps[0])
    for i, t in enumerate(scheduler.timesteps):
        if cancelled is not None and cancelled():
            raise DiffsrError(f"cancelled after {i} of {cfg.steps} steps")
        # f2 from (f1, x_t), shared by both CFG branches; eps from ControlNet + UNet; x_{t-1}
        f2 = run("fusion_transformer", f1=f1, sample=x)["f2"]
        batch = torch.cat([x, x]) if text.shape[0] == 2 else x  # (negative, positive)
        timestep = torch.full((batch.shape[0],), float(t), device=x.device)
        eps = run("controlnet_unet", sample=batch, timestep=timestep, text_embeddings=text, f2=f2)["noise_pred"]
        if text.shape[0] == 2:
            eps_neg, eps_pos = eps.chunk(2)
            eps = eps_neg + cfg.guidance_scale * (eps_pos - eps_neg)
        x = scheduler.step(eps, t, x)
        if on_step is not None:
            on_step(i + 1, cfg.steps)
    return x
