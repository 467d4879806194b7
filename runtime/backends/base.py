"""The one interface every backend implements: load / infer(dict) -> dict / close.

Input and output checks against the submodule's signature live here, once; a backend only turns
a checked feed of torch tensors into a dict of torch tensors on the same device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.signatures import Signature

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64}


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class Runner(ABC):
    """Runs one submodule. Subclasses implement `_infer` and, where they hold resources, load/close."""

    def __init__(self, signature: Signature):
        self.signature = signature

    def load(self) -> Runner:
        return self

    def close(self) -> None:
        pass

    def release(self) -> None:
        """Give back the memory a next call can take again (on-demand runners); a no-op otherwise."""

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def infer(self, feed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sig = self.signature
        dims = sig.bind({k: tuple(v.shape) for k, v in feed.items()}, {k: dtype_name(v) for k, v in feed.items()})
        outputs = self._infer(feed, dims)
        for name, shape in sig.output_shapes(dims).items():
            got = outputs.get(name)
            if got is None or tuple(got.shape) != shape:
                found = None if got is None else tuple(got.shape)
                raise DiffsrError(f"{type(self).__name__} {sig.name}: output {name} has shape {found}, expected {shape}")
        return outputs

    @abstractmethod
    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Run a checked feed; `dims` holds the value of every dynamic dim of the signature."""
