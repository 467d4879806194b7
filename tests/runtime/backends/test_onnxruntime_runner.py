"""The ONNX Runtime backend behind the same pipeline and CLI."""

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.export.core.precision import Precision
from diffsr.export.model.settings import Request
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline


def test_onnxruntime_pipeline_matches_torch(tiny_checkpoint, tiny_onnx, photo_lq):
    config = tiny_checkpoint.defaults.replace(steps=4, seed=5)
    ref = Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint)(Request(photo_lq, config)).image
    for precision, limit in ((Precision.FP32, 1), (Precision.FP16, 8)):
        runners = load_runners("onnxruntime", tiny_checkpoint, onnx_dir=tiny_onnx, precision=precision)
        out = Pipeline(runners, tiny_checkpoint)(Request(photo_lq, config)).image
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= limit, precision


@pytest.mark.parametrize("precision,scheduler,steps", [("fp32", "dpmpp-2m", 10), ("fp16", "ddim", 2)])
def test_cli_upscale_with_onnxruntime(tiny_checkpoint, tiny_onnx, tmp_path, photo_lq, precision, scheduler, steps):
    """Prime sides (17x23 in, exactly 68x92 out), either scheduler."""
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(photo_lq[:23, :17]).save(src)
    result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(out), "--checkpoint", str(tiny_checkpoint.path),
                                      "--backend", "onnxruntime", "--onnx", str(tiny_onnx), "--precision", precision,
                                      "--scheduler", scheduler, "--steps", str(steps)])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (68, 92) and f"{scheduler} {steps} steps" in result.output


def test_cli_onnxruntime_needs_an_onnx_folder(tiny_checkpoint, tmp_path, photo_lq):
    src = tmp_path / "in.png"
    Image.fromarray(photo_lq[:16, :16]).save(src)
    result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(tmp_path / "o.png"), "--checkpoint",
                                      str(tiny_checkpoint.path), "--backend", "onnxruntime"])
    assert result.exit_code == 2 and "needs --onnx DIR" in result.output


def test_cli_upscales_with_sdxl(sdxl_checkpoint, sdxl_onnx, tmp_path, photo_lq):
    src = tmp_path / "in.png"
    Image.fromarray(photo_lq[:16, :24]).save(src)
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.png"
        result = CliRunner().invoke(app, ["upscale", str(src), "-o", str(out), "--checkpoint", str(sdxl_checkpoint.path),
                                          "--backend", backend, "--onnx", str(sdxl_onnx), "--steps", "2"])
        assert result.exit_code == 0, result.output
        assert Image.open(out).size == (96, 64)
    a, b = (np.asarray(Image.open(tmp_path / f"{x}.png")).astype(int) for x in ("torch", "onnxruntime"))
    assert np.abs(a - b).max() <= 1
