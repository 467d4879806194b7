"""Shared fixtures: seeded checkpoints, their ONNX exports, a real photo, real Triton servers.

Everything session-scoped is made once, at the smallest size that still tests its path:

- `tiny_checkpoint` is a checkpoint as main wrote it before families had names: its `diffsr.json` is the
  checked-in legacy file (no `family`, SDXL's keys at zero). Every test that uses it, export and serving
  included, also proves that an old checkpoint still works. `sdxl_checkpoint` has the current form.
- `tiny_onnx` goes through `diffsr export --fp16` with the smallest calibration that still exercises the
  FP16 check's path (one photo with the two default prompts, three steps: timesteps 667, 334 and 1, so the
  timestep embedding's arguments pass through FP16's trouble zone). `sdxl_onnx` is FP32 only, without ONNX
  Runtime's fused variants (the onnxruntime backend then runs the plain graphs): the SDXL tests need no
  more. Exporting is mostly single-threaded tracing, so where the collected tests need the SDXL export it
  runs in a `diffsr export` process of its own from the session's start, beside the tiny export and the
  tests (on a 2-core machine about 90 s of the suite's wall).
- Three `tritonserver`s at most per run: `server` (the tiny checkpoint, BLS entry, step batching on),
  `narrow_server` (tiled, one loop instance and a queue of one: the tiling, overload and fault tests),
  `sdxl_server` (the ensemble entry point).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffsr.calib.data import photo
from diffsr.export.model.checkpoint import load_reference, open_checkpoint
from diffsr.export.model.random_init import init_checkpoint

DATA = Path(__file__).parent / "data"
NARROW_TILING = dict(tile=8, tile_overlap=2)  # 64 px tiles: the tests' small photos are several tiles


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = init_checkpoint("tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "tiny").path
    shutil.copy(DATA / "legacy-tiny-diffsr.json", path / "diffsr.json")
    return open_checkpoint(path)


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


def export(ckpt, out, *args):
    from diffsr.app.cli.main import app

    result = CliRunner().invoke(app, ["export", "--checkpoint", str(ckpt.path), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


TINY_EXPORT = ("--fp16", "--calib-photos", "astronaut", "--calib-steps", "3")
SDXL_EXPORT = ("--no-ort-fusions",)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported FP32 (with ONNX Runtime's fused variants) and FP16, through the CLI, with
    a small real-data FP16 check."""
    out = export(tiny_checkpoint, tmp_path_factory.mktemp("onnx"), *TINY_EXPORT)
    calibration = json.loads((out / "manifest.json").read_text())["fp16_calibration"]
    assert calibration["photos"] == ["astronaut"] and calibration["steps"] == 3, calibration
    return out


def _needs_sdxl_export(item) -> bool:
    """A test asks for `sdxl_onnx` (or a fixture built on it), or picks it through a `model` or `report`
    parameter (the tests that run both families call `getfixturevalue`)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    named = [v for k, v in params.items() if k in ("model", "report")]
    return "sdxl_onnx" in item.fixturenames or any(v == "sdxl" or (isinstance(v, tuple) and v[0] == "sdxl")
                                                   for v in named)


def pytest_collection_finish(session):
    session.config.wants_sdxl_export = any(_needs_sdxl_export(item) for item in session.items)


@pytest.fixture(scope="session", autouse=True)
def _sdxl_export(request, tmp_path_factory):
    """Where the collected tests need `sdxl_onnx`: its `diffsr export`, started now in a process of its own."""
    if not getattr(request.config, "wants_sdxl_export", False):
        yield None
        return
    ckpt = request.getfixturevalue("sdxl_checkpoint")
    out = tmp_path_factory.mktemp("onnx-sdxl")
    log = out.parent / "export-sdxl.log"
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "diffsr.app.cli", "export", "--checkpoint", str(ckpt.path),
                                    "--out", str(out), *SDXL_EXPORT], stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process, out, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def sdxl_onnx(_sdxl_export, sdxl_checkpoint, tmp_path_factory):
    """The sdxl-tiny checkpoint exported FP32 only, without ONNX Runtime's fused variants."""
    if _sdxl_export is None:  # asked for by a test the collection could not tell
        return export(sdxl_checkpoint, tmp_path_factory.mktemp("onnx-sdxl"), *SDXL_EXPORT)
    process, out, log = _sdxl_export
    assert process.wait() == 0, log.read_text()[-3000:]
    return out


SERVERS: list = []  # every server the session started, stopped together at its end


@pytest.fixture(scope="session", autouse=True)
def _stop_servers_together():
    """A stop waits seconds for Triton to drain and unload its models: the session's servers are all told at
    once, then waited for."""
    yield
    for srv in SERVERS:
        if srv.process is not None and srv.process.poll() is None:
            srv.process.terminate()
    for srv in SERVERS:
        srv.stop()


def _serve(repo):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from diffsr.app.serving.triton_server import Ports, TritonServer

    srv = TritonServer(repo, Ports.free()).start(timeout=600)
    SERVERS.append(srv)
    return srv


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    from diffsr.triton_models.repository import ServingOptions, build_repository

    out = tmp_path_factory.mktemp("repo") / "models"
    # step batching on here (off by default), so the serving tests run the stacked per-step calls; a 10 ms
    # queue delay so that concurrent loops' calls do meet (at 2 ms, one round in three of eight concurrent
    # 2-step requests formed no batch at all)
    options = ServingOptions(sampler_instances=4, step_batch=8, step_batch_delay_us=10_000)
    build_repository(tiny_checkpoint, tiny_onnx, out, "onnxruntime", options=options)
    return out


@pytest.fixture(scope="session")
def server(tiny_repo):
    """A real tritonserver (from nvidia-pytriton) serving the tiny checkpoint's generated repository."""
    return _serve(tiny_repo)


@pytest.fixture(scope="session")
def narrow_server(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    """The tiny checkpoint again, tiled (64 px tiles), with one loop instance and a queue of one: a third
    request at once is overload, and the running request's stub is the one a fault test kills."""
    from diffsr.triton_models.repository import ServingOptions, build_repository

    repo = tmp_path_factory.mktemp("repo-narrow") / "models"
    options = ServingOptions(sampler_instances=1, max_queue_size=1, warmup=False, **NARROW_TILING)
    build_repository(tiny_checkpoint, tiny_onnx, repo, "onnxruntime", options=options)
    return _serve(repo)


@pytest.fixture(scope="session")
def sdxl_server(sdxl_checkpoint, sdxl_onnx, tmp_path_factory):
    """The sdxl-tiny checkpoint behind the ensemble entry point (the others have the BLS one)."""
    from diffsr.triton_models.repository import ServingOptions, build_repository

    repo = tmp_path_factory.mktemp("repo-sdxl") / "models"
    options = ServingOptions(entry="ensemble", sampler_instances=1, warmup=False)
    build_repository(sdxl_checkpoint, sdxl_onnx, repo, "onnxruntime", options=options)
    return _serve(repo)
