"""One denoising step captured as a CUDA graph at fixed shapes, replayed for every step of every request
of those shapes: the request's tensors are copied into the graph's static buffers, and a device index
selects the step's row of the table. Family prediction, guidance, the scheduler update (and its history
buffer, for a multistep solver) are then one graph launch per step."""

from __future__ import annotations

from typing import Any

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.parts import Tensors
from diffsr.export.model.settings import MAX_STEPS
from diffsr.runtime.step import Step


def shapes_of(*tensors: torch.Tensor) -> tuple[Any, ...]:
    return tuple((tuple(t.shape), t.dtype, t.device) for t in tensors)


def graph_key(step: Step, x: torch.Tensor, tiled: Tensors, cond: Tensors, table: torch.Tensor,
              state: torch.Tensor | None) -> tuple[Any, ...]:
    """What a captured step depends on: the shapes (the scheduler's state's too), the table's width, the step's
    scheduler and tiling."""
    return (*shapes_of(x, *tiled.values(), *cond.values(), *([] if state is None else [state])), tuple(tiled),
            tuple(cond), table.shape[1], step.key)


class StepGraph:
    @torch.inference_mode()
    def __init__(self, step: Step, x: torch.Tensor, tiled: Tensors, cond: Tensors, table: torch.Tensor,
                 state: torch.Tensor | None):
        device = x.device
        self.key = graph_key(step, x, tiled, cond, table, state)
        self.x = torch.empty_like(x)
        self.tiled = {name: torch.empty_like(t) for name, t in tiled.items()}
        self.cond = {name: torch.empty_like(t) for name, t in cond.items()}
        self.state = None if state is None else torch.empty_like(state)
        self.table = torch.zeros((MAX_STEPS, table.shape[1]), dtype=torch.float32, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.load(x, tiled, cond, table, state)
        # 1. Warm up on a side stream: lazy initialisation (cuBLAS workspaces, TensorRT's work on a
        #    first enqueue after a shape change) must not happen while capturing.
        current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        side.wait_stream(current)
        with torch.cuda.stream(side):
            step(self.x.clone(), self.tiled, self.cond, self._row(), None if self.state is None else self.state.clone())
        current.wait_stream(side)
        # 2. Capture the step and the write of its result back into x, so replays chain.
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.x.copy_(step(self.x, self.tiled, self.cond, self._row(), self.state))

    def _row(self) -> torch.Tensor:
        return self.table.index_select(0, self.index).view(-1)  # (columns,), read on the device

    @torch.inference_mode()
    def load(self, x: torch.Tensor, tiled: Tensors, cond: Tensors, table: torch.Tensor,
             state: torch.Tensor | None) -> None:
        """Copy a request's tensors into the static buffers (device to device): its scheduler state too (a
        multistep solver's empty history, a stochastic one's noise)."""
        self.x.copy_(x)
        for name, t in tiled.items():
            self.tiled[name].copy_(t)
        for name, t in cond.items():
            self.cond[name].copy_(t)
        self.table[: table.shape[0]].copy_(table)
        if self.state is not None and state is not None:
            self.state.copy_(state)

    @torch.inference_mode()
    def __call__(self, i: int) -> torch.Tensor:
        """Run step i in place: the returned tensor is the graph's x, overwritten by the next step."""
        self.index.fill_(i)
        self.graph.replay()
        return self.x


class StepGraphs:
    """The step graph of the shapes last seen: captured on the first request, reused while shapes stay,
    captured anew when they change (one graph at a time: a graph holds its activations' memory)."""

    def __init__(self) -> None:
        self.current: StepGraph | None = None
        self.captures = 0

    def prepare(self, step: Step, x: torch.Tensor, tiled: Tensors, cond: Tensors, table: torch.Tensor,
                state: torch.Tensor | None = None) -> StepGraph:
        if x.device.type != "cuda":
            raise DiffsrError(f"CUDA graphs need the latents on a CUDA device, not {x.device}")
        if self.current is not None and self.current.key == graph_key(step, x, tiled, cond, table, state):
            self.current.load(x, tiled, cond, table, state)
            return self.current
        self.current = None  # free the old graph's memory before capturing the new one
        self.current = StepGraph(step, x, tiled, cond, table, state)
        self.captures += 1
        return self.current
