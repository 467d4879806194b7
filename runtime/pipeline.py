"""The super-resolution pipeline: text, LQ, denoise loop, decode. It knows submodules, not backends.

Every tensor between the runners stays on `device`; the per-step CFG combine and scheduler update
are element-wise torch ops next to the latents, so nothing returns to the host inside the loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.config import LATENT_FACTOR
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.signatures import SUBMODULES
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.image import adain, output_size, pad_to_multiple, to_uint8, upsample
from diffsr.runtime.sampler import RunFn, StepCallback, StepGraphs, conditioning, denoise
from diffsr.runtime.tiling import Blender, Tiling, tiling_for


@dataclass
class UpscaleResult:
    image: np.ndarray  # (H, W, 3) uint8
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, plus "total"


class Pipeline:
    """`cuda_graph`: capture one whole denoising step as a CUDA graph and replay it for every step
    (runners on CUDA whose calls can be captured: PyTorch and TensorRT)."""

    def __init__(self, runners: Mapping[str, Runner], checkpoint: Checkpoint, device: str = "cpu",
                 cuda_graph: bool = False):
        missing = [name for name in SUBMODULES if name not in runners]
        if missing:
            raise DiffsrError(f"pipeline needs a runner for every submodule; missing {missing}")
        self.runners, self.checkpoint = runners, checkpoint
        self.tokenizer = checkpoint.tokenizer()
        self.device = torch.device(device)
        if cuda_graph and self.device.type != "cuda":
            raise DiffsrError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        self.graphs = StepGraphs() if cuda_graph else None
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

        # 2. Text: the prompt, and with CFG the negative prompt first (the batch order of the loop); SDXL
        #    tokenises for both its encoders and adds the size micro-conditioning (time_ids).
        with self.stage("text_encoder"):
            ids = {name: torch.from_numpy(v).to(self.device) for name, v in self.tokenizer(prompts(cfg)).items()}
            text = self.run("text_encoder", **ids)  # text_embeddings (1 or 2, 77, D) [, text_embeds (1 or 2, P)]
            cond = conditioning(self.checkpoint.model, text, size)

        # 3. LQ encoder: the fused multi-layer feature f1 and the LQ latent z_lq, over tiles if large.
        tiling = tiling_for(self.checkpoint.model, cfg)
        with self.stage("lq_encoder"):
            f1, z_lq = encode_lq(self.run, lq, tiling)  # (1, C1, h, w), (1, 4, h, w)

        # 4. Denoise: the sampler loop, on the device, with CFG (a CUDA graph replay per step, if asked).
        with self.stage("denoise"):
            x = denoise(self.run, f1, z_lq, cond, cfg, self.checkpoint.scheduler_config, on_step, graphs=self.graphs,
                        tiling=tiling)

        # 5. Decode (over tiles if large); crop the padding, correct colours against the upsampled LQ.
        with self.stage("vae_decoder"):
            decoded = decode(self.run, x, tiling)
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


def encode_lq(run: RunFn, lq: torch.Tensor, tiling: Tiling) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, H, W) -> f1, z_lq: one call if the latent fits a tile, else tiles of the LQ image
    (8 pixels per latent cell) encoded in batches and blended in the latent."""
    grid = (lq.shape[-2] // LATENT_FACTOR, lq.shape[-1] // LATENT_FACTOR)
    if tiling.tiles(*grid) == 1:
        out = run("lq_encoder", lq_image=lq)
    else:
        out = Blender(tiling, grid, {1}, lq.device)(
            lambda group: run("lq_encoder", lq_image=torch.cat([t.crop(lq, LATENT_FACTOR) for t in group])),
            {"f1": 1, "z_lq": 1})
    return out["f1"], out["z_lq"]


def decode(run: RunFn, latent: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """(1, 4, h, w) -> (1, 3, 8h, 8w): one call if it fits a tile, else tiles of the latent decoded in
    batches and blended in pixels."""
    grid = (latent.shape[-2], latent.shape[-1])
    if tiling.tiles(*grid) == 1:
        return run("vae_decoder", latent=latent)["image"]
    return Blender(tiling, grid, {LATENT_FACTOR}, latent.device)(
        lambda group: run("vae_decoder", latent=torch.cat([t.crop(latent) for t in group])),
        {"image": LATENT_FACTOR})["image"]


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
