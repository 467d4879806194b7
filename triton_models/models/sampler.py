"""The denoising loop as a BLS model (ensembles cannot loop): `runtime.pipeline.denoise`, with
fusion_transformer and controlnet_unet called through Triton and the step math on the device."""

from __future__ import annotations

import json

import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.errors import DiffsrError
from diffsr.export.settings import PipelineConfig
from diffsr.runtime.sampler import denoise
from diffsr.triton_models.models.common import bls_runners, from_torch, parameters, respond, scalar, to_torch


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = parameters(args)
        self.defaults = PipelineConfig.from_json(json.loads(params["pipeline"]))
        self.scheduler_config = json.loads(params["scheduler"])
        self.device = torch.device(params["device"])
        self.run = bls_runners({"fusion_transformer": ["f2"], "controlnet_unet": ["noise_pred"]},
                               gpu=self.device.type == "cuda")

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request) -> list:
        cfg = self.defaults.replace(
            steps=scalar(request, "steps", int), guidance_scale=scalar(request, "guidance_scale", float),
            seed=scalar(request, "seed", int),
        )
        inputs = {n: to_torch(pb_utils.get_input_tensor_by_name(request, n)).to(self.device)
                  for n in ("text_embeddings", "f1", "z_lq")}
        try:
            latent = denoise(self.run, inputs["f1"], inputs["z_lq"], inputs["text_embeddings"], cfg,
                             self.scheduler_config, cancelled=request.is_cancelled)
        except DiffsrError as e:
            if request.is_cancelled():
                pb_utils.Logger.log_warn(f"sampler: request {request.request_id()!r} {e}")
            raise
        return [from_torch("latent", latent)]
