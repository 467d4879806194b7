"""A real tritonserver (from nvidia-pytriton) serving the tiny checkpoint's generated repository."""

import socket

import pytest

from triton_models.repository import ServingOptions, build_repository
from triton_models.server import Ports, TritonServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "models"
    build_repository(tiny_checkpoint, tiny_onnx, out, "onnxruntime", options=ServingOptions(sampler_instances=4))
    return out


@pytest.fixture(scope="session")
def server(tiny_repo):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    srv = TritonServer(tiny_repo, Ports(_free_port(), _free_port(), _free_port()))
    srv.start(timeout=600)
    yield srv
    srv.stop()
