"""TensorRT backend: deserialised plans, one shared scratch allocation, persistent device buffers.

    load   metadata checked (TensorRT, GPU, signature, checkpoint, ONNX, plan bytes) -> engine -> its IO
           held to the signature -> an execution context without scratch of its own -> one torch CUDA
           tensor per IO tensor at the profile's largest shape, its address bound once
    infer  inputs copied into their buffers (device to device), `set_input_shape` when a shape changes,
           `execute_async_v3` on torch's current stream; outputs are views of their buffers

Outputs stay valid until the runner's next call (the pipeline consumes each before calling again).
One scratch allocation, the largest any engine needs, serves every context: the pipeline runs them one
after another on one stream, never two at once. A call enqueues work only, so the pipeline can capture
a whole denoising step in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.engines.metadata import (
    Environment,
    check_engine_io,
    current_environment,
    dims_tuple,
    tensorrt_module,
    verified_plans,
)
from diffsr.export.graphs.manifest import signature_hash
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.dims import ShapeRange
from diffsr.export.model.signatures import Signature
from diffsr.runtime.backends.base import TORCH_DTYPES, Runner

try:
    import tensorrt as trt
except ImportError:  # load_tensorrt_runners calls tensorrt_module() first, which says what is missing
    pass


_LOGGER: list[trt.ILogger] = []


def _logger() -> trt.ILogger:
    """One TensorRT logger for the process (warnings and errors), alive as long as the runtimes using it."""
    if not _LOGGER:
        _LOGGER.append(trt.Logger(trt.Logger.WARNING))
    return _LOGGER[0]


class SharedScratch:
    """One device allocation used as the scratch memory of every execution context attached."""

    def __init__(self, device: torch.device):
        self.device = device
        self.memory: torch.Tensor | None = None
        self.contexts: list[trt.IExecutionContext] = []

    def attach(self, context: trt.IExecutionContext, size: int) -> None:
        self.contexts.append(context)
        if self.memory is None or size > self.memory.numel():  # grow, and re-point every context
            self.memory = None
            self.memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            targets = self.contexts
        else:
            targets = [context]
        for c in targets:
            c.set_device_memory(self.memory.data_ptr(), self.memory.numel())

    @property
    def nbytes(self) -> int:
        return 0 if self.memory is None else self.memory.numel()


class TensorRTRunner(Runner):
    def __init__(self, signature: Signature, plan: Path, scratch: SharedScratch, device: torch.device | str = "cuda"):
        super().__init__(signature)
        self.plan, self.scratch, self.device = plan, scratch, torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {}
        self.bound: dict[str, tuple[int, ...]] = {}  # input -> the shape the context was last given

    def load(self) -> TensorRTRunner:
        sig = self.signature
        self.runtime = runtime = trt.Runtime(_logger())  # kept: a runtime must outlive its engines
        engine = runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            raise DiffsrError(f"{sig.name}: TensorRT cannot deserialize {self.plan} (see its log above)")
        self.engine = engine
        self.profile: dict[str, ShapeRange] = check_engine_io(engine, sig)
        self.context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.scratch.attach(self.context, int(engine.device_memory_size_v2))
        # persistent buffers at the largest shapes the profile admits, bound once
        largest = {name: r.max for name, r in self.profile.items()}
        dims = sig.bind(largest, {t.name: t.dtype for t in sig.inputs})
        shapes = largest | sig.output_shapes(dims)
        for spec in sig.inputs + sig.outputs:
            buffer = torch.empty(shapes[spec.name], dtype=TORCH_DTYPES[spec.dtype], device=self.device)
            self.buffers[spec.name] = buffer
            if not self.context.set_tensor_address(spec.name, buffer.data_ptr()):
                raise DiffsrError(f"{sig.name}: TensorRT refused the address of {spec.name}")
        return self

    def close(self) -> None:
        """Release in TensorRT's order: the context, then the engine, then the runtime; then the buffers."""
        for name in ("context", "engine", "runtime"):
            self.__dict__.pop(name, None)
        self.buffers, self.bound = {}, {}

    def _view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.buffers[name].view(-1)[: torch.Size(shape).numel()].view(shape)

    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        sig = self.signature
        if not self.buffers:
            raise DiffsrError(f"{sig.name}: runner used before load()")
        changed = False
        for spec in sig.inputs:
            t, shape = feed[spec.name], tuple(feed[spec.name].shape)
            allowed = self.profile[spec.name]
            if not allowed.contains(shape):
                raise DiffsrError(f"{sig.name}.{spec.name}: shape {shape} is outside the engine's profile "
                                  f"{allowed.min}..{allowed.max}: rebuild with `diffsr build-engines` for a wider "
                                  "--target or --max-batch, or without --static")
            view = self._view(spec.name, shape)
            if view.data_ptr() != t.data_ptr():
                view.copy_(t)
            if self.bound.get(spec.name) != shape:
                if not self.context.set_input_shape(spec.name, shape):
                    raise DiffsrError(f"{sig.name}.{spec.name}: TensorRT refused input shape {shape}")
                self.bound[spec.name] = shape
                changed = True
        outputs = {name: self._view(name, shape) for name, shape in sig.output_shapes(dims).items()}
        if changed:  # once per new shape: TensorRT's own output shapes must be the signature's
            for name, out in outputs.items():
                got = dims_tuple(self.context.get_tensor_shape(name))
                if got != tuple(out.shape):
                    raise DiffsrError(f"{sig.name}.{name}: the engine makes shape {got}, the signature {tuple(out.shape)}")
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        if not self.context.execute_async_v3(stream):
            raise DiffsrError(f"{sig.name}: TensorRT failed to enqueue the engine (see its log above)")
        return outputs


def load_tensorrt_runners(
    ckpt: Checkpoint, engines_dir: Path, device: str = "cuda",
    onnx_dir: Path | None = None, running: Environment | None = None,
) -> dict[str, Runner]:
    """One runner per submodule from `diffsr build-engines` output, every plan's metadata checked first
    against this checkpoint, the running TensorRT and GPU (`running`, by default this process's), and
    the ONNX folder's files when one is given. All share one scratch allocation."""
    tensorrt_module()
    dev = torch.device(device)
    running = running or current_environment(dev.index or 0)
    sigs = ckpt.model.signatures()
    hashes = {name: signature_hash(sig) for name, sig in sigs.items()}
    plans = verified_plans(engines_dir, ckpt.path, hashes, running, onnx_dir)
    scratch = SharedScratch(dev)
    return {name: TensorRTRunner(sigs[name], plans[name], scratch, dev).load() for name in sigs}
