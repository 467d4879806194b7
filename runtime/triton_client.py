"""Client of the served ensemble, over HTTP or gRPC (KServe v2), through tritonclient."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from export.errors import DiffsrError

from triton_models.repository import ENSEMBLE as MODEL
from triton_models.repository import OUTPUT

PROTOCOLS = ("http", "grpc")


@dataclass
class RemoteResult:
    png: bytes
    latency_s: float


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise DiffsrError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return module


def request_inputs(protocol: str, image: bytes, prompt: str | None = None, negative_prompt: str | None = None,
                   steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None) -> list:
    """The request's tensors; settings left None are not sent, so the server's defaults apply."""
    module = _module(protocol)
    values = {
        "image": (np.array([image], dtype=np.object_), "BYTES"),
        "prompt": (None if prompt is None else np.array([prompt.encode()], dtype=np.object_), "BYTES"),
        "negative_prompt": (None if negative_prompt is None else np.array([negative_prompt.encode()], dtype=np.object_), "BYTES"),
        "steps": (None if steps is None else np.array([steps], np.int32), "INT32"),
        "guidance_scale": (None if guidance_scale is None else np.array([guidance_scale], np.float32), "FP32"),
        "seed": (None if seed is None else np.array([seed], np.int64), "INT64"),
    }
    inputs = []
    for name, (array, dtype) in values.items():
        if array is not None:
            tensor = module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
    return inputs


class TritonClient:
    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 600.0):
        self.module, self.protocol = _module(protocol), protocol
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        self.client = self.module.InferenceServerClient(url, **kwargs)
        self.timeout_s = timeout_s

    def upscale(self, image: bytes, **settings) -> RemoteResult:
        from tritonclient.utils import InferenceServerException

        inputs = request_inputs(self.protocol, image, **settings)
        if self.protocol == "http":
            outputs = [self.module.InferRequestedOutput(OUTPUT, binary_data=True)]
            call = lambda: self.client.infer(MODEL, inputs, outputs=outputs)  # noqa: E731
        else:
            outputs = [self.module.InferRequestedOutput(OUTPUT)]
            call = lambda: self.client.infer(MODEL, inputs, outputs=outputs, client_timeout=self.timeout_s)  # noqa: E731
        start = time.perf_counter()
        try:
            result = call()
        except InferenceServerException as e:
            raise DiffsrError(f"server refused the request: {e.message()}") from None
        except ConnectionError as e:
            raise DiffsrError(f"cannot reach the server: {e}") from None
        return RemoteResult(result.as_numpy(OUTPUT).reshape(-1)[0], time.perf_counter() - start)
