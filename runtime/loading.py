"""Loading a backend's runners, and a pipeline on them, by the backend's name.

    torch        the PyTorch reference, eager (CPU FP32 by default; `--device cuda --precision fp16` is the
                 eager FP16 GPU baseline)
    torch-cuda   PyTorch on CUDA in FP16, channels-last, SDPA attention; each denoising step a CUDA graph
    onnxruntime  the exported ONNX graphs, FP32 with ONNX Runtime's fused attention (CPU execution provider;
                 CUDA where onnxruntime-gpu is installed)
    tensorrt     the TensorRT plans of `diffsr build-engines`; each denoising step a CUDA graph
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.model.checkpoint import Checkpoint, load_submodule, parameter_bytes
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.backends.names import BACKENDS, CUDA_GRAPHS, DEFAULTS
from diffsr.runtime.backends.on_demand import on_demand
from diffsr.runtime.pipeline import Pipeline


def load_runners(
    backend: str, ckpt: Checkpoint, device: str | None = None, onnx_dir: Path | None = None,
    precision: Precision | None = None, engines_dir: Path | None = None, lean: bool = False,
) -> dict[str, Runner]:
    """One loaded runner per submodule. ONNX files and engines are checked against their manifest or
    metadata first. `lean` (torch and onnxruntime): each runner loads on first use and is released when
    another needs the room, so a pipeline holds one stage's weights at a time (see `on_demand`)."""
    if backend not in BACKENDS:
        raise DiffsrError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if lean and backend == "tensorrt":
        raise DiffsrError("lean (load-on-use) runners are for torch and onnxruntime; TensorRT engines stay loaded")
    default_device, default_precision = DEFAULTS[backend]
    device, precision = device or default_device, precision or default_precision
    _check_device(backend, device)
    sigs, names = ckpt.model.signatures(), ckpt.model.submodules
    # each runner module is imported when chosen: onnxruntime and tensorrt load large libraries
    if backend in ("torch", "torch-cuda"):
        from diffsr.runtime.backends.torch_runner import TorchRunner

        if precision is Precision.INT8:
            raise DiffsrError(f"the {backend} backend runs fp32 or fp16; INT8 graphs run on onnxruntime or tensorrt")

        layout = backend == "torch-cuda"  # channels-last convolutions

        def torch_runner(name: str) -> Runner:
            return TorchRunner(sigs[name], load_submodule(ckpt, name), device, precision, layout).load()

        if lean:
            sizes = {name: parameter_bytes(ckpt, name) for name in names}
            return on_demand(sigs, {name: partial(torch_runner, name) for name in names}, sizes, ckpt.model.stages.step)
        return {name: torch_runner(name) for name in names}
    if backend == "onnxruntime":
        from diffsr.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner

        if onnx_dir is None:
            raise DiffsrError("the onnxruntime backend needs --onnx DIR (made by `diffsr export`)")
        # FP32: ONNX Runtime's fused graphs where the export made them (see export.ort_fusions)
        paths = verified_files(Path(onnx_dir), ckpt, precision, fused=True)
        if lean:
            sizes = {name: sum(f.stat().st_size for f in (p, p.with_name(p.name + ".data")) if f.is_file())
                     for name, p in paths.items()}
            loaders = {name: partial(lambda n: OnnxRuntimeRunner(sigs[n], paths[n], device, shared_arena=False).load(), name)
                       for name in names}
            return on_demand(sigs, loaders, sizes, ckpt.model.stages.step)
        return {name: OnnxRuntimeRunner(sigs[name], paths[name], device).load() for name in names}
    if precision is Precision.FP32:
        raise DiffsrError("TensorRT engines are built from the FP16 or INT8 graphs: use --precision fp16 (or int8) "
                          "with --backend tensorrt")
    if engines_dir is None:
        raise DiffsrError("the tensorrt backend needs --engines DIR (made by `diffsr build-engines`)")
    from diffsr.runtime.backends.tensorrt_runner import load_tensorrt_runners

    return load_tensorrt_runners(ckpt, Path(engines_dir), device, onnx_dir)


def load_pipeline(
    backend: str, ckpt: Checkpoint, device: str | None = None, onnx_dir: Path | None = None,
    precision: Precision | None = None, engines_dir: Path | None = None, cuda_graph: bool | None = None,
) -> Pipeline:
    """The pipeline on one backend's runners, on their device; `cuda_graph` defaults to the backend's
    (on for torch-cuda and tensorrt)."""
    runners = load_runners(backend, ckpt, device, onnx_dir, precision, engines_dir)
    graph = backend in CUDA_GRAPHS if cuda_graph is None else cuda_graph
    return Pipeline(runners, ckpt, device or DEFAULTS[backend][0], cuda_graph=graph)


def _check_device(backend: str, device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise DiffsrError(f"device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if backend in ("torch-cuda", "tensorrt") and kind != "cuda":
        raise DiffsrError(f"the {backend} backend runs on a CUDA device, not {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DiffsrError(f"the {backend} backend on {device} needs a CUDA GPU; torch {torch.__version__} sees none here")
    index = torch.device(device).index
    count = torch.cuda.device_count() if kind == "cuda" else 0
    if kind == "cuda" and index is not None and index >= count:
        raise DiffsrError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
