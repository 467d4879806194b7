"""The endpoint's interface, in one place and without Triton's protobuf modules: the model's name, its request
tensors (the model's request inputs: `ModelFamily.request_inputs`) and its response. The repository generator and the
python models read it; a client asks the server (`TritonClient.endpoint`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.inputs import RequestInput
from diffsr.export.model.signatures import TensorSpec

ENSEMBLE = "diffsr"  # the endpoint model's name: a BLS entry model, or an ensemble (ServingOptions.entry)
# The endpoint's output. Not "image": an ensemble's output cannot share its input's name (Triton
# then answers a request twice, the input echoed and the result).
OUTPUT = "upscaled"
RESPONSE = TensorSpec(OUTPUT, "bytes", (1,))
# The prompt the image was made with (the request's, the LQ image's caption, or the default), as UTF-8: `used_prompt`,
# and each other prompt slot's (`used_<slot>`: XPSR's `used_prompt_low`). Not "prompt", for the reason above.
# the settings a preprocessing model parsed, as JSON, for the ensemble's sampler (which parses nothing)
SETTINGS = TensorSpec("settings", "bytes", (1,))
# the protocol's names of the request's dtypes
PROTOCOL_DTYPES = {"bytes": "BYTES", "int32": "INT32", "int64": "INT64", "float32": "FP32"}


def used_name(slot: str) -> str:
    """The response's tensor of a prompt slot's text."""
    return f"used_{slot}"


# the gallery photos a server with a gallery (`ServingOptions.gallery`) picked as the request's references, one name a
# line, nearest first (none: the request gave its own)
PICKED = TensorSpec("picked_references", "bytes", (1,))
GALLERY = "gallery"  # the folder of the preprocessing model's copy of the gallery index


def response_specs(model: ModelFamily, gallery: bool = False) -> list[TensorSpec]:
    """The endpoint's outputs: the PNG, then each prompt slot's text it ran with (the prompt first), then, with a
    gallery, the photos it picked."""
    return [RESPONSE, *(TensorSpec(used_name(slot.text), "bytes", (1,)) for slot in model.prompt_slots()),
            *((PICKED,) if gallery else ())]


def request_specs(model: ModelFamily) -> list[TensorSpec]:
    """The endpoint's inputs: one tensor per request input (every one optional but the photo)."""
    return [i.spec for i in model.request_inputs()]


def optional_inputs(model: ModelFamily) -> tuple[str, ...]:
    """Every input, to Triton: a request that lacks a required one (the photo, a family's) is refused by the one
    parse, in its words, on either entry point (an ensemble missing an input of its own would only say it cannot
    go on)."""
    return tuple(i.name for i in model.request_inputs())


def tensor_values(inputs: list[RequestInput], tensor: Any) -> dict[str, Any]:
    """A request's tensors (`tensor(name)`: its numpy array, or None where absent) -> raw values by input name, as
    `runtime.requests.parse_request` takes them: photos as encoded bytes (a list of them for a list), text as a
    Python str (BYTES that are not UTF-8 are refused there), numbers as Python numbers."""
    values: dict[str, Any] = {}
    for spec in inputs:
        array = tensor(spec.name)
        if array is None:
            continue
        items = list(np.asarray(array).reshape(-1))
        if spec.kind == "photos":
            values[spec.name] = [_bytes(spec.name, v) for v in items]
            continue
        if len(items) != 1:
            raise DiffsrError(f"{spec.name} must hold one value, got shape {list(np.asarray(array).shape)}")
        item = items[0]
        if spec.kind == "photo":
            values[spec.name] = _bytes(spec.name, item)
        elif spec.kind in ("text", "choice"):
            raw = _bytes(spec.name, item)
            values[spec.name] = raw.decode("utf-8", errors="surrogateescape")  # invalid UTF-8: refused by the parse
        else:
            values[spec.name] = item.item()
    return values


def _bytes(name: str, item: Any) -> bytes:
    if not isinstance(item, bytes):
        raise DiffsrError(f"{name} must be BYTES")
    return item
