"""Request -> upsampled LQ, token ids, output size and the prompt used: the pipeline's own steps 1 and 2 (the
prompt policy, captioning the image through the captioner's models where it asks) and the family's tokenizer."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.captioner import FOLDER as CAPTIONER
from diffsr.export.model.family import model_from_json
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.caption import ImageCaptioner, prompt_of
from diffsr.runtime.image import decode_image, output_size
from diffsr.runtime.stages import prepare_lq, prompts
from diffsr.triton_models.endpoint import PROMPT_OUTPUT
from diffsr.triton_models.models.common import bls_runners, from_torch
from diffsr.triton_models.models.metrics import Metrics
from diffsr.triton_models.models.requests import optional, parameters, respond, scalar


class Preprocess:
    """Request -> [LQ image, token ids..., output_size, used_prompt] (Triton tensors); `folder` holds the
    tokenizers (and the captioner's, under captioner/). A caption runs its three models over BLS; `metrics`
    (the entry model's) observe it."""

    def __init__(self, params: dict[str, str], folder: Path, metrics: Metrics | None = None):
        self.defaults = PipelineConfig.from_json(json.loads(params["pipeline"]))
        self.model = model_from_json(params["family"], json.loads(params["model"]))
        self.lq_name = self.model.signature(self.model.stages.lq).inputs[0].name  # SD: lq_image
        self.max_pixels = int(params["max_output_pixels"])
        self.tokenizer = self.model.tokenizer(folder)
        self.metrics, self.captioner = metrics, None
        spec = self.model.captioner
        if spec is not None:  # on the entry model's device (the ensemble's preprocess model: the CPU)
            sigs, device = self.model.signatures(), torch.device(params.get("device", "cpu"))
            run = bls_runners({name: [t.name for t in sigs[name].outputs] for name in spec.graphs}, gpu=device.type == "cuda")
            self.captioner = ImageCaptioner(dataclasses.replace(spec, path=folder / CAPTIONER), run, device)

    def __call__(self, request, cancelled: Callable[[], bool] | None = None) -> list:
        image = optional(request, "image")
        if image is None or image.size != 1 or not isinstance(image.reshape(-1)[0], bytes):
            raise DiffsrError("image must be one encoded PNG or JPEG as BYTES")
        cfg = self.defaults.replace(
            prompt=scalar(request, "prompt", str), negative_prompt=scalar(request, "negative_prompt", str),
            guidance_scale=scalar(request, "guidance_scale", float), caption=scalar(request, "caption", str),
        )
        rgb = decode_image(image.reshape(-1)[0], "image")
        h, w = output_size(rgb.shape[0], rgb.shape[1], cfg.upscale)
        if h * w > self.max_pixels:
            raise DiffsrError(f"output {w}x{h} is above this server's {self.max_pixels} pixel limit: send a smaller image")
        lq = prepare_lq(self.model, rgb, cfg.upscale)
        prompt = prompt_of(cfg, None if self.captioner is None else lambda: self._caption(rgb, cfg, cancelled))
        ids = [from_torch(name, torch.from_numpy(v)) for name, v in self.tokenizer(prompts(cfg, prompt)).items()]
        used = pb_utils.Tensor(PROMPT_OUTPUT, np.array([prompt.encode()], dtype=np.object_))
        return [from_torch(self.lq_name, lq), *ids, from_torch("output_size", torch.tensor([h, w], dtype=torch.int32)),
                used]

    def _caption(self, rgb: np.ndarray, cfg: PipelineConfig, cancelled: Callable[[], bool] | None) -> str:
        assert self.captioner is not None
        start, tokens = time.perf_counter(), self.captioner.tokens
        caption = self.captioner(rgb, cfg, cancelled)
        if self.metrics is not None:
            self.metrics.caption.observe(time.perf_counter() - start)
            self.metrics.caption_tokens.increment(self.captioner.tokens - tokens)
        return caption


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.preprocess = Preprocess(parameters(args), Path(args["model_repository"]) / args["model_version"])

    def execute(self, requests: list) -> list:
        return respond(requests, lambda request: self.preprocess(request, request.is_cancelled))
