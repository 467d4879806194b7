"""Decoded image -> cropped, colour-corrected PNG: the pipeline's own step 5."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from diffsr.runtime.image import encode_png
from diffsr.runtime.stages import finish
from diffsr.triton_models.endpoint import OUTPUT
from diffsr.triton_models.models.common import to_torch
from diffsr.triton_models.models.requests import parameters, respond


class Postprocess:
    """Decoded image, LQ image, output size -> the PNG response tensor."""

    def __init__(self, color_fix: str):
        self.color_fix = color_fix

    def __call__(self, decoded: torch.Tensor, lq: torch.Tensor, size: tuple[int, int]) -> Any:
        rgb = finish(decoded, lq, size, self.color_fix)
        return pb_utils.Tensor(OUTPUT, np.array([encode_png(rgb)], dtype=np.object_))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = parameters(args)
        self.postprocess = Postprocess(params["color_fix"])
        self.inputs = ("decoded", params["lq_input"], "output_size")

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request) -> list:
        decoded, lq, size = (to_torch(pb_utils.get_input_tensor_by_name(request, n)) for n in self.inputs)
        return [self.postprocess(decoded, lq, (int(size[0]), int(size[1])))]
