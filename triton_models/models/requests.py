"""What every python-backend model does with requests, without torch: its parameters, optional inputs,
errors and responses. The per-submodule ONNX Runtime models need nothing more (their processes start
without torch); `common.py` adds tensors and BLS calls.

Only imported inside Triton's python backend (`triton_python_backend_utils` exists there alone).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from diffsr.export.core.errors import DiffsrError


def parameters(args: dict[str, Any]) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def optional(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class StageError(DiffsrError):
    """A model this one called failed: the server's fault, not the request's."""


def respond(requests: list, handle: Callable[[Any], list]) -> list:
    """One response per request; an error becomes that request's error and the server serves on. A
    DiffsrError is the request's fault (bad image, parameters, size: INVALID_ARGUMENT, HTTP 400) unless
    the request was cancelled (CANCELLED) or a called model failed (INTERNAL)."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except DiffsrError as e:
            if isinstance(e, StageError):
                code = pb_utils.TritonError.INTERNAL
            elif request.is_cancelled():
                code = pb_utils.TritonError.CANCELLED
            else:
                code = pb_utils.TritonError.INVALID_ARG
            responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), code)))
    return responses
