"""Shared fixtures: a seeded tiny checkpoint, its ONNX export, a real photo, a real Triton server.

Everything session-scoped is made once. `tiny_onnx` goes through `diffsr export --fp16` with the
smallest calibration that still exercises the FP16 check's path (one photo with the two default
prompts, three steps: timesteps 667, 334 and 1, so the timestep embedding's arguments pass through
FP16's trouble zone).
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from diffsr.calib.data import photo
from diffsr.export.model.checkpoint import load_reference
from diffsr.export.model.random_init import init_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return init_checkpoint("tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def sdxl_checkpoint(tmp_path_factory):
    return init_checkpoint("sdxl-tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "sdxl-tiny")


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    return load_reference(tiny_checkpoint.path)[1]


@pytest.fixture(scope="session")
def photo_lq():
    """A real photo (skimage's astronaut), 64x64, as a small LQ input."""
    return photo("astronaut", (64, 64))


def _export(ckpt, out):
    """`diffsr export --fp16` with the smallest calibration."""
    from diffsr.app.cli.main import app

    result = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt.path), "--out", str(out), "--fp16",
                                      "--calib-photos", "astronaut", "--calib-steps", "3"])
    assert result.exit_code == 0, result.output
    calibration = json.loads((out / "manifest.json").read_text())["fp16_calibration"]
    assert calibration["photos"] == ["astronaut"] and calibration["steps"] == 3, calibration
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported FP32 and FP16 through the CLI (with a small real-data FP16 check)."""
    return _export(tiny_checkpoint, tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="session")
def sdxl_onnx(sdxl_checkpoint, tmp_path_factory):
    """The sdxl-tiny checkpoint exported the same way."""
    return _export(sdxl_checkpoint, tmp_path_factory.mktemp("onnx-sdxl"))


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    from diffsr.triton_models.repository import ServingOptions, build_repository

    out = tmp_path_factory.mktemp("repo") / "models"
    # step batching on here (off by default), so the serving tests run the stacked per-step calls; a 2 ms
    # queue delay so that concurrent loops' calls do meet
    options = ServingOptions(sampler_instances=4, step_batch=8, step_batch_delay_us=2000)
    build_repository(tiny_checkpoint, tiny_onnx, out, "onnxruntime", options=options)
    return out


@pytest.fixture(scope="session")
def server(tiny_repo):
    """A real tritonserver (from nvidia-pytriton) serving the tiny checkpoint's generated repository."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from diffsr.app.serving.triton_server import Ports, TritonServer

    srv = TritonServer(tiny_repo, Ports.free()).start(timeout=600)
    try:
        yield srv
    finally:
        srv.stop()
