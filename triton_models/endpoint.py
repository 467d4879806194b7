"""The endpoint's interface, in one place and without Triton's protobuf modules: the ensemble's name,
its request tensors and its response. The repository generator, the python models and the client
all read it."""

from __future__ import annotations

from diffsr.export.model.signatures import TensorSpec

ENSEMBLE = "diffsr"  # the endpoint model's name: a BLS entry model, or an ensemble (ServingOptions.entry)
# The endpoint's output. Not "image": an ensemble's output cannot share its input's name (Triton
# then answers a request twice, the input echoed and the result).
OUTPUT = "upscaled"
# Every request input but the image is optional; absent ones take the checkpoint's defaults.
REQUEST = (
    TensorSpec("image", "bytes", (1,)),
    TensorSpec("prompt", "bytes", (1,)),
    TensorSpec("negative_prompt", "bytes", (1,)),
    TensorSpec("steps", "int32", (1,)),
    TensorSpec("guidance_scale", "float32", (1,)),
    TensorSpec("seed", "int64", (1,)),
    TensorSpec("scheduler", "bytes", (1,)),  # a name of `runtime.schedulers` (ddim, dpmpp-2m)
    TensorSpec("caption", "bytes", (1,)),  # the prompt policy: auto, always, never (`runtime.caption.prompt_of`)
)
OPTIONAL = tuple(spec.name for spec in REQUEST if spec.name != "image")
RESPONSE = TensorSpec(OUTPUT, "bytes", (1,))
# The prompt the image was made with (the request's, the LQ image's caption, or the default), as UTF-8. Not
# "prompt", for the reason above.
PROMPT_OUTPUT = "used_prompt"
PROMPT_RESPONSE = TensorSpec(PROMPT_OUTPUT, "bytes", (1,))
# the protocol's names of the request's dtypes
PROTOCOL_DTYPES = {"bytes": "BYTES", "int32": "INT32", "int64": "INT64", "float32": "FP32"}
