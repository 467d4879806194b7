"""The denoising loop as a BLS model (ensembles cannot loop): `runtime.sampler.denoise`, with
fusion_transformer and controlnet_unet called through Triton and the step math on the device. The
UNet's conditioning is the text encoder's outputs and, for SDXL, the time ids it builds here from the
output size (`runtime.sampler.conditioning`, as the in-process pipeline does)."""

from __future__ import annotations

import json

import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.config import ModelConfig
from diffsr.export.errors import DiffsrError
from diffsr.export.settings import PipelineConfig
from diffsr.export.signatures import signatures
from diffsr.runtime.sampler import conditioning, denoise
from diffsr.triton_models.models.common import bls_runners, from_torch, parameters, respond, scalar, to_torch


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = parameters(args)
        self.defaults = PipelineConfig.from_json(json.loads(params["pipeline"]))
        self.scheduler_config = json.loads(params["scheduler"])
        self.device = torch.device(params["device"])
        self.model = ModelConfig.from_json(json.loads(params["model"]))
        self.text = [t.name for t in signatures(self.model)["text_encoder"].outputs]
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
                  for n in (*self.text, "f1", "z_lq")}
        size = to_torch(pb_utils.get_input_tensor_by_name(request, "output_size")).tolist()
        cond = conditioning(self.model, {n: inputs[n] for n in self.text}, (int(size[0]), int(size[1])))
        try:
            latent = denoise(self.run, inputs["f1"], inputs["z_lq"], cond, cfg, self.scheduler_config,
                             cancelled=request.is_cancelled)
        except DiffsrError as e:
            if request.is_cancelled():
                pb_utils.Logger.log_warn(f"sampler: request {request.request_id()!r} {e}")
            raise
        return [from_torch("latent", latent)]
