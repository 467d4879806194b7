"""The endpoint's entry point: one python model that runs the request through the pipeline's stages on
the client's own request. The one parse and check of the request, preprocessing, the loop's Python side
(`sampler.Sampler`) and postprocessing run here; the model's submodules (an attachment's, the once-per-request
stages', the per-step ones, decoding) are called through Triton (BLS).

Why not an ensemble: Triton 2.51 marks only an ensemble's *next* step of a cancelled request as cancelled;
a composing model already running (the loop) is never told (Triton server issue #6739), so a cancelled
200-step request ran to its end. Here `request.is_cancelled()` is the client's own cancel (gRPC cancel or
deadline), checked before every step: the request ends CANCELLED within one step and its instance takes
the next request. Pre- and postprocessing run here rather than as models: a BLS call returns a called
model's error as INTERNAL whatever its code, and a bad image is the client's fault (INVALID_ARGUMENT).
The ensemble stays available (`ServingOptions(entry="ensemble")`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsr.export.core.errors import DiffsrError
from diffsr.triton_models.endpoint import PICKED, used_name
from diffsr.triton_models.models.metrics import Metrics
from diffsr.triton_models.models.postprocess import Postprocess
from diffsr.triton_models.models.preprocess import Preprocess, text_tensor
from diffsr.triton_models.models.requests import StageError, parameters, respond
from diffsr.triton_models.models.sampler import Sampler


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = parameters(args)
        self.preprocess = Preprocess(params, Path(args["model_repository"]) / args["model_version"])
        writer = self.preprocess.model.prompter()
        self.metrics = Metrics(args["model_name"], writer.part if writer is not None else "caption")
        self.preprocess.metrics = self.metrics
        self.sampler = Sampler(params)
        self.photo = self.sampler.model.stages.photo

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request: Any) -> list:
        try:
            req, plan = self.preprocess.parse(request)  # the one parse and check: a mistake fails before any model runs
            req, picked = self.preprocess.pick(req)
            tensors, prompts = self.preprocess(req, request.is_cancelled)
            decoded = self.sampler(req.settings, plan, tensors, request.is_cancelled, self.metrics, request.request_id())
            png = Postprocess(req.settings.color_fix)(decoded.cpu(), tensors[self.photo].cpu(), plan.size)
        except StageError:
            raise
        except DiffsrError:  # the client's fault, or its cancel: as `respond` answers it
            (self.metrics.cancelled if request.is_cancelled() else self.metrics.rejected).increment(1)
            raise
        self.metrics.pixels.increment(plan.size[0] * plan.size[1])
        texts = [text_tensor(used_name(slot), text) for slot, text in prompts.items()]
        return [png, *texts, *([text_tensor(PICKED.name, "\n".join(picked))] if self.preprocess.picker.gallery else [])]
