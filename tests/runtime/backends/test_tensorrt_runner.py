"""The TensorRT runner's own work (metadata checks, buffers, addresses, shapes, shared scratch) on
every machine, against `fake_tensorrt`: TensorRT's runtime cannot exist without a GPU, so a
stand-in running ONNX Runtime at the raw addresses takes its place (and only its place)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import diffsr.export.engines.metadata as engines_module
import diffsr.runtime.backends.tensorrt_runner as tensorrt_runner
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.engines.build import engine_profiles, profile_json
from diffsr.export.engines.metadata import EngineMeta, Environment, tensorrt_available, write_meta
from diffsr.export.graphs.manifest import file_sha256, read_manifest, signature_hash
from diffsr.export.model.dims import target
from diffsr.export.model.settings import Request
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline
from tests.runtime.backends import fake_tensorrt

HERE = Environment(fake_tensorrt.__version__, "Fake GPU", "9.0")


@pytest.fixture()
def fake_trt(monkeypatch):
    for module in (tensorrt_runner, engines_module):
        monkeypatch.setattr(module, "trt", fake_tensorrt, raising=False)
    monkeypatch.setattr(tensorrt_runner, "tensorrt_module", lambda: fake_tensorrt)
    return fake_tensorrt


def write_plans(ckpt, onnx_dir: Path, out: Path, extra_io: dict | None = None, precision=Precision.FP16) -> Path:
    """Plans and metadata as `diffsr build-engines` would write them from the `precision` graphs, the plans
    being fake_tensorrt's."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(onnx_dir)
    sigs, profiles = ckpt.model.signatures(), engine_profiles(ckpt.model, target("server"))
    for i, name in enumerate(sigs):
        fp16 = manifest["submodules"][name][precision.value]
        spec = {"onnx": str(onnx_dir / fp16["file"]), "profile": profile_json(profiles[name]), "scratch": 1000 * (i + 1),
                "extra_io": (extra_io or {}) if name == "vae_decoder" else {}}
        plan = out / f"{name}.plan"
        plan.write_text(json.dumps(spec))
        write_meta(EngineMeta(
            submodule=name, plan_sha256=file_sha256(plan), built_with=HERE, onnx_file=fp16["file"],
            onnx_sha256=fp16["sha256"], signature_sha256=signature_hash(sigs[name]),
            checkpoint_sha256=manifest["checkpoint"]["sha256"], target="server", profile=profile_json(profiles[name]),
        ), plan)
    return out


@pytest.fixture()
def engines(tiny_checkpoint, tiny_onnx, tmp_path):
    return write_plans(tiny_checkpoint, tiny_onnx, tmp_path / "engines")


def load(ckpt, engines, onnx_dir=None, running=HERE):
    return tensorrt_runner.load_tensorrt_runners(ckpt, engines, "cpu", onnx_dir, running)


@pytest.mark.parametrize("scheduler,steps", [("ddim", 3), ("dpmpp-2m", 10)])
def test_pipeline_on_tensorrt_runners_matches_onnxruntime_on_the_same_graphs(fake_trt, tiny_checkpoint, tiny_onnx,
                                                                             engines, photo_lq, scheduler, steps):
    config = tiny_checkpoint.defaults.replace(steps=steps, scheduler=scheduler)
    runners = load(tiny_checkpoint, engines, tiny_onnx)
    got = Pipeline(runners, tiny_checkpoint)(Request(photo_lq, config)).image
    ref_runners = load_runners("onnxruntime", tiny_checkpoint, onnx_dir=tiny_onnx, precision=Precision.FP16)
    want = Pipeline(ref_runners, tiny_checkpoint)(Request(photo_lq, config)).image
    assert np.array_equal(got, want)


