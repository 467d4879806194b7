"""The demo end to end: checkpoint, PyTorch, ONNX Runtime, and a real Triton endpoint."""

import re

import numpy as np
import pytest
from PIL import Image

from diffsr.app.cli.demo import run_demo
from diffsr.export.core.errors import DiffsrError


def test_demo_writes_every_backends_image_and_the_endpoint_agrees(tmp_path, tiny_checkpoint, tiny_onnx, server):
    import shutil

    shutil.copytree(tiny_checkpoint.path, tmp_path / "checkpoint-tiny")  # reuse what the session made
    shutil.copytree(tiny_onnx, tmp_path / "onnx-tiny")
    # the session's server serves this checkpoint and export: the demo's request goes there (starting a
    # server from a generated repository is what that fixture and the bench test already do)
    result = run_demo("tiny", "coffee", serve=True, folder=tmp_path, triton_url=server.http_url, steps=2)
    assert set(result.outputs) == {"torch", "onnxruntime", "triton"}
    images = {k: np.asarray(Image.open(p)) for k, p in result.outputs.items()}
    assert all(img.shape == (512, 512, 3) for img in images.values())
    assert np.abs(images["torch"].astype(int) - images["onnxruntime"].astype(int)).max() <= 1
    assert result.endpoint_max_abs_diff <= 1 and result.endpoint_latency_s > 0
    assert result.timings["torch"]["denoise"] > 0
    # scored against the 512x512 photo: bicubic well above random weights' noise, the backends alike
    assert list(result.scores) == ["bicubic", "torch", "onnxruntime", "triton"]
    assert result.scores["bicubic"][0] > 25 > result.scores["torch"][0]
    assert abs(result.scores["torch"][0] - result.scores["onnxruntime"][0]) < 0.05


def test_demo_refuses_an_unknown_photo(tmp_path):
    with pytest.raises(DiffsrError, match="unknown demo photo 'moon'"):
        run_demo("tiny", "moon", folder=tmp_path)


def test_the_demo_runs_the_trained_model_from_an_empty_folder(demo_onnx):
    """The session's export of the demo model is `diffsr demo --no-serve` run in an empty folder (conftest), as a
    clean clone's `make demo` runs: it made .demo/ itself, wrote the LQ photo and both backends' images there, and
    scored them: the trained model's image is the photo upscaled, not noise, on both runtimes alike."""
    demo = demo_onnx.parent
    assert sorted(p.name for p in demo.glob("*.png")) == [
        "astronaut_lq.png", "astronaut_x4_trained_onnxruntime.png", "astronaut_x4_trained_torch.png"]
    assert np.asarray(Image.open(demo / "astronaut_x4_trained_torch.png")).shape == (512, 512, 3)
    log = " ".join((demo.parents[1] / "export-demo.log").read_text().split())  # the demo's output, unwrapped
    scores = re.search(r"against the 512x512 photo .*?: bicubic ([\d.]+) dB / SSIM [\d.]+, torch ([\d.]+) dB / SSIM "
                       r"[\d.]+, onnxruntime ([\d.]+) dB", log)
    assert scores, log[-2000:]
    bicubic, torch_, ort = (float(v) for v in scores.groups())
    assert torch_ > max(18.0, bicubic - 6.0) and abs(torch_ - ort) < 0.05
