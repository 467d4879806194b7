"""The exported graphs: names, dims and dtypes from the signatures, checks, manifest, TensorRT lint."""

import json

import onnx
import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.onnx_export import lint_for_tensorrt, tensorrt_support
from diffsr.export.model.families import preset

SUBMODULES = preset("tiny").submodules


def _io(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        v.name: (str(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)), tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
        for v in [*graph.input, *graph.output]
    }


@pytest.mark.parametrize("model,precision", [("tiny", Precision.FP32), ("tiny", Precision.FP16), ("sdxl", Precision.FP32)])
@pytest.mark.parametrize("name", SUBMODULES)  # INT8: tests/calib/test_quantize.py
def test_graph_interface_is_the_signature(request, model, name, precision):
    ckpt, onnx_dir = (request.getfixturevalue(f"{model}_{kind}") for kind in ("checkpoint", "onnx"))
    sig = ckpt.model.signature(name)
    expected = {t.name: (t.dtype, t.shape) for t in sig.inputs + sig.outputs}
    assert _io(onnx_dir / precision.filename(name)) == expected


def test_sdxl_graphs_take_the_second_text_and_the_micro_conditioning(sdxl_onnx):
    unet = _io(sdxl_onnx / "controlnet_unet.onnx")
    assert unet["text_embeds"] == ("float32", ("cfg_batch", 48)) and unet["time_ids"] == ("float32", ("cfg_batch", 6))
    assert unet["text_embeddings"] == ("float32", ("cfg_batch", 77, 80))  # 32 + 48: both encoders' states
    text = _io(sdxl_onnx / "text_encoder.onnx")
    assert set(text) == {"input_ids", "input_ids_2", "text_embeddings", "text_embeds"}


def test_manifest_records_files_signatures_checkpoint_and_versions(tiny_checkpoint, tiny_onnx):
    from diffsr.export.graphs.manifest import checkpoint_digest, file_sha256, signature_hash

    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    assert manifest["checkpoint"]["sha256"] == checkpoint_digest(tiny_checkpoint.path)
    assert manifest["opset"] == 18 and manifest["versions"]["torch"].startswith("2.")
    assert manifest["family"] == "sd" and manifest["model"] == json.loads(json.dumps(tiny_checkpoint.model.to_json()))
    sigs = tiny_checkpoint.model.signatures()
    for name in SUBMODULES:
        entry = manifest["submodules"][name]
        assert entry["signature_sha256"] == signature_hash(sigs[name])
        for precision in ("fp32", "fp16"):
            assert entry[precision]["sha256"] == file_sha256(tiny_onnx / entry[precision]["file"])


def test_fp16_graphs_are_half_inside_with_kept_layers_in_fp32(tiny_onnx):
    manifest = json.loads((tiny_onnx / "manifest.json").read_text())
    for name in SUBMODULES:
        model = onnx.load(str(tiny_onnx / Precision.FP16.filename(name)))
        weights = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        half = [t for t in weights if t.data_type == onnx.TensorProto.FLOAT16]
        assert len(half) / len(weights) > 0.9, name
        types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
        nodes = {n.name: n for n in model.graph.node}
        for layer in manifest["submodules"][name]["fp16"]["kept_fp32"]:
            assert layer["reason"] and layer["node"] in nodes
            float_outputs = [types[o] for o in nodes[layer["node"]].output if types.get(o) in (1, 10)]
            assert all(t == onnx.TensorProto.FLOAT for t in float_outputs), layer


def test_fp16_check_keeps_the_timestep_embedding_in_fp32(tiny_onnx):
    """The UNet's sin/cos of t (up to ~950) lose digits in FP16: the check must name them and why."""
    kept = json.loads((tiny_onnx / "manifest.json").read_text())["submodules"]["controlnet_unet"]["fp16"]["kept_fp32"]
    periodic = [k for k in kept if k["op_type"] in ("Sin", "Cos")]
    assert len(periodic) >= 2 and all("periodic" in k["reason"] for k in periodic)
    assert all(k["max_abs"] > 500 for k in periodic)  # recorded over all timesteps of real runs


def test_tensorrt_support_matrix_is_sourced_data():
    data = tensorrt_support()
    assert "onnx-tensorrt" in data["source"] and data["opset_max"] >= 18
    assert data["operators"]["Conv"]["supported"] and not data["operators"]["Unique"]["supported"]


def _graph(op_type, tmp_path, opset=18, domain=""):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])
    node = onnx.helper.make_node(op_type, ["x"], ["y"], name="the_node", domain=domain)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", opset)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def test_lint_refuses_unsupported_ops_naming_the_node(tmp_path):
    lint_for_tensorrt(_graph("Relu", tmp_path))  # supported: no error
    with pytest.raises(DiffsrError, match=r"node 'the_node' is a ai.onnx::Unique"):
        lint_for_tensorrt(_graph("Unique", tmp_path))
    with pytest.raises(DiffsrError, match=r"node 'the_node' is a com.example::Relu"):
        lint_for_tensorrt(_graph("Relu", tmp_path, domain="com.example"))
    with pytest.raises(DiffsrError, match="opset 22 is outside TensorRT's 9..20"):
        lint_for_tensorrt(_graph("Relu", tmp_path, opset=22))
