"""A later step refuses ONNX files that do not match their checkpoint, signature or bytes."""

import json
import shutil

import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.model.families import preset
from diffsr.export.model.random_init import init_checkpoint

SUBMODULES = preset("tiny").submodules


@pytest.fixture()
def onnx_copy(tiny_onnx, tmp_path):
    return shutil.copytree(tiny_onnx, tmp_path / "onnx")


def test_matching_files_are_accepted(tiny_checkpoint, tiny_onnx):
    for precision in (Precision.FP32, Precision.FP16):  # INT8: tests/calib/test_int8.py
        paths = verified_files(tiny_onnx, tiny_checkpoint, precision)
        assert sorted(paths) == sorted(SUBMODULES)


def test_modified_file_is_refused(tiny_checkpoint, onnx_copy):
    path = onnx_copy / "vae_decoder.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DiffsrError, match=r"vae_decoder: .*vae_decoder.onnx does not match its sha256"):
        verified_files(onnx_copy, tiny_checkpoint, Precision.FP32)


def test_other_checkpoint_is_refused(tiny_onnx, tmp_path):
    other = init_checkpoint("tiny", seed=1, out=tmp_path / "other")
    with pytest.raises(DiffsrError, match="was exported from another checkpoint"):
        verified_files(tiny_onnx, other, Precision.FP32)


def test_other_signature_is_refused(tiny_checkpoint, onnx_copy):
    manifest = json.loads((onnx_copy / "manifest.json").read_text())
    manifest["submodules"]["fusion_transformer"]["signature_sha256"] = "0" * 64
    (onnx_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiffsrError, match="fusion_transformer: the ONNX file was exported with another signature"):
        verified_files(onnx_copy, tiny_checkpoint, Precision.FP32)


def test_missing_manifest_file_or_precision_is_refused(tiny_checkpoint, onnx_copy, tmp_path):
    (onnx_copy / "text_encoder.onnx").unlink()
    with pytest.raises(DiffsrError, match="listed in the manifest but missing"):
        verified_files(onnx_copy, tiny_checkpoint, Precision.FP32)
    manifest = json.loads((onnx_copy / "manifest.json").read_text())
    del manifest["submodules"]["unet" if "unet" in manifest["submodules"] else "controlnet_unet"]["fp16"]
    (onnx_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiffsrError, match=r"no fp16 controlnet_unet .*export with --fp16"):
        verified_files(onnx_copy, tiny_checkpoint, Precision.FP16, ("controlnet_unet",))
    with pytest.raises(DiffsrError, match="no manifest.json"):
        verified_files(tmp_path, tiny_checkpoint, Precision.FP32)
