"""Request -> upsampled LQ, token ids, output size: the pipeline's own step 1 and the family's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import model_from_json
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.image import decode_image, output_size
from diffsr.runtime.stages import prepare_lq, prompts
from diffsr.triton_models.models.common import from_torch
from diffsr.triton_models.models.requests import optional, parameters, respond, scalar


class Preprocess:
    """Request -> [LQ image, token ids..., output_size] (Triton tensors); `folder` holds the tokenizers."""

    def __init__(self, params: dict[str, str], folder: Path):
        self.defaults = PipelineConfig.from_json(json.loads(params["pipeline"]))
        self.model = model_from_json(params["family"], json.loads(params["model"]))
        self.lq_name = self.model.signature(self.model.stages.lq).inputs[0].name  # SD: lq_image
        self.max_pixels = int(params["max_output_pixels"])
        self.tokenizer = self.model.tokenizer(folder)

    def __call__(self, request) -> list:
        image = optional(request, "image")
        if image is None or image.size != 1 or not isinstance(image.reshape(-1)[0], bytes):
            raise DiffsrError("image must be one encoded PNG or JPEG as BYTES")
        cfg = self.defaults.replace(
            prompt=scalar(request, "prompt", str), negative_prompt=scalar(request, "negative_prompt", str),
            guidance_scale=scalar(request, "guidance_scale", float),
        )
        rgb = decode_image(image.reshape(-1)[0], "image")
        h, w = output_size(rgb.shape[0], rgb.shape[1], cfg.upscale)
        if h * w > self.max_pixels:
            raise DiffsrError(f"output {w}x{h} is above this server's {self.max_pixels} pixel limit: send a smaller image")
        lq = prepare_lq(self.model, rgb, cfg.upscale)
        ids = [from_torch(name, torch.from_numpy(v)) for name, v in self.tokenizer(prompts(cfg)).items()]
        return [from_torch(self.lq_name, lq), *ids, from_torch("output_size", torch.tensor([h, w], dtype=torch.int32))]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.preprocess = Preprocess(parameters(args), Path(args["model_repository"]) / args["model_version"])

    def execute(self, requests: list) -> list:
        return respond(requests, self.preprocess)
