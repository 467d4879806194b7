"""A stand-in for TensorRT's runtime API, which cannot exist on a machine without an NVIDIA GPU.

Mocked here and nowhere else, and only the calls the TensorRT runner makes: a "plan" is JSON naming
an ONNX file, an optimisation profile and a scratch size. The engine answers IO and profile queries
from the ONNX graph; the context checks shapes against the profile, reads its inputs from the raw
addresses it was given, runs the graph with ONNX Runtime, and writes the outputs to the addresses
it was given, as TensorRT does on the device. Everything the runner does itself (buffers, addresses,
shapes, the shared scratch, metadata checks) is real.
"""

from __future__ import annotations

import ctypes
import json
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort

__version__ = "10.13.0.35-fake"
DataType = SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT32="INT32", INT64="INT64")
TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
ExecutionContextAllocationStrategy = SimpleNamespace(USER_MANAGED="USER_MANAGED")
ONNX_TYPES = {"tensor(float)": ("FLOAT", np.float32), "tensor(float16)": ("HALF", np.float16),
              "tensor(int32)": ("INT32", np.int32), "tensor(int64)": ("INT64", np.int64)}


class Logger:
    WARNING = 2

    def __init__(self, severity: int = 2):
        self.severity = severity


class Runtime:
    def __init__(self, logger: Logger):
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
        try:
            return Engine(json.loads(plan))
        except ValueError:
            return None  # what TensorRT answers for bytes that are no plan


class Engine:
    def __init__(self, spec: dict):
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.profile = {name: [tuple(s) for s in shapes] for name, shapes in spec["profile"].items()}
        self.device_memory_size_v2 = spec["scratch"]
        self.io = {v.name: ("INPUT", v.type) for v in self.session.get_inputs()}
        self.io |= {v.name: ("OUTPUT", v.type) for v in self.session.get_outputs()}
        self.io |= spec.get("extra_io", {})
        self.contexts: list[Context] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return list(self.io)[i]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> str:
        return ONNX_TYPES[self.io[name][1]][0]

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        assert profile == 0
        return self.profile[name]

    def create_execution_context(self, strategy: str) -> Context:
        assert strategy == ExecutionContextAllocationStrategy.USER_MANAGED
        context = Context(self)
        self.contexts.append(context)
        return context


def _array(address: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """The memory at an address as an array (a view: writing to it writes there)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=dtype).reshape(shape)


class Context:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.device_memory: tuple[int, int] | None = None
        self.address_calls = self.shape_calls = self.executions = 0
        self._outputs: dict[str, np.ndarray] | None = None

    def set_device_memory(self, memory: int, size: int) -> None:
        self.device_memory = (memory, size)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.address_calls += 1
        self.addresses[name] = memory
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
        self.shape_calls += 1
        self.shapes[name] = tuple(shape)
        return True

    def _run(self) -> dict[str, np.ndarray]:
        feed = {}
        for name, (mode, onnx_type) in self.engine.io.items():
            if mode == "INPUT":
                feed[name] = _array(self.addresses[name], self.shapes[name], ONNX_TYPES[onnx_type][1]).copy()
        names = [v.name for v in self.engine.session.get_outputs()]
        return dict(zip(names, self.engine.session.run(names, feed)))

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.io[name][0] == "INPUT":
            return self.shapes[name]
        self._outputs = self._run()  # the fake learns output shapes by running the graph on the bound inputs
        return self._outputs[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        assert self.device_memory is not None, "scratch memory must be set before execution (USER_MANAGED)"
        for name, value in self._run().items():
            _array(self.addresses[name], value.shape, value.dtype)[...] = value
        self.executions += 1
        return True
