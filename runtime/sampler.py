"""The sampler: a seeded start, then `steps` denoising steps that read device tensors only.

A step is f2 from the fusion transformer, eps from ControlNet + UNet with classifier-free guidance,
and the scheduler update. It takes its timestep, guidance scale and scheduler coefficients from a
row of a small device table (`step_table`) rather than from Python floats, so

- eagerly, nothing goes back to the host inside the loop, on any backend;
- on CUDA, one step captured as a CUDA graph (`StepGraph`) replays every step of every request of
  the same shapes: the request's tensors are copied into the graph's static buffers, and a device
  index selects the step's row. Fusion transformer, ControlNet/UNet, CFG and the update are then
  one graph launch per step.

A latent larger than one tile (`runtime/tiling.py`) is stepped by `TiledStep`: each batch of tiles'
guided noise prediction, blended into one prediction of the whole latent, then one update; the
progress callback then counts tile-steps.

The UNet's conditioning (`Conditioning`: the text encoder's outputs, and for SDXL the size
micro-conditioning `time_ids`) is a dict fed to ControlNet + UNet by name, as the signature says.

Shared by the in-process pipeline and the Triton sampler model (which passes `cancelled`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from diffsr.export.model.config import ModelConfig
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.settings import MAX_STEPS, PipelineConfig
from diffsr.runtime.schedulers.ddim import DDIMScheduler, make_scheduler
from diffsr.runtime.tiling import Blender, Tile, Tiling, pixels

RunFn = Callable[..., Mapping[str, torch.Tensor]]  # run(submodule, **inputs) -> outputs
Conditioning = Mapping[str, torch.Tensor]  # ControlNet + UNet inputs shared by every step, text batch first
StepFn = Callable[[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor], torch.Tensor]  # (x, f1, cond, row)
StepCallback = Callable[[int, int], None]  # (tile-steps done, tile-steps in all)
TABLE_COLUMNS = ("timestep", "guidance_scale", "sqrt_a", "sqrt_1_minus_a", "sqrt_a_prev", "sqrt_1_minus_a_prev")


def conditioning(model: ModelConfig, text: Mapping[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """What ControlNet + UNet take besides the latent, f2 and the timestep: the text encoder's outputs
    (a row per prompt: negative, positive with CFG) and, for SDXL, `time_ids` per row: the original
    size (h, w), the crop's top-left corner (0, 0) and the target size (h, w), all the output's size
    in pixels (for SR the image is neither resized nor cropped; a tile's own corner once tiled)."""
    cond = dict(text)
    if model.sdxl:
        h, w = size
        rows = cond["text_embeddings"].shape[0]
        device = cond["text_embeddings"].device
        cond["time_ids"] = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=device).repeat(rows, 1)
    return cond


def step_table(scheduler: DDIMScheduler, guidance_scale: float) -> torch.Tensor:
    """(steps, 6) float32, a row per step in sampling order: the columns of TABLE_COLUMNS."""
    rows = [[float(t), guidance_scale, *scheduler.coefficients(t)] for t in scheduler.timesteps]
    return torch.tensor(rows, dtype=torch.float32)


def predict_noise(run: RunFn, x: torch.Tensor, f1: torch.Tensor, cond: Conditioning, row: torch.Tensor) -> torch.Tensor:
    """The guided noise prediction of a latent batch. With CFG the text batch is (negative, positive)
    and the latent batch doubled."""
    f2 = run("fusion_transformer", f1=f1, sample=x)["f2"]  # (B, C2, h, w), shared by both branches
    cfg = cond["text_embeddings"].shape[0] == 2 * x.shape[0]
    batch = torch.cat([x, x]) if cfg else x  # (2B, 4, h, w)
    timestep = row[:1].expand(batch.shape[0])
    eps = run("controlnet_unet", sample=batch, timestep=timestep, f2=f2, **cond)["noise_pred"]
    if cfg:
        eps_neg, eps_pos = eps.chunk(2)
        eps = eps_neg + row[1] * (eps_pos - eps_neg)
    return eps


