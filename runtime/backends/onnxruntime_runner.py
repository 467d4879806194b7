"""ONNX Runtime backend: the exported graphs on the CPU execution provider, or CUDA where present.

On the CPU, torch tensors and numpy arrays share memory both ways, so feeding and fetching copies
nothing. On CUDA, IO binding hands ONNX Runtime the torch tensors' device pointers and binds
torch-allocated outputs (shapes from the signature), so latents never leave the GPU.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.signatures import Signature
from diffsr.runtime.backends.base import TORCH_DTYPES, Runner


def cpu_options(ort, options, shared_arena: bool = True) -> None:  # type: ignore[no-untyped-def]
    """CPU sessions: threads that stop spinning when a run ends and (`shared_arena`) one memory arena for
    every session of the process, registered once with ONNX Runtime's process-wide environment.

    Spinning: a session's threads spin after each op, waiting for the next, and by default after the run
    too, while the next session's threads start (the fusion transformer, then the ControlNet + UNet, every
    step): the two pools fight over the cores. Stopped at the end of a run (small, 128 -> 512, 20 steps):
    14.6 s instead of 15.7 s; with no spinning at all 15.2 s (ops wait for woken threads); ONNX Runtime's
    global thread pool gives 14.3 s, but it obliges every session of the process to opt in, other
    libraries' (onnxruntime.quantization's) included.

    Arena: with an arena per session, each session keeps its own peak, and the process holds the sum of
    the submodules' peaks (tiny, 2400x1600 out, 4 tiles a call: 5.8 GiB); shared, it holds the largest
    (2.5 GiB), and runs faster (16.2 s against 19.4 s for 4 steps). The arena lives as long as the
    process: what it grew to is not handed back when a session closes."""
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if shared_arena:
        _register_cpu_arena(ort)
        options.add_session_config_entry("session.use_env_allocators", "1")


@functools.cache
def _register_cpu_arena(ort) -> None:  # type: ignore[no-untyped-def]
    """Once per process: ONNX Runtime's environment is process-wide."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's defaults


class OnnxRuntimeRunner(Runner):
    def __init__(self, signature: Signature, path: Path, device: str = "cpu", shared_arena: bool = True):
        """`shared_arena` (CPU): allocate from the process's one arena (`cpu_options`); off for
        runners that are released to hand their memory back (the lean runners)."""
        super().__init__(signature)
        self.path, self.device, self.shared_arena = path, torch.device(device), shared_arena
        self.session = None

    def load(self) -> OnnxRuntimeRunner:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.device.type == "cpu":
            cpu_options(ort, options, self.shared_arena)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise DiffsrError("onnxruntime has no CUDA provider here: install onnxruntime-gpu or use device cpu")
            providers = [("CUDAExecutionProvider", {"device_id": self.device.index or 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise DiffsrError(f"onnxruntime cannot load {self.path}: {str(e).splitlines()[0]}") from None
        return self

    def close(self) -> None:
        self.session = None

    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        if self.session is None:
            raise DiffsrError(f"{self.signature.name}: runner used before load()")
        if self.device.type != "cuda":
            outputs = self.session.run(None, {k: v.contiguous().numpy() for k, v in feed.items()})
            return {o.name: torch.from_numpy(v) for o, v in zip(self.session.get_outputs(), outputs)}
        return self._infer_bound(feed, dims)

    def _infer_bound(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        sig = self.signature
        binding = self.session.io_binding()
        index = self.device.index or 0
        feed = {k: v.contiguous() for k, v in feed.items()}
        for spec in sig.inputs:
            t = feed[spec.name]
            binding.bind_input(spec.name, "cuda", index, np.dtype(spec.dtype), list(t.shape), t.data_ptr())
        outputs = {}
        for spec, shape in zip(sig.outputs, sig.output_shapes(dims).values()):
            t = torch.empty(shape, dtype=TORCH_DTYPES[spec.dtype], device=self.device)
            binding.bind_output(spec.name, "cuda", index, np.dtype(spec.dtype), list(shape), t.data_ptr())
            outputs[spec.name] = t
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return outputs
