"""LQ encoding, the denoising loop and decoding as a BLS model (ensembles cannot loop, nor tile): the
in-process pipeline's own functions (`runtime.pipeline.encode_lq`, `runtime.sampler.denoise`,
`runtime.pipeline.decode`) with lq_encoder, fusion_transformer, controlnet_unet and vae_decoder called
through Triton a batch of tiles at a time, and the step math and blending on the device. The UNet's
conditioning is the text encoder's outputs and, for SDXL, the time ids built here from the output size
(`runtime.sampler.conditioning`, as the in-process pipeline does)."""

from __future__ import annotations

import json

import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.config import ModelConfig
from diffsr.export.errors import DiffsrError
from diffsr.export.settings import PipelineConfig
from diffsr.export.signatures import signatures
from diffsr.runtime.pipeline import decode, encode_lq
from diffsr.runtime.sampler import conditioning, denoise
from diffsr.runtime.tiling import tiling_for
from diffsr.triton_models.models.common import bls_runners, from_torch, parameters, respond, scalar, to_torch


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = parameters(args)
        self.defaults = PipelineConfig.from_json(json.loads(params["pipeline"]))
        self.scheduler_config = json.loads(params["scheduler"])
        self.device = torch.device(params["device"])
        self.model = ModelConfig.from_json(json.loads(params["model"]))
        self.text = [t.name for t in signatures(self.model)["text_encoder"].outputs]
        outputs = {name: [t.name for t in sig.outputs] for name, sig in signatures(self.model).items()
                   if name != "text_encoder"}
        self.run = bls_runners(outputs, gpu=self.device.type == "cuda")

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request) -> list:
        cfg = self.defaults.replace(
            steps=scalar(request, "steps", int), guidance_scale=scalar(request, "guidance_scale", float),
            seed=scalar(request, "seed", int),
        )
        inputs = {n: to_torch(pb_utils.get_input_tensor_by_name(request, n)).to(self.device)
                  for n in (*self.text, "lq_image")}
        size = to_torch(pb_utils.get_input_tensor_by_name(request, "output_size")).tolist()
        cond = conditioning(self.model, {n: inputs[n] for n in self.text}, (int(size[0]), int(size[1])))
        tiling = tiling_for(self.model, cfg)
        f1, z_lq = encode_lq(self.run, inputs["lq_image"], tiling)
        try:
            latent = denoise(self.run, f1, z_lq, cond, cfg, self.scheduler_config, cancelled=request.is_cancelled,
                             tiling=tiling)
        except DiffsrError as e:
            if request.is_cancelled():
                pb_utils.Logger.log_warn(f"sampler: request {request.request_id()!r} {e}")
            raise
        return [from_torch("decoded", decode(self.run, latent, tiling))]
