"""Shared fixtures: a seeded tiny checkpoint made once per session, and a real photo."""

from __future__ import annotations

import pytest

from calib.data import photo
from export.checkpoint import init_checkpoint, load_reference


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
    """The tiny checkpoint exported through the CLI, FP32 and FP16 (with its real-data FP16 check)."""
    from typer.testing import CliRunner

    from runtime.cli import app

    out = tmp_path_factory.mktemp("onnx")
    result = CliRunner().invoke(app, ["export", "--checkpoint", str(tiny_checkpoint.path), "--out", str(out), "--fp16"])
    assert result.exit_code == 0, result.output
    return out
