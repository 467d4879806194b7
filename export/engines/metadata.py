"""TensorRT engine metadata: what each plan was built from and for, so a stale or foreign plan is refused.

A plan is tied to the TensorRT version that built it and to the GPU (its compute capability; another
model of the same family is refused too, as TensorRT itself warns), and it is only right for the
ONNX file, signature and checkpoint it came from. `diffsr build-engines` writes `<submodule>.json`
beside each `<submodule>.plan`; everything that loads a plan calls `check_engine` first, and a
mismatch is an error naming what differs and how to rebuild. `check_engine_io` holds a
deserialised engine's IO to its signature: the builder checks what it built, the runner what it loads.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from diffsr.export.core.configs import dataclass_from_json
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.graphs.manifest import checkpoint_digest, file_sha256, read_manifest
from diffsr.export.model.dims import ShapeRange
from diffsr.export.model.signatures import Signature

try:
    import tensorrt as trt
except ImportError:  # no TensorRT here: whatever needs it calls tensorrt_module() first, for a clear error
    pass

FORMAT_VERSION = 1


def tensorrt_module() -> ModuleType:
    """The real `tensorrt` package, or a clear error. (`tensorrt-stubs` installs a `tensorrt/` folder
    of type stubs only, which imports as an empty namespace package: check for a version.)"""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError:
        trt = None
    if trt is None or not hasattr(trt, "__version__"):
        raise DiffsrError("TensorRT is not installed: install the `tensorrt` wheel (10.x or 11.x) on a machine "
                          "with an NVIDIA GPU, or use --backend onnxruntime / torch-cuda")
    return trt


def tensorrt_available() -> bool:
    try:
        tensorrt_module()
    except DiffsrError:
        return False
    return True


@dataclass(frozen=True)
class Environment:
    """What a plan is bound to: the TensorRT that built it and the GPU it was built on."""

    tensorrt: str
    gpu: str
    compute_capability: str  # "major.minor"


def current_environment(device_index: int = 0) -> Environment:
    """This process's TensorRT and GPU (needs both)."""
    import torch

    trt = tensorrt_module()
    if not torch.cuda.is_available():
        raise DiffsrError("TensorRT engines need a CUDA GPU; torch sees none here")
    major, minor = torch.cuda.get_device_capability(device_index)
    return Environment(str(trt.__version__), torch.cuda.get_device_name(device_index), f"{major}.{minor}")


@dataclass(frozen=True)
class EngineMeta:
    submodule: str
    plan_sha256: str
    built_with: Environment
    onnx_file: str
    onnx_sha256: str
    signature_sha256: str
    checkpoint_sha256: str  # of the checkpoint the ONNX file was exported from (from its manifest)
    target: str
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shapes
    flags: dict[str, Any] = field(default_factory=dict)  # how it was built: strongly typed, static, ...
    device_memory_bytes: int = 0  # the scratch one execution context needs at the largest profile shape
    build_seconds: float = 0.0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EngineMeta:
        built_with = dataclass_from_json(Environment, data.get("built_with", {}), "engine metadata built_with")
        meta: EngineMeta = dataclass_from_json(cls, {**data, "built_with": built_with}, "engine metadata")
        return meta


def meta_path(plan: Path) -> Path:
    return plan.with_suffix(".json")


def write_meta(meta: EngineMeta, plan: Path) -> Path:
    path = meta_path(plan)
    path.write_text(json.dumps(meta.to_json(), indent=2) + "\n")
    return path


def read_meta(plan: Path) -> EngineMeta:
    path = meta_path(plan)
    if not path.is_file():
        raise DiffsrError(f"{plan} has no metadata {path.name} beside it: build it with `diffsr build-engines`")
    data = read_json(path, "engine metadata")
    if data.get("format_version") != FORMAT_VERSION:
        raise DiffsrError(f"{path} has format version {data.get('format_version')}, this diffsr reads "
                          f"{FORMAT_VERSION}: rebuild with `diffsr build-engines`")
    return EngineMeta.from_json(data)


