"""Backends: one small Runner class each, chosen by name."""

from __future__ import annotations

from pathlib import Path

import torch

from export.checkpoint import SUBMODULES, Checkpoint, load_submodule
from export.errors import DiffsrError
from export.signatures import signatures
from runtime.backends.base import Runner

BACKENDS = ("torch",)


def load_runners(backend: str, ckpt: Checkpoint, device: str = "cpu", onnx_dir: Path | None = None) -> dict[str, Runner]:
    """One loaded runner per submodule."""
    sigs = signatures(ckpt.model)
    if backend == "torch":
        from runtime.backends.torch_runner import TorchRunner

        dev = torch.device(device)
        return {name: TorchRunner(sigs[name], load_submodule(ckpt, name), dev).load() for name in SUBMODULES}
    raise DiffsrError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
