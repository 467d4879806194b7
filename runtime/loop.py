"""The sampler loop: a seeded start, then `steps` denoising steps that read device tensors only.

Shared by the in-process pipeline and the Triton entry model (which passes `cancelled`, checked before
every step). With `graphs`, each step is a replay of the captured step graph (`runtime/cuda_graph.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.parts import RunFn, Tensors
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.cuda_graph import StepGraphs
from diffsr.runtime.schedulers.base import Scheduler
from diffsr.runtime.step import Step, StepCallback, TiledStep, step_table
from diffsr.runtime.tiling import Tiling


def denoise(
    model: ModelFamily, run: RunFn, tiled: Tensors, cond: Tensors, cfg: PipelineConfig, scheduler: Scheduler,
    on_step: StepCallback | None = None, cancelled: Callable[[], bool] | None = None, graphs: StepGraphs | None = None,
    tiling: Tiling | None = None,
) -> torch.Tensor:
    """Seeded noise (drawn on the CPU, so every device starts alike) or the LQ latent noised to the first
    step (and, with `added_noise_level`, noised again to that level: XPSR's start), then `cfg.steps` steps of
    `scheduler`, over tiles where the latent is larger than one `tiling` tile. `tiled` holds the tiled
    once-per-request stages' outputs (SD: the LQ encoder's), `cond` the conditioning; `on_step` counts tile-steps.
    Every draw comes from the request's seeded generator, in one order: the start's noise, the added noise, then a
    stochastic scheduler's per-step noise."""
    scheduler.set_timesteps(cfg.steps)
    start = tiled[model.stages.start]
    generator = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(start.shape, generator=generator).to(start.device)
    x = noise if cfg.start == "noise" else scheduler.add_noise(start, noise, scheduler.timesteps[0])
    if cfg.start == "lq" and cfg.added_noise_level is not None:
        added = torch.randn(start.shape, generator=generator).to(start.device)
        x = scheduler.add_noise(x, added, cfg.added_noise_level)
    table = step_table(scheduler, cfg.guidance_scale).to(x.device)  # one small copy per request
    grid = (x.shape[-2], x.shape[-1])
    step = (TiledStep(model, run, scheduler, tiling, grid, x.device) if tiling is not None and tiling.tiles(*grid) > 1
            else Step(model, run, scheduler))
    state = scheduler.initial_state(x, generator)
    graph = graphs.prepare(step, x, tiled, cond, table, state) if graphs is not None else None
    done = 0

    def count(n: int) -> None:
        nonlocal done
        done += n
        if on_step is not None:
            on_step(done, cfg.steps * step.tiles)

    if graph is None and step.tiles > 1:
        step.progress = count  # eagerly, the bar moves with every batch of tiles
    for i in range(cfg.steps):
        if cancelled is not None and cancelled():
            raise DiffsrError(f"cancelled after {i} of {cfg.steps} steps")
        x = graph(i) if graph is not None else step(x, tiled, cond, table[i], state)
        if graph is not None or step.tiles == 1:
            count(step.tiles)
    return x.clone() if graph is not None else x  # a graph's x is overwritten by its next request