def check_engine(
    meta: EngineMeta, *, signature_sha256: str, checkpoint_sha256: str | None = None,
    running: Environment | None = None, onnx_sha256: str | None = None, plan_sha256: str | None = None,
) -> None:
    """Refuse a plan whose metadata disagrees with what is here; each check runs when its value is given."""
    name, rebuild = meta.submodule, "rebuild it with `diffsr build-engines`"
    if plan_sha256 is not None and plan_sha256 != meta.plan_sha256:
        raise DiffsrError(f"{name}: the plan does not match the sha256 in its metadata (modified or swapped?): {rebuild}")
    if running is not None:
        built = meta.built_with
        if built.tensorrt != running.tensorrt:
            raise DiffsrError(f"{name}: the plan was built with TensorRT {built.tensorrt}, this is TensorRT "
                              f"{running.tensorrt}; plans are tied to one version: {rebuild} here")
        if built.compute_capability != running.compute_capability or built.gpu != running.gpu:
            raise DiffsrError(f"{name}: the plan was built on {built.gpu} (sm {built.compute_capability}), this is "
                              f"{running.gpu} (sm {running.compute_capability}): {rebuild} on this GPU")
    if signature_sha256 != meta.signature_sha256:
        raise DiffsrError(f"{name}: the plan was built for another signature than this checkpoint's: re-export "
                          "the ONNX files and rebuild")
    if checkpoint_sha256 is not None and checkpoint_sha256 != meta.checkpoint_sha256:
        raise DiffsrError(f"{name}: the plan was built from another checkpoint's ONNX files: re-export and rebuild")
    if onnx_sha256 is not None and onnx_sha256 != meta.onnx_sha256:
        raise DiffsrError(f"{name}: the plan was built from another {meta.onnx_file} than the one in the ONNX folder: "
                          f"{rebuild}")


def verified_plans(
    engines_dir: Path, checkpoint: Path, signature_hashes: dict[str, str], running: Environment | None = None,
    onnx_dir: Path | None = None,
) -> dict[str, Path]:
    """Each submodule's plan after its metadata is checked against this checkpoint and its signatures,
    the plan's bytes, and (where given) the running TensorRT and GPU and the ONNX folder's files."""
    checkpoint_sha = checkpoint_digest(checkpoint)
    onnx = read_manifest(onnx_dir)["submodules"] if onnx_dir is not None else None
    plans = {}
    for name, signature_sha in signature_hashes.items():
        plan = Path(engines_dir) / f"{name}.plan"
        if not plan.is_file():
            raise DiffsrError(f"{name}: no {plan.name} in {engines_dir}: build it with `diffsr build-engines`")
        meta = read_meta(plan)
        # the graph it was built from: the FP16 graph, or the INT8 one of `diffsr quantize`
        onnx_sha = None if onnx is None else next(
            (info["sha256"] for info in onnx.get(name, {}).values() if isinstance(info, dict) and info.get("file") == meta.onnx_file),
            "none")
        check_engine(meta, signature_sha256=signature_sha, checkpoint_sha256=checkpoint_sha,
                     running=running, onnx_sha256=onnx_sha, plan_sha256=file_sha256(plan))
        plans[name] = plan
    return plans


# --- a deserialised engine against its signature ----------------------------------------------


def trt_dtype_names() -> dict[Any, str]:
    """TensorRT's data types under the signature's dtype names."""
    return {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT32: "int32",
            trt.DataType.INT64: "int64"}


def check_engine_io(engine: trt.ICudaEngine, sig: Signature) -> dict[str, ShapeRange]:
    """The engine's IO tensors against the signature (names, directions, dtypes); returns the shape
    range of each input in its optimisation profile 0."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    expected = {t.name for t in sig.inputs + sig.outputs}
    if names != expected:
        raise DiffsrError(f"{sig.name}: the engine's tensors {sorted(names)} are not the signature's {sorted(expected)}")
    dtypes = trt_dtype_names()
    for spec in sig.inputs + sig.outputs:
        mode = trt.TensorIOMode.INPUT if spec in sig.inputs else trt.TensorIOMode.OUTPUT
        if engine.get_tensor_mode(spec.name) != mode:
            raise DiffsrError(f"{sig.name}.{spec.name}: the engine has it as {engine.get_tensor_mode(spec.name)}, not {mode}")
        dtype = dtypes.get(engine.get_tensor_dtype(spec.name), str(engine.get_tensor_dtype(spec.name)))
        if dtype != spec.dtype:
            raise DiffsrError(f"{sig.name}.{spec.name}: the engine takes {dtype}, the signature {spec.dtype}")
    return {t.name: ShapeRange(*map(dims_tuple, engine.get_tensor_profile_shape(t.name, 0))) for t in sig.inputs}


def dims_tuple(dims: trt.Dims) -> tuple[int, ...]:
    return tuple(dims[i] for i in range(len(dims)))
