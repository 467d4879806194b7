"""The once-per-request stages, the denoising loop and decoding over BLS (ensembles cannot loop, nor tile): the
in-process pipeline's own functions (`runtime.stages.run_once`, `runtime.loop.denoise`, `runtime.stages.decode`) with
the family's submodules called through Triton a batch of tiles at a time, and the step math and blending on the
device. A step's conditioning is the family's, from the untiled stages' outputs and the output size
(`ModelFamily.conditioning`, as the in-process pipeline does).

`Sampler` is the loop; the endpoint's entry model (`entry.py`) runs it on the client's own request, so a cancel
reaches it between steps. `TritonPythonModel` serves it as a model of its own, for the ensemble entry point: it reads
the settings its `preprocess` model parsed, and whatever stages the ensemble ran before it."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.families import model_from_json
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.loop import denoise
from diffsr.runtime.requests import Plan, plan_of
from diffsr.runtime.stages import decode, run_once
from diffsr.triton_models.endpoint import SETTINGS
from diffsr.triton_models.models.common import bls_runners, from_torch, to_torch
from diffsr.triton_models.models.metrics import Metrics
from diffsr.triton_models.models.requests import parameters, respond


class Sampler:
    def __init__(self, params: Mapping[str, str]):
        self.scheduler_config = json.loads(params["scheduler"])
        self.device = torch.device(params["device"])
        self.model = model_from_json(params["family"], json.loads(params["model"]), params.get("family_module"))
        sigs = self.model.signatures()
        batched = tuple(filter(None, params.get("step_batched", "").split(",")))
        self.run = bls_runners({name: [t.name for t in sig.outputs] for name, sig in sigs.items()},
                               gpu=self.device.type == "cuda", batched=batched)

    def __call__(self, settings: PipelineConfig, plan: Plan, tensors: Mapping[str, torch.Tensor],
                 cancelled: Callable[[], bool], metrics: Metrics | None = None, request_id: str = "") -> torch.Tensor:
        """The decoded image of one request: its once-per-request stages (those `tensors` does not hold the outputs
        of), its steps, its decode; `metrics` observes every step."""
        model = self.model
        tiled, once = run_once(model, self.run, {k: t.to(self.device) for k, t in tensors.items()}, plan.tiling)
        cond = model.conditioning(once, plan.size, model.input_values(settings))
        try:
            on_step = metrics.step_timer(settings.steps) if metrics is not None else None
            latent = denoise(model, self.run, tiled, cond, settings, plan.scheduler, on_step=on_step,
                             cancelled=cancelled, tiling=plan.tiling)
        except DiffsrError as e:
            if cancelled():
                pb_utils.Logger.log_warn(f"sampler: request {request_id!r} {e}")
            raise
        return decode(model, self.run, latent, plan.tiling)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.sampler = Sampler(parameters(args))
        self.metrics = Metrics(args["model_name"])
        self.inputs = [i["name"] for i in json.loads(args["model_config"])["input"]]

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request: Any) -> list:
        given = {n: pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs}
        # the settings and the output size its preprocessing parsed and checked: the plan they make, not re-checked
        settings = PipelineConfig.parsed(json.loads(given.pop(SETTINGS.name).as_numpy().reshape(-1)[0]))
        tensors = {n: to_torch(t) for n, t in given.items()}
        h, w = (int(v) for v in tensors.pop("output_size").tolist())
        plan = plan_of(self.sampler.model, settings, self.sampler.scheduler_config, (h, w))
        decoded = self.sampler(settings, plan, tensors, request.is_cancelled, self.metrics, request.request_id())
        return [from_torch("decoded", decoded)]
