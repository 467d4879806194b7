"""Client of the served ensemble, over HTTP or gRPC (KServe v2), through tritonclient."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from diffsr.export.core.errors import DiffsrError
from diffsr.triton_models.endpoint import ENSEMBLE, OUTPUT, PROMPT_OUTPUT, PROTOCOL_DTYPES, REQUEST

PROTOCOLS = ("http", "grpc")
NUMPY = {"bytes": np.object_, "int32": np.int32, "int64": np.int64, "float32": np.float32}


class RequestRefused(DiffsrError):
    """The server answered the request with an error; `status` is the protocol's status ("400", "503",
    "StatusCode.INVALID_ARGUMENT", ...)."""

    def __init__(self, message: str, status: str):
        super().__init__(message)
        self.status = status


@dataclass
class RemoteResult:
    png: bytes
    latency_s: float
    prompt: str  # the prompt the server made the image with


def _module(protocol: str) -> ModuleType:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise DiffsrError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return module


def request_inputs(protocol: str, image: bytes, **settings: Any) -> list[Any]:
    """The request's tensors, in the endpoint's order; settings left None are not sent, so the server's
    defaults apply. Text is sent as UTF-8."""
    module = _module(protocol)
    values = {"image": image, **settings}
    unknown = sorted(set(values) - {spec.name for spec in REQUEST})
    if unknown:
        raise DiffsrError(f"unknown request settings {unknown}; the endpoint takes {[s.name for s in REQUEST]}")
    inputs = []
    for spec in REQUEST:
        value = values.get(spec.name)
        if value is None:
            continue
        array = np.array([value.encode() if isinstance(value, str) else value], dtype=NUMPY[spec.dtype])
        tensor = module.InferInput(spec.name, list(array.shape), PROTOCOL_DTYPES[spec.dtype])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class TritonClient:
    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 600.0):
        self.module, self.protocol, self.url = _module(protocol), protocol, url
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        try:
            self.client = self.module.InferenceServerClient(url, **kwargs)
        except Exception as e:  # tritonclient raises several types for a malformed url
            raise DiffsrError(f"cannot use {url!r} as a {protocol} endpoint: {e}") from None
        self.timeout_s = timeout_s

    def upscale(self, image: bytes, **settings: Any) -> RemoteResult:
        from tritonclient.utils import InferenceServerException

        inputs = request_inputs(self.protocol, image, **settings)
        binary = {"binary_data": True} if self.protocol == "http" else {}
        outputs = [self.module.InferRequestedOutput(name, **binary) for name in (OUTPUT, PROMPT_OUTPUT)]
        extra = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        start = time.perf_counter()
        try:
            result = self.client.infer(ENSEMBLE, inputs, outputs=outputs, **extra)
        except InferenceServerException as e:
            if e.status() == "StatusCode.UNAVAILABLE" and "connect" in (e.message() or ""):  # gRPC: nobody there
                raise DiffsrError(f"cannot reach the server at {self.url} ({self.protocol}): {e.message()}") from None
            raise RequestRefused(f"server refused the request: {e.message()}", str(e.status())) from None
        except OSError as e:  # refused, unreachable, unknown host
            raise DiffsrError(f"cannot reach the server at {self.url} ({self.protocol}): {e}") from None
        prompt = result.as_numpy(PROMPT_OUTPUT).reshape(-1)[0]
        return RemoteResult(result.as_numpy(OUTPUT).reshape(-1)[0], time.perf_counter() - start, prompt.decode())

    def close(self) -> None:
        """Close the connection: a server shutting down waits (up to its exit timeout) for open ones."""
        self.client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
