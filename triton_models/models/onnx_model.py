"""One submodule's ONNX file run by ONNX Runtime inside Triton (the portable flavour).

With step batching (`max_batch_size` > 0 in its config: the submodules of the family's step stage), every
request is one loop's call with a leading axis of 1, and Triton's dynamic batcher hands over several at
once: calls of equal shapes run as one (`triton_models.step_batching`), each answered with its own rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from diffsr.triton_models.models.requests import parameters, respond
from diffsr.triton_models.step_batching import StepBatching


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        params = parameters(args)
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        self.batched = config.get("max_batch_size", 0) > 0
        if self.batched:  # the family (and torch, which it brings) only where calls are stacked
            from diffsr.export.model.families import model_from_json

            model = model_from_json(params["family"], json.loads(params["model"]), params.get("family_module"))
            self.sig = model.signature(args["model_name"])
            self.stacking = StepBatching(self.sig, model.dims())
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # each model is a process of its own: threads that spin on after a request take the cores from the
        # model the sampler calls next (see the onnxruntime backend's `cpu_options`)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(folder / params["onnx_file"]), options,
                                            providers=["CPUExecutionProvider"])

    def _feed(self, request) -> dict[str, np.ndarray]:
        return {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}

    def _tensors(self, values: dict[str, np.ndarray] | list[np.ndarray]) -> list:
        arrays = values if isinstance(values, list) else [values[name] for name in self.outputs]
        return [pb_utils.Tensor(name, np.ascontiguousarray(v)) for name, v in zip(self.outputs, arrays)]

    def execute(self, requests: list) -> list:
        if not self.batched:
            return respond(requests, lambda request: self._tensors(self.session.run(self.outputs, self._feed(request))))
        return self._execute_batched(requests)

    def _execute_batched(self, requests: list) -> list:
        """Calls of equal shapes run together, each answered with its own rows (a failure fails them all:
        the server's fault, INTERNAL)."""
        answers: list = [None] * len(requests)  # each request's tensors, or its error
        by_shape: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = defaultdict(list)
        for i, request in enumerate(requests):
            feed = self._feed(request)
            if any(value.shape[0] != 1 for value in feed.values()):  # one loop's call: a leading axis of 1
                answers[i] = pb_utils.TritonError(f"{self.sig.name}: each call takes a leading axis of 1 (one loop's "
                                                  "call; its own batch inside)", pb_utils.TritonError.INVALID_ARG)
                continue
            feed = {name: value[0] for name, value in feed.items()}
            by_shape[tuple(feed[name].shape for name in self.inputs)].append((i, feed))
        for calls in by_shape.values():
            feeds = [feed for _, feed in calls]
            outputs = dict(zip(self.outputs, self.session.run(self.outputs, self.stacking.stack(feeds))))
            groups = self.stacking.groups(feeds[0])
            for (i, _), own in zip(calls, self.stacking.unstack(outputs, len(calls), groups)):
                answers[i] = self._tensors({name: value[None] for name, value in own.items()})
        return [pb_utils.InferenceResponse(error=a) if isinstance(a, pb_utils.TritonError)
                else pb_utils.InferenceResponse(output_tensors=a) for a in answers]
