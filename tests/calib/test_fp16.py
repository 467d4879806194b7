"""The FP16 safety check: its rules on a hand-made graph, and its effect on the real UNet."""


import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from diffsr.calib.keep_fp32 import HEADROOM, activation_ranges, fp16_check, fp16_error, fp32_layers
from diffsr.calib.record import Calibration, record_feeds
from diffsr.export.graphs.to_fp16 import FP16_MAX, fp16_from_fp32
from diffsr.export.model.samples import sample_inputs
from diffsr.runtime.loading import load_runners


def _graph(tmp_path):
    """t -> Mul(freq) -> Sin -> y ; x -> Add(x, x) -> z"""
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])
    freq = helper.make_tensor("freq", TensorProto.FLOAT, [4], [1.0, 0.5, 0.25, 0.125])
    nodes = [helper.make_node("Mul", ["t", "freq"], ["arg"], name="mul"),
             helper.make_node("Sin", ["arg"], ["y"], name="sin"),
             helper.make_node("Add", ["x", "x"], ["z"], name="add")]
    model = helper.make_model(helper.make_graph(nodes, "g", [t, x], [y, z], [freq]),
                              opset_imports=[helper.make_opsetid("", 18)])
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    return path


def test_rules_name_overflow_and_periodic_layers(tmp_path):
    path = _graph(tmp_path)
    calm = {"t": 1.0, "arg": 1.0, "y": 1.0, "x": 10.0, "z": 20.0}
    assert fp32_layers(path, calm) == []
    hot = {"t": 951.0, "arg": 951.0, "y": 1.0, "x": 3e4, "z": 6e4}
    kept = {k.node: k for k in fp32_layers(path, hot)}
    assert set(kept) == {"add", "mul", "sin"}
    assert f"above FP16's {FP16_MAX:g} / {HEADROOM:g}" in kept["add"].reason
    assert "periodic op on arguments up to 951" in kept["sin"].reason and "spacing there is 0.5" in kept["sin"].reason
    assert kept["mul"].reason.startswith("feeds sin:")


def test_converted_graph_runs_and_keeps_chosen_nodes_fp32(tmp_path):
    src = _graph(tmp_path)
    dst = fp16_from_fp32(src, tmp_path / "g16.onnx", {"mul", "sin"}, external_data=False)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(onnx.load(str(dst))), full_check=True)
    session = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    t = np.array([951, 900, 500, 3], np.float32)
    y, z = session.run(None, {"t": t, "x": np.full(4, 1.5, np.float32)})
    np.testing.assert_allclose(y, np.sin(t * [1.0, 0.5, 0.25, 0.125]), atol=1e-5)  # FP32 kept: exact
    assert y.dtype == z.dtype == np.float32 and (z == 3.0).all()


def test_keeping_the_timestep_embedding_fp32_cuts_the_unet_error(tiny_checkpoint, tiny_reference, tiny_onnx, tmp_path):
    bare = fp16_from_fp32(tiny_onnx / "controlnet_unet.onnx", tmp_path / "bare.onnx", set(), external_data=False)
    errors = {}
    for label, path in (("bare", bare), ("checked", tiny_onnx / "controlnet_unet.fp16.onnx")):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = sample_inputs(tiny_checkpoint.model, "controlnet_unet",
                             dict(batch=1, cfg_batch=2, text_batch=2, latent_height=16, latent_width=16))
        feed["timestep"] = torch.full((2,), 900.0)
        with torch.no_grad():
            ref = tiny_reference["controlnet_unet"](*feed.values()).numpy()
        out = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        errors[label] = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert errors["checked"] < errors["bare"] / 2, errors


def test_recorder_sees_every_timestep(tiny_checkpoint, photo_lq):
    feeds = record_feeds(tiny_checkpoint, load_runners("torch", tiny_checkpoint), [photo_lq[:32, :32]], ["a"], steps=3)
    assert len(feeds["text_encoder"]) == len(feeds["lq_encoder"]) == len(feeds["vae_decoder"]) == 1
    assert len(feeds["controlnet_unet"]) == len(feeds["fusion_transformer"]) == 3
    timesteps = [f["timestep"][0].item() for f in feeds["controlnet_unet"]]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3


def test_calibration_runs_whole_images_whatever_the_checkpoints_tiles(tiny_checkpoint, photo_lq):
    """A checkpoint whose default tiles are small (8 cells) would cut a 64 px photo into 3 x 3 tiles, the last
    batch of tiles smaller than the others; ONNX Runtime's INT8 calibrators stack every feed of an input, so
    each submodule sees one shape."""
    import dataclasses

    from tests.conftest import NARROW_TILING

    tiled = dataclasses.replace(tiny_checkpoint, defaults=tiny_checkpoint.defaults.replace(**NARROW_TILING))
    feeds = record_feeds(tiled, load_runners("torch", tiled), [photo_lq], ["a"], steps=2)
    for name, recorded in feeds.items():
        assert len({tuple(tuple(t.shape) for t in feed.values()) for feed in recorded}) == 1, name
    assert feeds["controlnet_unet"][0]["sample"].shape[-2:] == (32, 32)  # the whole 64 px photo's latent (x4)