def denoise_step(
    run: RunFn, scheduler: DDIMScheduler, x: torch.Tensor, f1: torch.Tensor, cond: Conditioning, row: torch.Tensor
) -> torch.Tensor:
    """x_t -> x_{t-1}, the whole latent at once (it fits one tile)."""
    return scheduler.update(predict_noise(run, x, f1, cond, row), x, row[2:].unbind())


def tile_conditioning(cond: Conditioning, corners: torch.Tensor) -> dict[str, torch.Tensor]:
    """The conditioning of a batch of n tiles: each text row repeated n times (negatives, then
    positives: the order of `predict_noise`'s doubled batch); SDXL's `time_ids` keep the image's size
    and take each tile's own crop corner and size, `corners` (n, 4): top, left, height, width in pixels."""
    n = corners.shape[0]
    out = {name: t.repeat_interleave(n, dim=0) for name, t in cond.items() if name != "time_ids"}
    if "time_ids" in cond:
        ids = cond["time_ids"]  # (rows, 6): (h, w, 0, 0, h, w) per text row
        out["time_ids"] = torch.cat([ids[:, :2].repeat_interleave(n, dim=0), corners.repeat(ids.shape[0], 1)], dim=1)
    return out


class TiledStep:
    """x_t -> x_{t-1} over overlapping tiles: each batch of tiles' guided noise prediction (on its crop
    of x_t and f1, with its own time ids), blended into one prediction of the whole latent, then one
    scheduler update. Device work only, so a CUDA graph can capture it; `progress` (eager runs only)
    is told of every batch of tiles done."""

    def __init__(self, run: RunFn, scheduler: DDIMScheduler, tiling: Tiling, grid: tuple[int, int],
                 device: torch.device):
        self.run, self.scheduler = run, scheduler
        self.blender = Blender(tiling, grid, {1}, device)
        self.corners = {tuple(group): torch.tensor([pixels(t) for t in group], dtype=torch.float32, device=device)
                        for group in tiling.groups(self.blender.tiles)}
        self.key = (tiling, grid)
        self.progress: Callable[[int], None] | None = None

    @property
    def tiles(self) -> int:
        return len(self.blender.tiles)

    def __call__(self, x: torch.Tensor, f1: torch.Tensor, cond: Conditioning, row: torch.Tensor) -> torch.Tensor:
        def predict(group: list[Tile]) -> dict[str, torch.Tensor]:
            crops = torch.cat([t.crop(x) for t in group]), torch.cat([t.crop(f1) for t in group])
            return {"eps": predict_noise(self.run, *crops, tile_conditioning(cond, self.corners[tuple(group)]), row)}

        eps = self.blender(predict, {"eps": 1}, self.progress)["eps"]
        return self.scheduler.update(eps, x, row[2:].unbind())


