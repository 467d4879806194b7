"""A real tritonserver (from nvidia-pytriton) serving the tiny checkpoint's generated repository."""

import pytest

from triton_models.repository import ServingOptions, build_repository
from triton_models.server import Ports, TritonServer


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "models"
    build_repository(tiny_checkpoint, tiny_onnx, out, "onnxruntime", options=ServingOptions(sampler_instances=4))
    return out


@pytest.fixture(scope="session")
def server(tiny_repo):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    srv = TritonServer(tiny_repo, Ports.free())
    srv.start(timeout=600)
    yield srv
    srv.stop()
