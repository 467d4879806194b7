"""Client of the served ensemble, over HTTP or gRPC (KServe v2), through tritonclient."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.inputs import PHOTO_KINDS
from diffsr.export.model.settings import BASE_INPUTS, Request
from diffsr.runtime.image import encode_png
from diffsr.triton_models.endpoint import ENSEMBLE, OUTPUT, PICKED, PROTOCOL_DTYPES, used_name

USED = used_name("")  # the prefix of the response's prompt slots

PROTOCOLS = ("http", "grpc")
NUMPY = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}  # by protocol type


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
    prompts: dict[str, str]  # each prompt slot's text the server made the image with (`used_<slot>`), by slot
    picked: list[str] = field(default_factory=list)  # the gallery photos a server with a gallery picked as references

    @property
    def prompt(self) -> str:
        return self.prompts["prompt"]


def _module(protocol: str) -> ModuleType:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise DiffsrError(f"unknown protocol {protocol!r}; choose one of {list(PROTOCOLS)}")
    return module


def request_inputs(protocol: str, image: bytes, endpoint: dict[str, str] | None = None, **settings: Any) -> list[Any]:
    """The request's tensors; settings left None (or an empty list of photos) are not sent, so the server's defaults
    apply. `endpoint`: the server's inputs and their protocol types (`TritonClient.endpoint`); without it, the base
    inputs every model takes. Text is sent as UTF-8, a list of photos as one BYTES tensor of several elements."""
    module = _module(protocol)
    types = endpoint if endpoint is not None else {i.name: PROTOCOL_DTYPES[i.spec.dtype] for i in BASE_INPUTS}
    values = {"image": image, **{k: v for k, v in settings.items() if v is not None and not (isinstance(v, list) and not v)}}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise DiffsrError(f"the endpoint takes no input {unknown}; it takes {sorted(types)}")
    inputs = []
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        try:
            array = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in items], dtype=NUMPY[types[name]])
        except UnicodeEncodeError:
            raise DiffsrError(f"{name} is not valid UTF-8 text") from None
        except (TypeError, ValueError, OverflowError):
            raise DiffsrError(f"{name}={value!r} is not a {types[name]} value") from None
        tensor = module.InferInput(name, list(array.shape), types[name])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def remote_values(model: ModelFamily, request: Request) -> dict[str, Any]:
    """A parsed request as the endpoint takes it: the photo and the family's photos as PNG bytes (a list for a list),
    the family's other inputs as they are (the base settings are the caller's to send)."""
    values: dict[str, Any] = {"image": encode_png(request.photo)}
    for spec in model.family_inputs():
        if spec.kind in PHOTO_KINDS:
            photos = [encode_png(p) for p in request.photos.get(spec.name, ())]
            values[spec.name] = photos if spec.kind == "photos" else (photos[0] if photos else None)
        elif spec.name in request.settings.inputs:
            values[spec.name] = request.settings.inputs[spec.name]
    return values


class TritonClient:
    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 600.0):
        self.module, self.protocol, self.url = _module(protocol), protocol, url
        kwargs = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" else {}
        try:
            self.client = self.module.InferenceServerClient(url, **kwargs)
        except Exception as e:  # tritonclient raises several types for a malformed url
            raise DiffsrError(f"cannot use {url!r} as a {protocol} endpoint: {e}") from None
        self.timeout_s = timeout_s
        self._endpoint: dict[str, str] | None = None
        self._outputs: list[str] = []

    def endpoint(self) -> dict[str, str]:
        """The served model's inputs and their protocol types (asked of the server once): a family's own inputs
        are the server's to say."""
        if self._endpoint is None:
            from tritonclient.utils import InferenceServerException

            try:
                meta = self.client.get_model_metadata(ENSEMBLE, **({"as_json": True} if self.protocol == "grpc" else {}))
            except InferenceServerException as e:
                if self._unreachable(e):
                    raise DiffsrError(f"cannot reach the server at {self.url} ({self.protocol}): {e.message()}") from None
                raise DiffsrError(f"cannot read the endpoint's inputs at {self.url} ({self.protocol}): {e.message()}") from None
            except OSError as e:
                raise DiffsrError(f"cannot reach the server at {self.url} ({self.protocol}): {e}") from None
            self._endpoint = {i["name"]: i["datatype"] for i in meta["inputs"]}
            self._outputs = [o["name"] for o in meta["outputs"]]
        return self._endpoint

    def upscale(self, image: bytes, **settings: Any) -> RemoteResult:
        """One request: the photo's encoded bytes, and the endpoint's other inputs by name (a list of photos as a list
        of encoded bytes)."""
        from tritonclient.utils import InferenceServerException

        inputs = request_inputs(self.protocol, image, self.endpoint(), **settings)
        binary = {"binary_data": True} if self.protocol == "http" else {}
        used = [name for name in self._outputs if name.startswith(USED)]
        picks = [name for name in self._outputs if name == PICKED.name]
        outputs = [self.module.InferRequestedOutput(name, **binary) for name in (OUTPUT, *used, *picks)]
        extra = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        start = time.perf_counter()
        try:
            result = self.client.infer(ENSEMBLE, inputs, outputs=outputs, **extra)
        except InferenceServerException as e:
            if self._unreachable(e):
                raise DiffsrError(f"cannot reach the server at {self.url} ({self.protocol}): {e.message()}") from None
            raise RequestRefused(f"server refused the request: {e.message()}", str(e.status())) from None
        except OSError as e:  # refused, unreachable, unknown host
            raise DiffsrError(f"cannot reach the server at {self.url} ({self.protocol}): {e}") from None
        prompts = {name[len(USED):]: result.as_numpy(name).reshape(-1)[0].decode() for name in used}
        picked = [n for name in picks for n in result.as_numpy(name).reshape(-1)[0].decode().split("\n") if n]
        return RemoteResult(result.as_numpy(OUTPUT).reshape(-1)[0], time.perf_counter() - start, prompts, picked)

    @staticmethod
    def _unreachable(e: Any) -> bool:
        """gRPC's answer when nobody listens (HTTP's is an OSError)."""
        return bool(e.status() == "StatusCode.UNAVAILABLE" and "connect" in (e.message() or ""))

    def close(self) -> None:
        """Close the connection: a server shutting down waits (up to its exit timeout) for open ones."""
        self.client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
