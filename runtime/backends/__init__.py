"""Backends: one small Runner class each, chosen by name."""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import torch

from export.config import Precision
from export.errors import DiffsrError
from export.signatures import SUBMODULES, signatures
from runtime.backends.base import Runner

if TYPE_CHECKING:
    from export.checkpoint import Checkpoint

BACKENDS = ("torch", "onnxruntime")


def load_runners(
    backend: str, ckpt: "Checkpoint", device: str = "cpu", onnx_dir: Path | None = None,
    precision: Precision = Precision.FP32,
) -> dict[str, Runner]:
    """One loaded runner per submodule. ONNX files are checked against their manifest first."""
    sigs = signatures(ckpt.model)
    if backend == "torch":
        from export.checkpoint import load_submodule
        from runtime.backends.torch_runner import TorchRunner

        dev = torch.device(device)
        return {name: TorchRunner(sigs[name], load_submodule(ckpt, name), dev).load() for name in SUBMODULES}
    if backend == "onnxruntime":
        from export.manifest import verified_files
        from runtime.backends.onnxruntime_runner import OnnxRuntimeRunner

        if onnx_dir is None:
            raise DiffsrError("the onnxruntime backend needs --onnx DIR (made by `diffsr export`)")
        paths = verified_files(Path(onnx_dir), ckpt, SUBMODULES, precision)
        return {name: OnnxRuntimeRunner(sigs[name], paths[name], device).load() for name in SUBMODULES}
    raise DiffsrError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
