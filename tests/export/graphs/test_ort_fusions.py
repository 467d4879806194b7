"""ONNX Runtime's fused graphs: made by the export, loaded by the onnxruntime backend, equal to the plain
graph, and never in what TensorRT reads."""

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.exporter import export_onnx
from diffsr.export.graphs.manifest import FUSED, file_sha256, read_manifest
from diffsr.export.graphs.onnx_export import lint_for_tensorrt
from diffsr.export.model.families import preset
from diffsr.export.model.samples import sample_inputs
from diffsr.runtime.loading import load_runners

SUBMODULES = preset("tiny").submodules


def test_export_writes_fused_graphs_that_the_backend_loads(tiny_checkpoint, tiny_onnx):
    manifest = read_manifest(tiny_onnx)
    fused = {name: manifest["submodules"][name]["fp32"][FUSED] for name in SUBMODULES}
    assert fused["controlnet_unet"]["fusions"].get("MultiHeadAttention", 0) >= 4, fused["controlnet_unet"]
    runners = load_runners("onnxruntime", tiny_checkpoint, onnx_dir=tiny_onnx)
    assert all(runners[name].path.name == f"{name}.ort.onnx" for name in SUBMODULES)
    feed = sample_inputs(tiny_checkpoint.model, "controlnet_unet",
                         dict(batch=1, cfg_batch=2, text_batch=2, latent_height=16, latent_width=24))
    plain = ort.InferenceSession(str(tiny_onnx / "controlnet_unet.onnx"), providers=["CPUExecutionProvider"])
    want = plain.run(None, {k: v.numpy() for k, v in feed.items()})[0]
    got = runners["controlnet_unet"].infer(feed)["noise_pred"].numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_tensorrt_never_reads_contrib_ops(tiny_onnx):
    for name in SUBMODULES:
        graph = onnx.load(str(tiny_onnx / Precision.FP16.filename(name)), load_external_data=False).graph
        assert not [n for n in graph.node if n.domain not in ("", "ai.onnx")], name
    with pytest.raises(DiffsrError, match="com.microsoft"):
        lint_for_tensorrt(tiny_onnx / "controlnet_unet.ort.onnx")


def test_a_changed_fused_graph_is_made_again_and_fusions_can_be_left_out(tiny_checkpoint, tiny_onnx, tmp_path):
    out = tmp_path / "onnx"
    shutil.copytree(tiny_onnx, out)
    fused = out / "vae_decoder.ort.onnx"
    fused.write_bytes(fused.read_bytes() + b"\0")
    manifest = export_onnx(tiny_checkpoint, out)
    assert manifest["submodules"]["vae_decoder"]["fp32"][FUSED]["sha256"] == file_sha256(fused)
    ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])  # a whole graph again
    assert "fp16" in manifest["submodules"]["vae_decoder"]  # the FP32 graph was kept, so its FP16 graph too
    manifest = export_onnx(tiny_checkpoint, out, ort_fusions=False)
    assert not fused.exists() and FUSED not in manifest["submodules"]["vae_decoder"]["fp32"]
    runners = load_runners("onnxruntime", tiny_checkpoint, onnx_dir=out)
    assert runners["vae_decoder"].path.name == "vae_decoder.onnx"


def _io(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in [*graph.input, *graph.output]}


@pytest.mark.parametrize("name", SUBMODULES)
def test_fused_graphs_keep_the_signature_interface(tiny_onnx, name):
    assert _io(tiny_onnx / f"{name}.ort.onnx") == _io(tiny_onnx / f"{name}.onnx")