def test_buffers_are_bound_once_and_outputs_are_views_of_them(fake_trt, tiny_checkpoint, engines):
    runner = load(tiny_checkpoint, engines)["vae_decoder"]
    context = runner.context
    assert context.address_calls == 2  # latent and image, at load
    assert context.addresses == {name: b.data_ptr() for name, b in runner.buffers.items()}
    assert runner.buffers["latent"].shape == (4, 4, 128, 128)  # the server profile's largest
    for side, calls in ((8, 1), (8, 1), (12, 2)):  # a new shape is set once, a repeated one not again
        latent = torch.randn(1, 4, side, side)
        image = runner.infer({"latent": latent})["image"]
        assert image.shape == (1, 3, 8 * side, 8 * side) and context.shape_calls == calls
        start, end = runner.buffers["image"].data_ptr(), runner.buffers["image"].data_ptr() + runner.buffers["image"].nbytes
        assert start <= image.data_ptr() < end
    assert context.address_calls == 2 and context.executions == 3
    direct = fake_trt.Runtime(None).deserialize_cuda_engine((engines / "vae_decoder.plan").read_bytes())
    ref = direct.session.run(None, {"latent": latent.numpy()})[0]
    assert np.array_equal(image.numpy(), ref)  # what the runner returns is what the engine wrote


def test_one_scratch_allocation_serves_every_context(fake_trt, tiny_checkpoint, engines):
    runners = load(tiny_checkpoint, engines)
    memories = {r.context.device_memory for r in runners.values()}
    assert len(memories) == 1
    (pointer, size), = memories
    assert size == 5000 == runners["text_encoder"].scratch.nbytes  # the largest (vae_decoder's), not the sum


def test_shapes_outside_the_profile_are_refused(fake_trt, tiny_checkpoint, engines):
    unet = load(tiny_checkpoint, engines)["controlnet_unet"]
    feed = {"sample": torch.randn(2, 4, 256, 256), "timestep": torch.ones(2), "text_embeddings": torch.randn(2, 77, 32),
            "f2": torch.randn(1, 32, 256, 256)}
    with pytest.raises(DiffsrError, match=r"controlnet_unet.sample: shape \(2, 4, 256, 256\) is outside the engine's "
                                          r"profile \(1, 4, 8, 8\)..\(8, 4, 128, 128\): rebuild"):
        unet.infer(feed)


@pytest.mark.parametrize("spoil, message", [
    ("running", "built with TensorRT 10.13.0.35-fake, this is TensorRT 11.0"),
    ("plan", "text_encoder: the plan does not match the sha256 in its metadata"),
    ("checkpoint", "built from another checkpoint's ONNX files"),
    ("onnx", "built from another text_encoder.fp16.onnx"),
])
def test_plans_that_do_not_match_are_refused_before_loading(fake_trt, tiny_checkpoint, tiny_onnx, engines, tmp_path,
                                                            spoil, message):
    running, ckpt, onnx_dir = HERE, tiny_checkpoint, tiny_onnx
    if spoil == "running":
        running = Environment("11.0", "Fake GPU", "9.0")
    elif spoil == "plan":
        (engines / "text_encoder.plan").write_text((engines / "text_encoder.plan").read_text() + " ")
    elif spoil == "checkpoint":
        from diffsr.export.model.random_init import init_checkpoint

        ckpt = init_checkpoint("tiny", seed=3, out=tmp_path / "other")
    else:
        onnx_dir = shutil.copytree(tiny_onnx, tmp_path / "onnx")
        manifest = json.loads((onnx_dir / "manifest.json").read_text())
        manifest["submodules"]["text_encoder"]["fp16"]["sha256"] = "0" * 64
        (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DiffsrError, match=message):
        load(ckpt, engines, onnx_dir, running)


def test_engine_io_must_be_the_signatures(fake_trt, tiny_checkpoint, tiny_onnx, tmp_path):
    engines = write_plans(tiny_checkpoint, tiny_onnx, tmp_path / "e", extra_io={"debug": ("OUTPUT", "tensor(float)")})
    with pytest.raises(DiffsrError, match=r"vae_decoder: the engine's tensors \['debug', 'image', 'latent'\] are not"):
        load(tiny_checkpoint, engines)


