"""One submodule's ONNX file run by ONNX Runtime inside Triton (the portable flavour)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from diffsr.triton_models.models.common import parameters, respond


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        folder = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # each model is a process of its own: threads that spin on after a request take the cores from the
        # model the sampler calls next (see the onnxruntime backend's `cpu_options`)
        options.add_session_config_entry("session.force_spinning_stop", "1")
        self.session = ort.InferenceSession(str(folder / parameters(args)["onnx_file"]), options,
                                            providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        def handle(request):
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            results = self.session.run(self.outputs, feed)
            return [pb_utils.Tensor(name, np.ascontiguousarray(v)) for name, v in zip(self.outputs, results)]

        return respond(requests, handle)