@pytest.fixture()
def overflowing_decoder(tiny_onnx, tmp_path):
    """The tiny VAE decoder's graph with its first convolution's weight scaled 30000x: activations reach 2e5,
    past FP16's 65504 (random weights never do; SDXL's real VAE does, in its up blocks)."""
    model = onnx.load(str(tiny_onnx / "vae_decoder.onnx"))  # exported with inferred types, as the check reads
    (weight,) = [w for w in model.graph.initializer if w.name == "decoder.conv_in.weight"]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(3e4), weight.name))
    path = tmp_path / "vae_decoder.onnx"
    onnx.save(model, str(path))
    g = torch.Generator().manual_seed(0)
    return path, [{"latent": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(3)]


def test_a_planted_overflow_is_found_and_the_fp16_decoder_stays_finite(overflowing_decoder, tmp_path):
    path, feeds = overflowing_decoder
    kept = fp32_layers(path, activation_ranges(path, feeds))
    assert any("above FP16's" in k.reason for k in kept) and {"Conv", "Add"} <= {k.op_type for k in kept}
    tolerance = 1e-2  # parity's FP16 bound
    assert fp16_error(path, kept, feeds) <= tolerance  # the kept layers in FP32: finite, within tolerance
    assert fp16_error(path, [], feeds) == float("inf")  # without the FP32 fallback: NaN or infinity


def test_a_force_upcast_vae_stays_fp32_unless_fp16_is_proven(sdxl_checkpoint, sdxl_onnx, monkeypatch):
    from diffsr.calib import keep_fp32 as check

    small = Calibration(photos=("coffee",), prompts=("",), steps=1, size=16)
    upcast = sdxl_checkpoint.model.force_upcast(sdxl_checkpoint.path)
    assert upcast == ("lq_encoder", "vae_decoder")  # the networks made of the VAE
    proven = fp16_check(sdxl_checkpoint, sdxl_onnx, small)  # random weights: FP16 is within tolerance
    monkeypatch.setattr(check, "PROOF_REL", 0.0)  # nothing can be proven now
    unproven = fp16_check(sdxl_checkpoint, sdxl_onnx, small)
    for name in upcast:
        nodes = {n.name for n in onnx.load(str(sdxl_onnx / f"{name}.onnx"), load_external_data=False).graph.node}
        assert {k.node for k in unproven[name]} == nodes and "force_upcast" in unproven[name][0].reason
        assert len(proven[name]) < len(nodes)
    assert unproven["controlnet_unet"] == proven["controlnet_unet"]  # only the VAE's submodules are concerned


def test_a_planted_t5_overflow_is_kept_fp32(dit4sr_onnx, tmp_path):
    """T5 is famous for FP16 overflow in its feed-forward output (`wo`; transformers keeps those layers FP32):
    dit4sr-tiny's T5 with every `wo` scaled 30000x puts the residual stream past FP16's range, and the check
    keeps the overflowing MatMuls and Adds FP32 (the kept graph within parity's FP16 bound); unscaled, it keeps
    nothing. (ONNX Runtime's CPU kernels compute FP16 MatMuls in FP32, so the bare graph stays finite here:
    the check reads ranges, not one backend's luck.)"""
    model = onnx.load(str(dit4sr_onnx / "t5_encoder.onnx"))
    wo = [w for w in model.graph.initializer if w.name.endswith("DenseReluDense.wo.weight")]
    assert len(wo) == 2  # one per layer
    for w in wo:
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * np.float32(3e4), w.name))
    hot = tmp_path / "t5_encoder.onnx"
    onnx.save(model, str(hot))
    g = torch.Generator().manual_seed(0)
    feeds = [{"input_ids_3": torch.randint(0, 32128, (2, 24), generator=g, dtype=torch.int32)} for _ in range(2)]
    kept = fp32_layers(hot, activation_ranges(hot, feeds))
    overflow = [k for k in kept if "above FP16's" in k.reason]
    assert {"MatMul", "Add"} <= {k.op_type for k in overflow}, kept
    assert fp16_error(hot, kept, feeds) <= 1e-2
    calm = dit4sr_onnx / "t5_encoder.onnx"
    assert fp32_layers(calm, activation_ranges(calm, feeds)) == []
