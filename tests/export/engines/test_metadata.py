"""Engine metadata: written beside each plan, and every mismatch with what is here refused by name."""

import dataclasses
import json
import sys

import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.engines.metadata import (
    EngineMeta,
    Environment,
    check_engine,
    read_meta,
    tensorrt_available,
    tensorrt_module,
    write_meta,
)

HERE = Environment("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.fixture()
def meta():
    return EngineMeta(
        submodule="controlnet_unet", plan_sha256="p" * 64, built_with=HERE, onnx_file="controlnet_unet.fp16.onnx",
        onnx_sha256="o" * 64, signature_sha256="s" * 64, checkpoint_sha256="c" * 64, target="server",
        profile={"sample": [[1, 4, 8, 8], [2, 4, 64, 64], [8, 4, 128, 128]]},
        flags={"strongly_typed": True, "static": False}, device_memory_bytes=123, build_seconds=4.5,
    )


def _check(meta, **overrides):
    given = dict(signature_sha256="s" * 64, checkpoint_sha256="c" * 64, running=HERE, onnx_sha256="o" * 64,
                 plan_sha256="p" * 64) | overrides
    check_engine(meta, **given)


def test_metadata_round_trips_beside_the_plan(meta, tmp_path):
    plan = tmp_path / "controlnet_unet.plan"
    path = write_meta(meta, plan)
    assert path == tmp_path / "controlnet_unet.json"
    assert read_meta(plan) == meta
    _check(read_meta(plan))  # everything matches: no error


@pytest.mark.parametrize("change, message", [
    (dict(running=dataclasses.replace(HERE, tensorrt="11.4.0.106")),
     "built with TensorRT 10.13.0.35, this is TensorRT 11.4.0.106"),
    (dict(running=dataclasses.replace(HERE, gpu="NVIDIA L4", compute_capability="8.9")),
     r"built on NVIDIA H100 80GB HBM3 \(sm 9.0\), this is NVIDIA L4 \(sm 8.9\)"),
    (dict(running=dataclasses.replace(HERE, gpu="NVIDIA H100 PCIe")), "this is NVIDIA H100 PCIe"),
    (dict(signature_sha256="x" * 64), "built for another signature"),
    (dict(checkpoint_sha256="x" * 64), "built from another checkpoint"),
    (dict(onnx_sha256="x" * 64), "built from another controlnet_unet.fp16.onnx"),
    (dict(plan_sha256="x" * 64), "does not match the sha256 in its metadata"),
])
def test_each_mismatch_is_refused_by_name(meta, change, message):
    with pytest.raises(DiffsrError, match=message) as err:
        _check(meta, **change)
    assert str(err.value).startswith("controlnet_unet: ") and "\n" not in str(err.value)


def test_checks_without_a_value_are_skipped(meta):
    """No GPU, checkpoint or ONNX at hand: only the signature is checked, and still refused when it differs (the
    other values of `meta` would fail every skipped check: they are not looked at)."""
    foreign = dataclasses.replace(meta, built_with=dataclasses.replace(HERE, tensorrt="0.0"), checkpoint_sha256="x" * 64,
                                  onnx_sha256="x" * 64, plan_sha256="x" * 64)
    assert check_engine(foreign, signature_sha256="s" * 64) is None
    with pytest.raises(DiffsrError, match="built for another signature"):
        check_engine(foreign, signature_sha256="t" * 64)


def test_missing_unreadable_or_old_metadata_is_refused(meta, tmp_path):
    plan = tmp_path / "vae_decoder.plan"
    with pytest.raises(DiffsrError, match="has no metadata vae_decoder.json beside it: build it with `diffsr build-engines`"):
        read_meta(plan)
    (tmp_path / "vae_decoder.json").write_text("{not json")
    with pytest.raises(DiffsrError, match="is not valid JSON"):
        read_meta(plan)
    (tmp_path / "vae_decoder.json").write_text(json.dumps(meta.to_json() | {"format_version": 0}))
    with pytest.raises(DiffsrError, match="format version 0"):
        read_meta(plan)
    (tmp_path / "vae_decoder.json").write_text(json.dumps(meta.to_json() | {"surprise": 1}))
    with pytest.raises(DiffsrError, match=r"unknown engine metadata keys \['surprise'\]"):
        read_meta(plan)


@pytest.fixture()
def planted_tensorrt(tmp_path, monkeypatch):
    """A `tensorrt` package of our own making, first on sys.path, in place of whatever is installed."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    (tmp_path / "tensorrt").mkdir()
    return tmp_path / "tensorrt"


def test_stub_only_tensorrt_counts_as_absent(planted_tensorrt):
    # what tensorrt-stubs installs: a folder of .pyi files, which imports as an empty namespace package
    (planted_tensorrt / "__init__.pyi").write_text("__version__: str\n")
    with pytest.raises(DiffsrError, match="TensorRT is not installed"):
        tensorrt_module()
    assert not tensorrt_available()


def test_a_real_tensorrt_module_is_returned(planted_tensorrt):
    (planted_tensorrt / "__init__.py").write_text("__version__ = '10.13.0.35'\n")
    assert tensorrt_module().__version__ == "10.13.0.35" and tensorrt_available()
