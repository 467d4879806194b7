"""One denoising step as device work: the family's guided prediction, then the scheduler's update.

A step reads its timestep, guidance scale and scheduler coefficients from a row of a small device table
(`step_table`) rather than from Python floats, so nothing goes back to the host inside the loop, on any
backend, and a step captured as a CUDA graph (`runtime/cuda_graph.py`) replays for every step.

    Step        the whole latent at once (it fits one tile)
    TiledStep   overlapping tiles: each batch of tiles' prediction (on its crop of x_t and of the tiled
                stages' outputs, with its own conditioning), blended into one prediction of the whole latent,
                then one scheduler update (MultiDiffusion's formulation)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from diffsr.export.model.family import ModelFamily
from diffsr.export.model.parts import RunFn, Tensors
from diffsr.runtime.schedulers.base import Scheduler
from diffsr.runtime.tiling import Blender, Tile, Tiling

LEADING_COLUMNS = ("timestep", "guidance_scale")  # every row starts with these; the scheduler's columns follow
StepCallback = Callable[[int, int], None]  # (tile-steps done, tile-steps in all)


def step_table(scheduler: Scheduler, guidance_scale: float) -> torch.Tensor:
    """(steps, 2 + scheduler columns) float32, a row per step in sampling order: the model's timestep,
    the guidance scale, the scheduler's coefficients."""
    rows = [[float(t), guidance_scale, *scheduler.coefficients(i)] for i, t in enumerate(scheduler.timesteps)]
    return torch.tensor(rows, dtype=torch.float32)


class Step:
    """x_t -> x_{t-1} over the whole latent."""

    def __init__(self, model: ModelFamily, run: RunFn, scheduler: Scheduler):
        self.model, self.run, self.scheduler = model, run, scheduler
        self.progress: Callable[[int], None] | None = None  # told of every batch of tiles done (tiled, eager)

    @property
    def tiles(self) -> int:
        return 1

    @property
    def key(self) -> Any:
        """What a captured graph of this step depends on besides its tensors' shapes."""
        return type(self.scheduler).__name__

    def predict(self, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        return self.model.predict(self.run, x, tiled, cond, row)

    def __call__(self, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor,
                 state: torch.Tensor | None) -> torch.Tensor:
        out = self.predict(x, tiled, cond, row)
        return self.scheduler.update(out, x, row[len(LEADING_COLUMNS):].unbind(), state)


class TiledStep(Step):
    """The guided prediction over overlapping tiles, blended, then one update of the whole latent. Device
    work only, so a CUDA graph can capture it."""

    def __init__(self, model: ModelFamily, run: RunFn, scheduler: Scheduler, tiling: Tiling, grid: tuple[int, int],
                 device: torch.device):
        super().__init__(model, run, scheduler)
        self.blender = Blender(tiling, grid, {1}, device)
        f = model.latent_factor
        self.corners = {tuple(group): torch.tensor([t.pixels(f) for t in group], dtype=torch.float32, device=device)
                        for group in tiling.groups(self.blender.tiles)}
        self.tiling, self.grid = tiling, grid
        self.scales = model.tiled_scales()  # each tiled tensor's values per latent cell: its crop's scale

    @property
    def tiles(self) -> int:
        return len(self.blender.tiles)

    @property
    def key(self) -> Any:
        return (super().key, self.tiling, self.grid)

    def predict(self, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        def one(group: list[Tile]) -> Mapping[str, torch.Tensor]:
            crops = {name: torch.cat([t.crop(v, self.scales.get(name, 1)) for t in group]) for name, v in tiled.items()}
            tile_cond = self.model.tile_conditioning(cond, self.corners[tuple(group)])
            return {"out": self.model.predict(self.run, torch.cat([t.crop(x) for t in group]), crops, tile_cond, row)}

        return self.blender(one, {"out": 1}, self.progress)["out"]
