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
