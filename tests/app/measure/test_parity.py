"""Parity of the exported graphs with the PyTorch reference, at the README's tolerances."""

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.app.measure.parity import TOLERANCES, check_parity, judge_image, judge_output
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import file_sha256

# (family, precision, shapes, steps): the tiny export has FP32 and FP16 graphs, the SDXL one FP32 only (its
# FP16 path is the same code as tiny's); the smallest and the odd shape (the opt one is the same path at
# 512 px: `parity_shapes` gives it, tests/export/engines/test_profiles.py holds it inside the profiles)
CASES = [("tiny", Precision.FP32, ("min", "odd"), 8), ("tiny", Precision.FP16, ("min", "odd"), 8),
         ("sdxl", Precision.FP32, ("min", "odd"), 8)]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{case[1].value}")
def report(request):
    model, precision, shapes, steps = request.param
    ckpt, onnx_dir = (request.getfixturevalue(f"{model}_{kind}") for kind in ("checkpoint", "onnx"))
    return ckpt, shapes, check_parity(ckpt, onnx_dir, precision, steps=steps, shapes=shapes)


def test_every_submodule_at_its_shapes_and_the_image_pass(report):
    ckpt, shapes, report = report
    tol = TOLERANCES[Precision(report.precision)]
    assert {(o.submodule, o.shape) for o in report.outputs} == {(n, s) for n in ckpt.model.submodules for s in shapes}
    for o in report.outputs:
        assert o.finite and o.rel <= tol.rel, o
    odd = [o for o in report.outputs if o.shape == "odd" and o.submodule == "controlnet_unet"][0]
    assert odd.dims["latent_height"] != odd.dims["latent_width"]  # a non-square shape
    (image,) = report.images
    assert image.size == "128x96" and image.psnr_db >= tol.psnr_db, image
    assert report.passed and json.loads(json.dumps(report.to_json()))["passed"]


def test_judging_catches_nan_and_error():
    ref = np.ones((2, 3), np.float32)
    tol = TOLERANCES[Precision.FP32]
    assert judge_output("m", "min", {}, "y", ref, ref * (1 + 5e-5), tol).passed
    assert not judge_output("m", "min", {}, "y", ref, ref * (1 + 5e-4), tol).passed
    bad = ref.copy()
    bad[0, 0] = np.nan
    row = judge_output("m", "min", {}, "y", ref, bad, tol)
    assert not row.passed and not row.finite
    img = np.zeros((4, 4, 3), np.uint8)
    assert judge_image((4, 4), img, img, tol).psnr_db == 100.0
    assert not judge_image((4, 4), img, img + 40, tol).passed


def test_cli_json_and_exit_code_on_a_breach(tiny_checkpoint, tiny_onnx, tmp_path):
    args = ["parity", "--checkpoint", str(tiny_checkpoint.path), "--size", "32x24", "--steps", "2", "--shapes", "min",
            "--json"]
    ok = CliRunner().invoke(app, [*args, "--onnx", str(tiny_onnx)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["passed"] is True
    # swap an FP16 graph in where the FP32 one the backend runs (ONNX Runtime's fused) should be: FP32
    # tolerances must catch it
    broken = shutil.copytree(tiny_onnx, tmp_path / "onnx")
    shutil.copy(broken / "fusion_transformer.fp16.onnx", broken / "fusion_transformer.ort.onnx")
    manifest = json.loads((broken / "manifest.json").read_text())
    fused = manifest["submodules"]["fusion_transformer"]["fp32"]["ort_fused"]
    fused["sha256"] = file_sha256(broken / "fusion_transformer.ort.onnx")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    breach = CliRunner().invoke(app, [*args, "--onnx", str(broken)])
    assert breach.exit_code == 1
    rows = json.loads(breach.stdout)["outputs"]
    assert {r["submodule"] for r in rows if not r["passed"]} == {"fusion_transformer"}


def test_cli_checks_only_the_submodules_asked_for(tiny_checkpoint, tiny_onnx):
    """A full-size model's parity: one submodule at its smallest shape, no 20-step pipeline."""
    args = ["parity", "--checkpoint", str(tiny_checkpoint.path), "--onnx", str(tiny_onnx), "--shapes", "min",
            "--submodules", "vae_decoder", "--no-end-to-end", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(r["submodule"], r["shape"]) for r in report["outputs"]] == [("vae_decoder", "min")]
    assert report["images"] == [] and report["passed"]