class StepGraph:
    """One denoising step captured as a CUDA graph at fixed shapes, replayed for every step."""

    @torch.inference_mode()
    def __init__(self, step: StepFn, x: torch.Tensor, f1: torch.Tensor, cond: Conditioning, table: torch.Tensor):
        device = x.device
        self.shapes = graph_key(step, x, f1, cond)
        self.x, self.f1 = torch.empty_like(x), torch.empty_like(f1)
        self.cond = {name: torch.empty_like(t) for name, t in cond.items()}
        self.table = torch.zeros((MAX_STEPS, len(TABLE_COLUMNS)), dtype=torch.float32, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.load(x, f1, cond, table)
        # 1. Warm up on a side stream: lazy initialisation (cuBLAS workspaces, TensorRT's work on a
        #    first enqueue after a shape change) must not happen while capturing.
        current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step(self.x, self.f1, self.cond, self._row())
        current.wait_stream(side)
        # 2. Capture the step and the write of its result back into x, so replays chain.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.x.copy_(step(self.x, self.f1, self.cond, self._row()))

    def _row(self) -> torch.Tensor:
        return self.table.index_select(0, self.index).view(-1)  # (6,), read on the device

    @torch.inference_mode()
    def load(self, x: torch.Tensor, f1: torch.Tensor, cond: Conditioning, table: torch.Tensor) -> None:
        """Copy a request's tensors into the static buffers (device to device)."""
        self.x.copy_(x)
        self.f1.copy_(f1)
        for name, t in cond.items():
            self.cond[name].copy_(t)
        self.table[: table.shape[0]].copy_(table)

    @torch.inference_mode()
    def __call__(self, i: int) -> torch.Tensor:
        """Run step i in place: the returned tensor is the graph's x, overwritten by the next step."""
        self.index.fill_(i)
        self.graph.replay()
        return self.x


def shapes_of(*tensors: torch.Tensor) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def graph_key(step: StepFn, x: torch.Tensor, f1: torch.Tensor, cond: Conditioning) -> tuple[Any, ...]:
    """What a captured step depends on: the shapes, and a tiled step's tiling."""
    return (*shapes_of(x, f1, *cond.values()), getattr(step, "key", None))


class StepGraphs:
    """The step graph of the shapes last seen: captured on the first request, reused while shapes stay,
    captured anew when they change (one graph at a time: a graph holds its activations' memory)."""

    def __init__(self) -> None:
        self.current: StepGraph | None = None
        self.captures = 0

    def prepare(self, step: StepFn, x: torch.Tensor, f1: torch.Tensor, cond: Conditioning, table: torch.Tensor) -> StepGraph:
        if x.device.type != "cuda":
            raise DiffsrError(f"CUDA graphs need the latents on a CUDA device, not {x.device}")
        if self.current is not None and self.current.shapes == graph_key(step, x, f1, cond):
            self.current.load(x, f1, cond, table)
            return self.current
        self.current = None  # free the old graph's memory before capturing the new one
        self.current = StepGraph(step, x, f1, cond, table)
        self.captures += 1
        return self.current


def denoise(
    run: RunFn, f1: torch.Tensor, z_lq: torch.Tensor, cond: Conditioning, cfg: PipelineConfig,
    scheduler_config: dict[str, Any], on_step: StepCallback | None = None,
    cancelled: Callable[[], bool] | None = None, graphs: StepGraphs | None = None, tiling: Tiling | None = None,
) -> torch.Tensor:
    """Seeded noise (drawn on the CPU, so every device starts alike) or noised z_lq, then `cfg.steps`
    steps, over tiles where the latent is larger than one `tiling` tile; with `graphs`, each step is a
    replay of the captured step graph. `on_step` counts tile-steps."""
    scheduler = make_scheduler(cfg.scheduler, scheduler_config)
    scheduler.set_timesteps(cfg.steps)
    noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(z_lq.device)
    x = noise if cfg.start == "noise" else scheduler.add_noise(z_lq, noise, scheduler.timesteps[0])
    table = step_table(scheduler, cfg.guidance_scale).to(x.device)  # one small copy per request
    grid = (x.shape[-2], x.shape[-1])
    step: StepFn
    tiles = 1
    if tiling is not None and tiling.tiles(*grid) > 1:
        step = tiled = TiledStep(run, scheduler, tiling, grid, x.device)
        tiles = tiled.tiles
    else:
        step = partial(denoise_step, run, scheduler)
    graph = graphs.prepare(step, x, f1, cond, table) if graphs is not None else None
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        if on_step is not None:
            on_step(done, cfg.steps * tiles)

    if graph is None and tiles > 1:
        tiled.progress = count  # eagerly, the bar moves with every batch of tiles
    for i in range(cfg.steps):
        if cancelled is not None and cancelled():
            raise DiffsrError(f"cancelled after {i} of {cfg.steps} steps")
        x = graph(i) if graph is not None else step(x, f1, cond, table[i])
        if graph is not None or tiles == 1:
            count(tiles)
    return x.clone() if graph is not None else x  # a graph's x is overwritten by its next request
