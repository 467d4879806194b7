"""What the python-backend models that hold tensors share: tensors in and out through DLPack, BLS calls.

Tensors cross through DLPack, so on a GPU they stay in device memory; on the CPU it copies nothing.
Only imported inside Triton's python backend (`triton_python_backend_utils` exists there alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.core.errors import DiffsrError
from diffsr.triton_models.models.requests import StageError


def to_torch(tensor: Any) -> torch.Tensor:
    return torch.from_dlpack(tensor.to_dlpack())


def from_torch(name: str, t: torch.Tensor) -> Any:
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(t.contiguous()))


def call(model: str, inputs: list, outputs: list[str], gpu: bool = False) -> dict[str, Any]:
    """Infer another model of this server (BLS) on Triton tensors; returns its outputs as Triton tensors.
    Its error is the request's fault where the model said so (INVALID_ARGUMENT: a bad image, a size
    past the limit), else a StageError (INTERNAL). With `gpu`, outputs are asked for in GPU memory."""
    extra = {"preferred_memory": pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, 0)} if gpu else {}
    request = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs, **extra)
    response = request.exec()
    if response.has_error():
        error = response.error()
        if error.code() == pb_utils.TritonError.INVALID_ARG:
            raise DiffsrError(error.message())
        raise StageError(f"{model}: {error.message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name) for name in outputs}


def bls(model: str, outputs: list[str], gpu: bool = False, batched: bool = False) -> Callable[..., dict[str, torch.Tensor]]:
    """A callable `run(**inputs) -> outputs` on torch tensors (`call`); with `gpu`, the loop's tensors
    never visit the host. A `batched` model (step batching) takes each tensor with a leading call axis of 1."""

    def run(**inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        sent = [from_torch(k, v[None] if batched else v) for k, v in inputs.items()]
        got = {name: to_torch(tensor) for name, tensor in call(model, sent, outputs, gpu).items()}
        return {name: t[0] for name, t in got.items()} if batched else got

    return run


def bls_runners(models: Mapping[str, list[str]], gpu: bool = False,
                batched: tuple[str, ...] = ()) -> Callable[..., dict[str, torch.Tensor]]:
    """run(submodule, **inputs), the form `runtime.pipeline.denoise` takes."""
    calls = {name: bls(name, outputs, gpu, name in batched) for name, outputs in models.items()}
    return lambda name, **inputs: calls[name](**inputs)
