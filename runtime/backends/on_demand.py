"""Runners that load on first use and are released when another needs the room: the pipeline then holds
one stage's weights at a time (SDXL in FP32: 15 GB for ControlNet + UNet, not the 19 GB of all five).

The budget is the pipeline's smallest working set: the largest submodule, or the submodules every
denoising step calls (the family's step stage: SD's fusion transformer and ControlNet + UNet), which must
not evict one another, if those are larger. A runner about to
load releases the least recently used others until it fits. Over repeated runs the stages before the
loop reload each time: what calibration and parity trade for memory.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch

from diffsr.export.core.memory import return_freed_memory
from diffsr.export.model.signatures import Signature
from diffsr.runtime.backends.base import Runner


class Residency:
    """Which on-demand runners hold their weights now, least recently used first, within a budget.
    It refers to them weakly: runners dropped by their owner are freed, weights and all, at once."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.loaded: list[weakref.ref[OnDemandRunner]] = []

    def admit(self, runner: OnDemandRunner) -> None:
        alive = [ref() for ref in self.loaded]
        loaded = [r for r in alive if r is not None and r is not runner]
        while loaded and sum(r.nbytes for r in loaded) + runner.nbytes > self.budget:
            loaded.pop(0).release()
        self.loaded = [weakref.ref(r) for r in (*loaded, runner)]

    def forget(self, runner: OnDemandRunner) -> None:
        """A runner that failed to load holds nothing."""
        self.loaded = [ref for ref in self.loaded if ref() is not None and ref() is not runner]


class OnDemandRunner(Runner):
    def __init__(self, signature: Signature, load: Callable[[], Runner], nbytes: int, residency: Residency):
        super().__init__(signature)
        self._load, self.nbytes, self.residency = load, nbytes, residency
        self.inner: Runner | None = None

    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        self.residency.admit(self)  # makes room first: the others are released before this one loads
        if self.inner is None:
            try:
                self.inner = self._load()
            except BaseException:
                self.residency.forget(self)
                raise
        return self.inner.infer(feed)

    def release(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None  # its tensors go with the last reference
            return_freed_memory()

    def close(self) -> None:
        self.release()


def on_demand(signatures: Mapping[str, Signature], loaders: Mapping[str, Callable[[], Runner]],
              nbytes: Mapping[str, int], together: tuple[str, ...]) -> dict[str, Runner]:
    """One on-demand runner per submodule, sharing the budget of the pipeline's smallest working set
    (`together`: the submodules every step calls)."""
    budget = max(max(nbytes.values()), sum(nbytes[name] for name in together))
    residency = Residency(budget)
    return {name: OnDemandRunner(signatures[name], loaders[name], nbytes[name], residency) for name in loaders}