def test_missing_plan_is_named(fake_trt, tiny_checkpoint, engines):
    (engines / "lq_encoder.plan").unlink()
    with pytest.raises(DiffsrError, match="lq_encoder: no lq_encoder.plan in .*: build it with `diffsr build-engines`"):
        load(tiny_checkpoint, engines)


def test_triton_repository_takes_only_verified_plans(tiny_checkpoint, tiny_onnx, engines, tmp_path):
    from diffsr.triton_models.repository import build_repository

    build_repository(tiny_checkpoint, None, tmp_path / "repo", "tensorrt", engines)
    for name in tiny_checkpoint.model.submodules:
        assert (tmp_path / "repo" / name / "1" / "model.plan").read_bytes() == (engines / f"{name}.plan").read_bytes()
    (engines / "controlnet_unet.plan").write_text("{}")
    with pytest.raises(DiffsrError, match="controlnet_unet: the plan does not match the sha256 in its metadata"):
        build_repository(tiny_checkpoint, None, tmp_path / "repo2", "tensorrt", engines)


def test_without_cuda_the_gpu_backends_say_so(tiny_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    for backend in ("torch-cuda", "tensorrt"):
        with pytest.raises(DiffsrError, match=f"the {backend} backend on cuda needs a CUDA GPU"):
            load_runners(backend, tiny_checkpoint)
    with pytest.raises(DiffsrError, match="runs on a CUDA device, not 'cpu'"):
        load_runners("tensorrt", tiny_checkpoint, device="cpu")


@pytest.mark.skipif(not (torch.cuda.is_available() and tensorrt_available()),
                    reason="needs TensorRT and a CUDA GPU (the builder cannot be installed here)")
def test_real_engines_match_the_cpu_reference_with_a_graph_per_step(tiny_checkpoint, tiny_onnx, tmp_path, photo_lq):
    from diffsr.app.measure.parity import TOLERANCES, judge_image
    from diffsr.export.engines.build import build_engines

    engines = tmp_path / "real"
    build_engines(tiny_onnx, engines)
    config = tiny_checkpoint.defaults.replace(steps=20)
    ref = Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint)(Request(photo_lq, config)).image
    runners = load_runners("tensorrt", tiny_checkpoint, engines_dir=engines, onnx_dir=tiny_onnx)
    eager = Pipeline(runners, tiny_checkpoint, "cuda")(Request(photo_lq, config)).image
    graphed = Pipeline(runners, tiny_checkpoint, "cuda", cuda_graph=True)(Request(photo_lq, config)).image
    assert judge_image((64, 64), ref, graphed, TOLERANCES[Precision.FP16]).passed
    assert np.abs(graphed.astype(int) - eager.astype(int)).max() <= 2


def test_sdxl_pipeline_on_tensorrt_runners_matches_onnxruntime(fake_trt, sdxl_checkpoint, sdxl_onnx, tmp_path, photo_lq):
    """SDXL's extra inputs (input_ids_2, text_embeds, time_ids) through the runner's buffers and profiles (the
    fake plans hold the FP32 graphs: the test's SDXL export has no FP16 ones, and the runner's buffers and
    profiles are what is tested)."""
    engines = write_plans(sdxl_checkpoint, sdxl_onnx, tmp_path / "engines", precision=Precision.FP32)
    config = sdxl_checkpoint.defaults.replace(steps=3)
    got = Pipeline(load(sdxl_checkpoint, engines, sdxl_onnx), sdxl_checkpoint)(Request(photo_lq, config)).image
    ref_runners = load_runners("onnxruntime", sdxl_checkpoint, onnx_dir=sdxl_onnx, precision=Precision.FP32)
    want = Pipeline(ref_runners, sdxl_checkpoint)(Request(photo_lq, config)).image
    assert np.array_equal(got, want)
