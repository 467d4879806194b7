"""Shared fixtures: a seeded tiny checkpoint, its ONNX export, a real photo, a real Triton server.

Everything session-scoped is made once; the FP16 check of `tiny_onnx` runs the smallest
calibration that still exercises its path (one photo, one prompt, three steps: timesteps 667, 334
and 1, so the timestep embedding's arguments pass FP16's trouble zone).
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
from diffsr.calib.data import photo
from diffsr.calib.fp16 import Calibration, fp16_check
from diffsr.export.checkpoint import init_checkpoint, load_reference
from diffsr.export.exporter import export_onnx, write_fp16

SMALL_CALIBRATION = Calibration(photos=("astronaut",), prompts=("a photo",), steps=3, size=32)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return init_checkpoint("tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    return load_reference(tiny_checkpoint.path)[1]


@pytest.fixture(scope="session")
def photo_lq():
    """A real photo (skimage's astronaut), 64x64, as a small LQ input."""
    return photo("astronaut", (64, 64))


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported FP32 and FP16 (with a small real-data FP16 check)."""
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(tiny_checkpoint, out)
    kept = fp16_check(tiny_checkpoint, out, SMALL_CALIBRATION)
    write_fp16(out, tiny_checkpoint, kept, asdict(SMALL_CALIBRATION))
    return out


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    from diffsr.triton_models.repository import ServingOptions, build_repository

    out = tmp_path_factory.mktemp("repo") / "models"
    build_repository(tiny_checkpoint, tiny_onnx, out, "onnxruntime", options=ServingOptions(sampler_instances=4))
    return out


@pytest.fixture(scope="session")
def server(tiny_repo):
    """A real tritonserver (from nvidia-pytriton) serving the tiny checkpoint's generated repository."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from diffsr.app.triton_server import Ports, TritonServer

    srv = TritonServer(tiny_repo, Ports.free()).start(timeout=600)
    try:
        yield srv
    finally:
        srv.stop()
