"""The edge memory budget: the liveness walk and the INT8 weight count on graphs worked out by hand, then
the real export."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.export.core.precision import Precision
from diffsr.export.engines.budget import (
    RUNTIME_RESERVE,
    EngineBudget,
    attention_scores,
    budget,
    device_total,
    engine_budget,
)
from diffsr.export.model.families import preset

SUBMODULES = preset("tiny").submodules


def _save(tmp_path, nodes, inputs, outputs, inits=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def test_peak_and_weights_of_two_convolutions(tmp_path):
    # x (1,4,8,8) -> conv_in (kept) -> y1 (1,8,8,8) -> Relu -> y2 -> block conv (INT8) -> out (1,4,8,8)
    w1 = numpy_helper.from_array(np.ones((8, 4, 1, 1), np.float32), "conv_in.weight")
    w2 = numpy_helper.from_array(np.ones((4, 8, 1, 1), np.float32), "block.conv.weight")
    nodes = [helper.make_node("Conv", ["x", "conv_in.weight"], ["y1"], name="c1"),
             helper.make_node("Relu", ["y1"], ["y2"], name="r"),
             helper.make_node("Conv", ["y2", "block.conv.weight"], ["out"], name="c2")]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, "h", "w"])],
                 [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 4, "h", "w"])], [w1, w2])
    e = engine_budget(path, "g", {"x": (1, 4, 8, 8)}, preset("tiny").int8_kept)  # SD's: conv_in stays FP16
    # FP16 bytes: x 512, y1 1024, y2 1024, out 512; x is freed after c1, y1 after r: peak y1 + y2
    assert e.activations == 2048
    assert e.weights_fp16 == 2 * 64
    assert e.weights_int8 == 2 * 32 + (32 + 2 * 4)  # conv_in stays FP16; the block conv: a byte a weight + 4 scales


def test_attention_scores_are_not_counted(tmp_path):
    f = TensorProto.FLOAT
    nodes = [helper.make_node("MatMul", ["q", "k"], ["s"], name="qk"),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="sm"),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="pv")]
    inputs = [helper.make_tensor_value_info("q", f, [1, 16, 8]), helper.make_tensor_value_info("k", f, [1, 8, 16]),
              helper.make_tensor_value_info("v", f, [1, 16, 8])]
    path = _save(tmp_path, nodes, inputs, [helper.make_tensor_value_info("o", f, [1, 16, 8])])
    assert attention_scores(onnx.load(str(path)).graph) == {"s", "p"}
    e = engine_budget(path, "g", {"q": (1, 16, 8), "k": (1, 8, 16), "v": (1, 16, 8)}, {})
    assert e.activations == 3 * 256  # q, k, v; with the 16x16 scores it would be 256 + 512 + 512


def test_budget_of_the_export_at_the_edge_target(tiny_onnx, tmp_path):
    engines = budget(tiny_onnx, "edge")
    assert [e.submodule for e in engines] == list(SUBMODULES)
    unet = engines[SUBMODULES.index("controlnet_unet")]
    assert unet.shapes["sample"] == (2, 4, 96, 96)  # CFG batch 2; 1.5 x the native 64 latent cells
    assert 0 < unet.weights_int8 < unet.weights_fp16 and unet.activations > 0 and unet.quantized
    assert [e.submodule for e in engines if e.quantized] == ["controlnet_unet"]  # what `diffsr quantize` does by default
    assert RUNTIME_RESERVE < device_total(engines, Precision.INT8) < device_total(engines, Precision.FP16)
    result = CliRunner().invoke(app, ["budget", "--onnx", str(tiny_onnx), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    assert "Orin 8 " in result.output and (tmp_path / "b.json").is_file()


def test_totals_hold_every_weight_the_largest_scratch_and_the_reserve():
    """Hand-made engines: the dropped one holds the largest scratch, so leaving it out lowers the peak too."""
    def engine(name, fp16, int8, scratch, droppable=""):
        return EngineBudget(name, {}, fp16, int8, scratch, quantized=int8 < fp16, droppable=droppable)

    engines = [engine("a", 100, 40, 30), engine("b", 10, 10, 5), engine("t5", 1000, 1000, 70, droppable="zeros")]
    assert device_total(engines, Precision.FP16) == 1110 + 70 + RUNTIME_RESERVE
    assert device_total(engines, Precision.INT8) == 1050 + 70 + RUNTIME_RESERVE
    assert device_total(engines, Precision.FP16, dropped=True) == 110 + 30 + RUNTIME_RESERVE


def test_dit4sr_budget_with_and_without_t5_and_the_captioner(dit4sr_onnx, tmp_path):
    """T5 may be left out (diffusers' SD3 pipeline with text_encoder_3=None gives zeros), and so may the captioner
    (a typed prompt instead): both totals, the second exactly their weights (and, were one the largest, its scratch)
    below the first. The captioner's cache is budgeted at its largest: every beam, the longest cache."""
    engines = budget(dit4sr_onnx, "edge")
    dropped = {e.submodule: e for e in engines if e.droppable}
    assert set(dropped) == {"t5_encoder", "caption_image", "caption_prefill", "caption_decode"}
    t5, decode = dropped["t5_encoder"], dropped["caption_decode"]
    assert "zeros" in t5.droppable and t5.shapes["input_ids_3"] == (2, 24)
    assert "typed prompt" in decode.droppable
    assert decode.shapes["past_keys"] == (2, 5, 4, 128, 8)  # blip2-tiny: 2 layers, 5 beams, 4 heads, 128 slots
    for precision in (Precision.FP16, Precision.INT8):
        assert device_total(engines, precision) > device_total(engines, precision, dropped=True) > RUNTIME_RESERVE
    result = CliRunner().invoke(app, ["budget", "--onnx", str(dit4sr_onnx), "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "b.json").read_text())  # what the table was made of, as written
    kept = [r for r in rows if not r["droppable"]]
    by_hand = (sum(r["weights_fp16"] for r in kept) + max(r["activations"] for r in kept) + RUNTIME_RESERVE) / 2**30
    totals = [line.split("│")[3].strip() for line in result.output.splitlines() if "│ no caption_image," in line]
    assert totals[0] == f"{by_hand:.2f}" and len(totals) == 2
    said = " ".join(result.output.split())  # the table's caption, unwrapped
    assert "no caption_image, caption_prefill, caption_decode: a typed prompt" in said and "no t5_encoder: zeros" in said
