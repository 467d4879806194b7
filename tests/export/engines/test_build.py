"""`diffsr build-engines`: what it consumes is checked everywhere; the build itself needs TensorRT and a GPU."""

import json
import logging
import shutil

import pytest
import torch
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.export.core.errors import DiffsrError
from diffsr.export.engines.build import _builder_errors, build_engines
from diffsr.export.engines.metadata import read_meta, tensorrt_available

needs_tensorrt = pytest.mark.skipif(not (tensorrt_available() and torch.cuda.is_available()),
                                    reason="needs TensorRT and a CUDA GPU (the builder cannot be installed here)")


@pytest.fixture()
def onnx_copy(tiny_onnx, tmp_path):
    return shutil.copytree(tiny_onnx, tmp_path / "onnx")


def test_modified_fp16_graph_is_refused_before_tensorrt_is_needed(onnx_copy, tmp_path):
    path = onnx_copy / "fusion_transformer.fp16.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DiffsrError, match="fusion_transformer: .* does not match its sha256 in the manifest"):
        build_engines(onnx_copy, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


def test_folder_without_fp16_graphs_is_refused(onnx_copy, tmp_path):
    manifest = json.loads((onnx_copy / "manifest.json").read_text())
    for entry in manifest["submodules"].values():
        entry.pop("fp16")
    (onnx_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiffsrError, match="has no fp16 text_encoder in its manifest .export with --fp16."):
        build_engines(onnx_copy, tmp_path / "engines")


def test_changed_signature_is_refused(onnx_copy, tmp_path):
    manifest = json.loads((onnx_copy / "manifest.json").read_text())
    manifest["submodules"]["vae_decoder"]["signature_sha256"] = "0" * 64
    (onnx_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiffsrError, match="vae_decoder: the ONNX file was exported with another signature"):
        build_engines(onnx_copy, tmp_path / "engines")


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_name="jetson"), "unknown target 'jetson'; choose one of \\['edge', 'server'\\]"),
    (dict(max_batch=0), "--max-batch 0 is below"),
    (dict(opt_level=9), "optimisation level 9 is out of range: use 0 to 5"),
])
def test_bad_arguments_are_refused(tiny_onnx, tmp_path, kwargs, message):
    with pytest.raises(DiffsrError, match=message):
        build_engines(tiny_onnx, tmp_path / "engines", **kwargs)


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_without_tensorrt_a_verified_folder_says_what_is_missing(tiny_onnx, tmp_path):
    with pytest.raises(DiffsrError, match="TensorRT is not installed: install the `tensorrt` wheel"):
        build_engines(tiny_onnx, tmp_path / "engines")


def test_cli_reports_errors_on_one_line(onnx_copy, tmp_path):
    (onnx_copy / "manifest.json").unlink()
    result = CliRunner().invoke(app, ["build-engines", "--onnx", str(onnx_copy), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "error: no manifest.json in" in result.output


def test_builder_errors_reach_the_exception():
    # TensorRT's and its parser's errors arrive through polygraphy's logger; they are collected
    from polygraphy.logger import G_LOGGER

    with _builder_errors() as errors:
        G_LOGGER.warning("a warning is not an error")
        G_LOGGER.error("[graphShapeAnalyzer.cpp::analyzeShapes::2084] Error Code 4: Internal Error (shape mismatch)")
    assert errors == ["[graphShapeAnalyzer.cpp::analyzeShapes::2084] Error Code 4: Internal Error (shape mismatch)"]
    assert not any(isinstance(h, logging.Handler) and h.__class__.__name__ == "Collect"
                   for h in logging.getLogger("Polygraphy").handlers)


@needs_tensorrt
@pytest.mark.parametrize("static", [False, True])
def test_build_writes_plans_that_match_their_metadata(tiny_onnx, tmp_path, static):
    from diffsr.export.engines.metadata import current_environment
    from diffsr.export.graphs.manifest import file_sha256

    out, cache = tmp_path / "engines", tmp_path / "timing.cache"
    metas = build_engines(tiny_onnx, out, timing_cache=cache, static=static)
    assert cache.is_file()
    for name, meta in metas.items():
        assert read_meta(out / f"{name}.plan") == meta
        assert meta.plan_sha256 == file_sha256(out / f"{name}.plan")
        assert meta.built_with == current_environment() and meta.flags["strongly_typed"]
        assert all((r[0] == r[2]) == static for r in meta.profile.values())
    again = build_engines(tiny_onnx, out, timing_cache=cache, static=static)  # up to date: kept, not rebuilt
    assert again == metas
