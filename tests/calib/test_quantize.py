"""INT8 post-training quantization: the graph TensorRT will read, the manifest, and end-to-end quality."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.app.measure.parity import check_parity
from diffsr.calib.quantize import HELD_OUT, Int8Calibration
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import read_manifest, verified_files
from diffsr.export.graphs.onnx_export import lint_for_tensorrt
from diffsr.export.graphs.to_int8 import check_qdq
from diffsr.export.model.families import preset

SUBMODULES = preset("tiny").submodules


@pytest.fixture(scope="module")
def tiny_int8(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    """`diffsr quantize --out` into a new folder (the session's export stays as it is): one calibration
    photo with two prompts over 4 steps."""
    out = tmp_path_factory.mktemp("int8") / "onnx"
    result = CliRunner().invoke(app, ["quantize", "--checkpoint", str(tiny_checkpoint.path), "--onnx", str(tiny_onnx),
                                      "--out", str(out), "--calib-size", "1", "--calib-steps", "4"])
    assert result.exit_code == 0, result.output
    return out


def _graph(path):
    model = onnx.load(str(path))
    return model, {t.name: t for t in model.graph.initializer}


def test_every_qdq_pair_is_symmetric_and_weights_per_output_channel(tiny_int8):
    model, inits = _graph(tiny_int8 / "controlnet_unet.int8.onnx")
    users = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 50
    weights = 0
    for node in qdq:
        zero = inits[node.input[2]]
        assert zero.data_type == TensorProto.INT8 and not numpy_helper.to_array(zero).any(), node.name
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights += 1
            (user,) = users[node.output[0]]
            axis = next(a.i for a in node.attribute if a.name == "axis")
            scale = numpy_helper.to_array(inits[node.input[1]])
            assert axis == {"Conv": 0, "MatMul": 1}[user.op_type], node.name
            assert scale.shape == (inits[node.input[0]].dims[axis],) and scale.dtype == np.float16, node.name
            assert not any(key in node.input[0] for key in preset("tiny").int8_kept), node.input[0]  # kept layers stay FP16
        if node.op_type == "QuantizeLinear":  # activations only: never an INT8 layer's output
            producer = next((n for n in model.graph.node if node.input[0] in n.output), None)
            assert producer is None or producer.op_type not in ("Conv", "MatMul") or not any(
                i in inits and inits[i].data_type == TensorProto.INT8 for i in producer.input), node.name
    assert weights > 20
    assert not any(t.data_type == TensorProto.INT32 for t in inits.values())  # float bias
    assert next(o.version for o in model.opset_import if o.domain == "") == 19  # FP16 scales
    lint_for_tensorrt(tiny_int8 / "controlnet_unet.int8.onnx")  # every op and dtype TensorRT's parser takes
    assert check_qdq(tiny_int8 / "controlnet_unet.int8.onnx").weight_tensors == weights


def test_check_qdq_refuses_an_asymmetric_pair(tiny_int8, tmp_path):
    model, inits = _graph(tiny_int8 / "controlnet_unet.int8.onnx")
    node = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zero = inits[node.input[2]]
    zero.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(zero).shape, 3, np.int8), zero.name))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(DiffsrError, match="not symmetric"):
        check_qdq(tmp_path / "bad.onnx")


def test_manifest_records_calibration_and_what_stayed_out(tiny_checkpoint, tiny_onnx, tiny_int8):
    manifest = read_manifest(tiny_int8)
    cal = manifest["int8_calibration"]
    assert cal["submodules"] == ["controlnet_unet"] and cal["steps"] == 4 and cal["method"] == "percentile"
    assert not set(cal["photos"]) & set(HELD_OUT)
    reasons = {e["reason"] for e in manifest["submodules"]["controlnet_unet"]["int8"]["excluded"]}
    assert {"first convolution", "last convolution", "attention's matmul of two activations",
            "shortcut convolution"} <= reasons
    paths = verified_files(tiny_int8, tiny_checkpoint, Precision.INT8)
    assert paths["controlnet_unet"].name == "controlnet_unet.int8.onnx"
    assert all(paths[n].name == f"{n}.fp16.onnx" for n in SUBMODULES if n != "controlnet_unet")
    # the folder quantize read from is untouched: no INT8 entry, its graphs still match their hashes
    assert "int8_calibration" not in json.loads((tiny_onnx / "manifest.json").read_text())
    verified_files(tiny_onnx, tiny_checkpoint, Precision.FP16)
    with pytest.raises(DiffsrError, match="diffsr quantize"):
        verified_files(tiny_onnx, tiny_checkpoint, Precision.INT8)


def test_int8_pipeline_within_30_db_of_fp32_on_unseen_photos(tiny_checkpoint, tiny_int8):
    report = check_parity(tiny_checkpoint, tiny_int8, Precision.INT8, size=(64, 48), steps=8, shapes=("min",))
    assert [o.submodule for o in report.outputs] == ["controlnet_unet"]
    assert [i.photo for i in report.images] == list(HELD_OUT)
    assert all(i.psnr_db >= 30.0 for i in report.images), report.to_json()
    assert report.passed and report.outputs[0].rel > 1e-4  # INT8 really ran: not the FP32 graph's error


def test_calibration_size_and_settings_are_checked(tiny_checkpoint, tiny_onnx):
    from diffsr.calib.quantize import quantize

    with pytest.raises(DiffsrError, match="calib-size"):
        Int8Calibration.of_size(len(SUBMODULES) + 10)
    with pytest.raises(DiffsrError, match=r"submodules to quantize \['unet'\] must be one or more of \['text_encoder'"):
        quantize(tiny_checkpoint, tiny_onnx, Int8Calibration(submodules=("unet",)))  # before any calibration run
    result = CliRunner().invoke(app, ["quantize", "--checkpoint", "x", "--onnx", "y", "--method", "minmax"])
    assert result.exit_code == 2 and "percentile" in result.output


def test_engine_builds_take_the_int8_graphs_verified(tiny_int8, tmp_path):
    import shutil

    from diffsr.export.engines.build import build_engines
    from diffsr.export.engines.metadata import tensorrt_available

    copy = shutil.copytree(tiny_int8, tmp_path / "onnx")
    int8 = copy / "controlnet_unet.int8.onnx"
    int8.write_bytes(int8.read_bytes() + b"\0")
    with pytest.raises(DiffsrError, match="controlnet_unet: .* does not match its sha256"):
        build_engines(copy, tmp_path / "engines", precision=Precision.INT8)
    with pytest.raises(DiffsrError, match="fp16 or int8"):
        build_engines(tiny_int8, tmp_path / "engines", precision=Precision.FP32)
    if not tensorrt_available():  # the verified folder gets as far as TensorRT itself
        with pytest.raises(DiffsrError, match="TensorRT is not installed"):
            build_engines(tiny_int8, tmp_path / "engines", precision=Precision.INT8)


def test_int8_graph_keeps_the_signature_interface(tiny_int8):
    def io(path):
        graph = onnx.load(str(path), load_external_data=False).graph
        return {v.name: (v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in [*graph.input, *graph.output]}

    assert io(tiny_int8 / "controlnet_unet.int8.onnx") == io(tiny_int8 / "controlnet_unet.onnx")
