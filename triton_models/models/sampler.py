"""LQ encoding, the denoising loop and decoding over BLS (ensembles cannot loop, nor tile): the in-process
pipeline's own functions (`runtime.stages.encode_lq`, `runtime.loop.denoise`, `runtime.stages.decode`)
with the family's submodules called through Triton a batch of tiles at a time, and the step math and
blending on the device. A step's conditioning is the family's, from the text outputs and the output size
(`ModelFamily.conditioning`, as the in-process pipeline does).

`Sampler` is the loop; the endpoint's entry model (`entry.py`) runs it on the client's own request, so a
cancel reaches it between steps. `TritonPythonModel` serves it as a model of its own, for the ensemble
entry point."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import model_from_json
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.loop import denoise
from diffsr.runtime.schedulers import make_scheduler
from diffsr.runtime.stages import decode, encode_lq
from diffsr.runtime.tiling import tiling_for
from diffsr.triton_models.models.common import bls_runners, from_torch, to_torch
from diffsr.triton_models.models.requests import parameters, respond, scalar
from diffsr.triton_models.models.metrics import Metrics


class Sampler:
    def __init__(self, params: Mapping[str, str]):
        self.defaults = PipelineConfig.from_json(json.loads(params["pipeline"]))
        self.scheduler_config = json.loads(params["scheduler"])
        self.device = torch.device(params["device"])
        self.model = model_from_json(params["family"], json.loads(params["model"]))
        sigs = self.model.signatures()
        self.text_inputs = [t.name for name in self.model.stages.text for t in sigs[name].inputs]  # token ids
        self.text = [t.name for name in self.model.stages.text for t in sigs[name].outputs]
        batched = tuple(filter(None, params.get("step_batched", "").split(",")))
        self.run = bls_runners({name: [t.name for t in sig.outputs] for name, sig in sigs.items()},
                               gpu=self.device.type == "cuda", batched=batched)

    def settings(self, request: Any) -> PipelineConfig:
        """The request's own settings over the repository's defaults; a bad value is the client's fault."""
        cfg = self.defaults.replace(
            steps=scalar(request, "steps", int), guidance_scale=scalar(request, "guidance_scale", float),
            seed=scalar(request, "seed", int), scheduler=scalar(request, "scheduler", str),
        )
        make_scheduler(cfg.scheduler, self.scheduler_config)  # an unknown name fails before any model runs
        return cfg

    def __call__(self, request: Any, text: Mapping[str, torch.Tensor], lq_image: torch.Tensor,
                 size: torch.Tensor, cancelled: Callable[[], bool], metrics: Metrics | None = None) -> torch.Tensor:
        """The decoded image of one request (its steps, guidance, seed and scheduler read from `request`);
        `metrics` observes every step."""
        cfg = self.settings(request)
        h, w = (int(v) for v in size.tolist())
        cond = self.model.conditioning({n: text[n].to(self.device) for n in self.text}, (h, w))
        tiling = tiling_for(self.model, cfg)
        lq = encode_lq(self.model, self.run, lq_image.to(self.device), tiling)
        try:
            on_step = metrics.step_timer(cfg.steps) if metrics is not None else None
            scheduler = make_scheduler(cfg.scheduler, self.scheduler_config)
            latent = denoise(self.model, self.run, lq, cond, cfg, scheduler, on_step=on_step, cancelled=cancelled,
                             tiling=tiling)
        except DiffsrError as e:
            if cancelled():
                pb_utils.Logger.log_warn(f"sampler: request {request.request_id()!r} {e}")
            raise
        return decode(self.model, self.run, latent, tiling)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.sampler = Sampler(parameters(args))
        self.metrics = Metrics(args["model_name"])

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request) -> list:
        tensors = {n: to_torch(pb_utils.get_input_tensor_by_name(request, n))
                   for n in (*self.sampler.text, "lq_image", "output_size")}
        decoded = self.sampler(request, tensors, tensors["lq_image"], tensors["output_size"], request.is_cancelled,
                               self.metrics)
        return [from_torch("decoded", decoded)]
