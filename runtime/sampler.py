"""The sampler: a seeded start, then `steps` denoising steps that read device tensors only.

A step is f2 from the fusion transformer, eps from ControlNet + UNet with classifier-free guidance,
and the scheduler update. It takes its timestep, guidance scale and scheduler coefficients from a
row of a small device table (`step_table`) rather than from Python floats, so

- eagerly, nothing goes back to the host inside the loop, on any backend;
- on CUDA, one step captured as a CUDA graph (`StepGraph`) replays every step of every request of
  the same shapes: the request's tensors are copied into the graph's static buffers, and a device
  index selects the step's row. Fusion transformer, ControlNet/UNet, CFG and the update are then
  one graph launch per step.

Shared by the in-process pipeline and the Triton sampler model (which passes `cancelled`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from diffsr.export.errors import DiffsrError
from diffsr.export.settings import MAX_STEPS, PipelineConfig
from diffsr.runtime.scheduler import DDIMScheduler, make_scheduler

RunFn = Callable[..., Mapping[str, torch.Tensor]]  # run(submodule, **inputs) -> outputs
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, f1, text, row)
StepCallback = Callable[[int, int], None]  # (steps done, steps in all)
TABLE_COLUMNS = ("timestep", "guidance_scale", "sqrt_a", "sqrt_1_minus_a", "sqrt_a_prev", "sqrt_1_minus_a_prev")


def step_table(scheduler: DDIMScheduler, guidance_scale: float) -> torch.Tensor:
    """(steps, 6) float32, a row per step in sampling order: the columns of TABLE_COLUMNS."""
    rows = [[float(t), guidance_scale, *scheduler.coefficients(t)] for t in scheduler.timesteps]
    return torch.tensor(rows, dtype=torch.float32)


def denoise_step(
    run: RunFn, scheduler: DDIMScheduler, x: torch.Tensor, f1: torch.Tensor, text: torch.Tensor, row: torch.Tensor
) -> torch.Tensor:
    """x_t -> x_{t-1}. With CFG the text batch is (negative, positive) and the latent batch doubled."""
    f2 = run("fusion_transformer", f1=f1, sample=x)["f2"]  # (B, C2, h, w), shared by both branches
    cfg = text.shape[0] == 2
    batch = torch.cat([x, x]) if cfg else x  # (2B, 4, h, w)
    timestep = row[:1].expand(batch.shape[0])
    eps = run("controlnet_unet", sample=batch, timestep=timestep, text_embeddings=text, f2=f2)["noise_pred"]
    if cfg:
        eps_neg, eps_pos = eps.chunk(2)
        eps = eps_neg + row[1] * (eps_pos - eps_neg)
    return scheduler.update(eps, x, row[2:].unbind())


class StepGraph:
    """One denoising step captured as a CUDA graph at fixed shapes, replayed for every step."""

    @torch.inference_mode()
    def __init__(self, step: StepFn, x: torch.Tensor, f1: torch.Tensor, text: torch.Tensor, table: torch.Tensor):
        device = x.device
        self.shapes = shapes_of(x, f1, text)
        self.x, self.f1, self.text = torch.empty_like(x), torch.empty_like(f1), torch.empty_like(text)
        self.table = torch.zeros((MAX_STEPS, len(TABLE_COLUMNS)), dtype=torch.float32, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.load(x, f1, text, table)
        # 1. Warm up on a side stream: lazy initialisation (cuBLAS workspaces, TensorRT's work on a
        #    first enqueue after a shape change) must not happen while capturing.
        current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step(self.x, self.f1, self.text, self._row())
        current.wait_stream(side)
        # 2. Capture the step and the write of its result back into x, so replays chain.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.x.copy_(step(self.x, self.f1, self.text, self._row()))

    def _row(self) -> torch.Tensor:
        return self.table.index_select(0, self.index).view(-1)  # (6,), read on the device

    @torch.inference_mode()
    def load(self, x: torch.Tensor, f1: torch.Tensor, text: torch.Tensor, table: torch.Tensor) -> None:
        """Copy a request's tensors into the static buffers (device to device)."""
        self.x.copy_(x)
        self.f1.copy_(f1)
        self.text.copy_(text)
        self.table[: table.shape[0]].copy_(table)

    @torch.inference_mode()
    def __call__(self, i: int) -> torch.Tensor:
        """Run step i in place: the returned tensor is the graph's x, overwritten by the next step."""
        self.index.fill_(i)
        self.graph.replay()
        return self.x


def shapes_of(*tensors: torch.Tensor) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


class StepGraphs:
    """The step graph of the shapes last seen: captured on the first request, reused while shapes stay,
    captured anew when they change (one graph at a time: a graph holds its activations' memory)."""

    def __init__(self) -> None:
        self.current: StepGraph | None = None
        self.captures = 0

    def prepare(self, step: StepFn, x: torch.Tensor, f1: torch.Tensor, text: torch.Tensor, table: torch.Tensor) -> StepGraph:
        if x.device.type != "cuda":
            raise DiffsrError(f"CUDA graphs need the latents on a CUDA device, not {x.device}")
        if self.current is not None and self.current.shapes == shapes_of(x, f1, text):
            self.current.load(x, f1, text, table)
            return self.current
        self.current = None  # free the old graph's memory before capturing the new one
        self.current = StepGraph(step, x, f1, text, table)
        self.captures += 1
        return self.current


def denoise(
    run: RunFn, f1: torch.Tensor, z_lq: torch.Tensor, text: torch.Tensor, cfg: PipelineConfig,
    scheduler_config: dict[str, Any], on_step: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None, graphs: StepGraphs | None = None,
) -> torch.Tensor:
    """Seeded noise (drawn on the CPU, so every device starts alike) or noised z_lq, then `cfg.steps`
    steps; with `graphs`, each step is a replay of the captured step graph."""
    scheduler = make_scheduler(cfg.scheduler, scheduler_config)
    scheduler.set_timesteps(cfg.steps)
    noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(z_lq.device)
    x = noise if cfg.start == "noise" else scheduler.add_noise(z_lq, noise, scheduler.timesteps[0])
    table = step_table(scheduler, cfg.guidance_scale).to(x.device)  # one small copy per request
    step: StepFn = partial(denoise_step, run, scheduler)
    graph = graphs.prepare(step, x, f1, text, table) if graphs is not None else None
    for i in range(cfg.steps):
        if cancelled is not None and cancelled():
            raise DiffsrError(f"cancelled after {i} of {cfg.steps} steps")
        x = graph(i) if graph is not None else step(x, f1, text, table[i])
        if on_step is not None:
            on_step(i + 1, cfg.steps)
    return x.clone() if graph is not None else x  # a graph's x is overwritten by its next request
