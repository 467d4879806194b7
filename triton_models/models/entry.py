"""The endpoint's entry point: one python model that runs the request through the pipeline's stages on
the client's own request. Preprocessing, the loop's Python side (`sampler.Sampler`) and postprocessing
run here; the family's submodules (text encoding, the LQ stage, the per-step ones, decoding) are called
through Triton (BLS).

Why not an ensemble: Triton 2.51 marks only an ensemble's *next* step of a cancelled request as cancelled;
a composing model already running (the loop) is never told (Triton server issue #6739), so a cancelled
200-step request ran to its end. Here `request.is_cancelled()` is the client's own cancel (gRPC cancel or
deadline), checked before every step: the request ends CANCELLED within one step and its instance takes
the next request. Pre- and postprocessing run here rather than as models: a BLS call returns a called
model's error as INTERNAL whatever its code, and a bad image is the client's fault (INVALID_ARGUMENT).
The ensemble stays available (`ServingOptions(entry="ensemble")`)."""

from __future__ import annotations

from pathlib import Path

from diffsr.export.core.errors import DiffsrError
from diffsr.triton_models.endpoint import PROMPT_OUTPUT
from diffsr.triton_models.models.common import to_torch
from diffsr.triton_models.models.metrics import Metrics
from diffsr.triton_models.models.postprocess import Postprocess
from diffsr.triton_models.models.preprocess import Preprocess
from diffsr.triton_models.models.requests import StageError, parameters, respond
from diffsr.triton_models.models.sampler import Sampler


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        params = parameters(args)
        self.metrics = Metrics(args["model_name"])
        self.preprocess = Preprocess(params, Path(args["model_repository"]) / args["model_version"], self.metrics)
        self.sampler = Sampler(params)
        self.postprocess = Postprocess(params["color_fix"])

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request) -> list:
        try:
            self.sampler.settings(request)  # a bad setting is the client's fault before any model (or caption) runs
            pre = {tensor.name(): tensor for tensor in self.preprocess(request, request.is_cancelled)}
            ids = {n: to_torch(pre[n]).to(self.sampler.device) for n in self.sampler.text_inputs}
            text = self.sampler.model.encode_text(self.sampler.run, ids)
            lq, size = to_torch(pre[self.preprocess.lq_name]), to_torch(pre["output_size"])
            decoded = self.sampler(request, text, lq, size, request.is_cancelled, self.metrics)
            png = self.postprocess(decoded.cpu(), lq, size)
        except StageError:
            raise
        except DiffsrError:  # the client's fault, or its cancel: as `respond` answers it
            (self.metrics.cancelled if request.is_cancelled() else self.metrics.rejected).increment(1)
            raise
        self.metrics.pixels.increment(int(size[0]) * int(size[1]))
        return [png, pre[PROMPT_OUTPUT]]
