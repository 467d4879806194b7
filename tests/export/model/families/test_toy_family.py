"""A family is one module: the toy family (`tests/toy_family.py`, nothing of it in the library), whose requests carry a
second photo and a text of its own and which runs a stage of its own once per request, goes through a new checkpoint,
the export, parity, the in-process pipeline on two backends, `diffsr upscale` (its options appear by themselves), the
Triton repository and a served request, with a BLIP-2 captioner attached to it and without."""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.app.measure.parity import check_parity
from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.checkpoint import open_checkpoint
from diffsr.export.model.family import FAMILIES, register
from diffsr.export.model.settings import Request
from diffsr.runtime.image import decode_image, encode_png, load_image, save_image
from diffsr.runtime.loading import load_pipeline
from diffsr.runtime.prompts import clean_caption
from diffsr.runtime.requests import parse_request
from diffsr.triton_models.repository import ServingOptions, build_repository, model_configs

ROOT = Path(__file__).resolve().parents[4]  # where `tests.toy_family` imports from


@pytest.fixture(scope="module")
def toy(toy_onnx):
    """(checkpoint with a captioner, the same model without it, their ONNX folder): one export serves both. The
    session made and exported the checkpoint in the background (`python -m tests.toy_family`, conftest)."""
    module = importlib.import_module("tests.toy_family")
    register(module.Toy)  # registered on first import; again here after an earlier module's teardown
    try:
        folder, onnx_dir = toy_onnx
        ckpt = open_checkpoint(folder)
        plain = dataclasses.replace(ckpt, model=ckpt.model.with_attachments(()))
        yield ckpt, plain, onnx_dir
    finally:
        FAMILIES.pop(module.Toy.name, None)


@pytest.fixture(scope="module")
def style():
    return photo("rocket", (40, 40))


def test_the_checkpoint_names_the_family_and_reopens(toy):
    ckpt, plain, _ = toy
    assert type(ckpt.model).__name__ == "Toy" and ckpt.model.attachment("captioner") is not None
    assert (ckpt.path / "diffsr.json").read_text().count('"family": "toy"') == 1
    assert {p.name for p in ckpt.path.iterdir()} == {"words", "down", "style", "denoiser", "up", "tokenizer",
                                                     "scheduler", "diffsr.json", "captioner"}
    assert plain.model.submodules == ("words", "style", "down", "denoiser", "up")
    ckpt.model.check_stages()
    assert [t.name for t in ckpt.model.prepared()] == ["input_ids", "style_photo", "picture"]


def test_export_and_parity_hold_the_toy_and_its_captioner_to_their_reference(toy):
    ckpt, _, onnx_dir = toy
    report = check_parity(ckpt, onnx_dir, size=(24, 20), steps=3, shapes=("min", "odd"))
    assert {o.submodule for o in report.outputs} == {"words", "style", "down", "denoiser", "up", "caption_image",
                                                     "caption_prefill", "caption_decode"}
    assert report.passed, report.to_json()
    odd = next(o for o in report.outputs if o.submodule == "up" and o.shape == "odd")
    # odd multiples of the toy's 2 cells (3 x 5), raised alike to the engines' least side of 8 cells
    assert odd.dims["latent_height"] == 10 and odd.dims["latent_width"] == 14
    assert report.images and report.images[0].psnr_db > 40  # the whole pipeline, its style photo filled in


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp-2m"])
def test_the_pipeline_runs_the_toy_on_two_backends_at_any_size(toy, style, scheduler):
    """A 23x17 photo (pixel multiple 8: padded inside) comes back at exactly 92x68, tiled and not; without the
    captioner the prompt is the checkpoint's."""
    _, plain, onnx_dir = toy
    config = plain.defaults.replace(steps=4, scheduler=scheduler)
    request = Request(photo("coffee", (23, 17)), config, {"style": (style,)})
    torch_result = load_pipeline("torch", plain)(request)
    ort_image = load_pipeline("onnxruntime", plain, onnx_dir=onnx_dir)(request).image
    assert torch_result.image.shape == ort_image.shape == (68, 92, 3)
    assert np.abs(torch_result.image.astype(int) - ort_image.astype(int)).max() <= 1
    assert torch_result.prompt == plain.defaults.caption_suffix
    assert {"style", "text", "lq", "denoise"} <= set(torch_result.timings)  # the family's own stage, timed as its part
    tiled = load_pipeline("torch", plain)(dataclasses.replace(request, settings=config.replace(tile=8, tile_overlap=2)))
    assert tiled.image.shape == (68, 92, 3)


def test_the_toys_own_inputs_change_the_image(toy, style):
    _, plain, _ = toy
    pipe = load_pipeline("torch", plain)
    lq, config = photo("coffee", (24, 16)), plain.defaults.replace(steps=3)
    base = pipe(Request(lq, config, {"style": (style,)})).image
    other_style = pipe(Request(lq, config, {"style": (photo("camera", (40, 40)),)})).image
    other_mood = pipe(Request(lq, config.replace(inputs={"mood": "stormy night"}), {"style": (style,)})).image
    stronger = pipe(Request(lq, config.replace(inputs={"mood_strength": 3.0}), {"style": (style,)})).image
    assert not np.array_equal(base, other_style) and not np.array_equal(base, other_mood)
    assert not np.array_equal(base, stronger)  # a number of its own reaches its conditioning


def test_the_toys_requests_are_parsed_against_its_declaration(toy, style):
    _, plain, _ = toy
    defaults = plain.defaults
    request = parse_request(plain.model, defaults, {"image": encode_png(photo("coffee", (8, 8))), "style": encode_png(style),
                                                    "mood": "bright"})
    assert request.settings.inputs == {"mood": "bright"} and request.photos["style"][0].shape == (40, 40, 3)
    assert plain.model.input_values(request.settings) == {"mood": "bright", "mood_strength": 1.0}  # its default
    with pytest.raises(DiffsrError, match=r"^mood_strength=9.0 is out of range: use 0 to 4$"):
        parse_request(plain.model, defaults, {"image": encode_png(style), "style": encode_png(style), "mood_strength": 9})
    with pytest.raises(DiffsrError, match=r"^style is required: a photo whose look the output takes$"):
        parse_request(plain.model, defaults, {"image": encode_png(style)})
    # every mistake of a request, one message each
    with pytest.raises(DiffsrError, match=r"^this toy model takes no input 'references' \(it takes \[.*'style', 'mood', 'mood_strength'\]\); "
                                          r"mood must be text, not int 3$"):
        parse_request(plain.model, defaults, {"image": encode_png(style), "style": encode_png(style), "mood": 3,
                                              "references": [b""]})
    with pytest.raises(DiffsrError, match=r"^cannot decode style: its 9 bytes are no image format Pillow reads"):
        parse_request(plain.model, defaults, {"image": encode_png(style), "style": b"not a png"})


def test_upscale_has_the_toys_options_by_themselves(toy, style, tmp_path):
    ckpt, _, _ = toy
    runner = CliRunner()
    help_text = runner.invoke(app, ["upscale", "--help"], terminal_width=200).output
    assert "--style" in help_text and "--mood" in help_text and "the toy family" in help_text
    save_image(photo("coffee", (20, 12)), tmp_path / "in.png")
    save_image(style, tmp_path / "style.png")
    args = ["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--checkpoint", str(ckpt.path),
            "--steps", "2", "--caption", "never"]
    missing = runner.invoke(app, args)
    assert missing.exit_code == 2 and "style is required" in missing.output, missing.output
    done = runner.invoke(app, [*args, "--style", str(tmp_path / "style.png"), "--mood", "bright", "--prompt", "a cup"])
    assert done.exit_code == 0, done.output
    assert load_image(tmp_path / "out.png").shape == (48, 80, 3) and "prompt: a cup" in done.output


def test_the_triton_repository_serves_the_toys_submodules_and_inputs(toy):
    ckpt, _, _ = toy
    configs = model_configs(ckpt, "onnxruntime", ServingOptions(entry="ensemble", step_batch=4))
    assert set(configs) == {"words", "style", "down", "denoiser", "up", "caption_image", "caption_prefill",
                            "caption_decode", "preprocess", "sampler", "postprocess", "diffsr"}
    assert configs["denoiser"].max_batch_size == 4 and configs["up"].max_batch_size == 0  # the step stage batches
    # the untiled once-per-request stages are steps of the ensemble; the tiled one runs in the sampler
    assert [s.model_name for s in configs["diffsr"].ensemble_scheduling.step] == ["preprocess", "words", "style",
                                                                                   "sampler", "postprocess"]
    assert [i.name for i in configs["preprocess"].output] == ["input_ids", "style_photo", "picture", "output_size",
                                                              "used_prompt", "settings"]
    assert [i.name for i in configs["sampler"].input] == ["picture", "words", "style", "output_size", "settings"]
    inputs = {i.name: i for i in configs["diffsr"].input}
    assert list(inputs)[-3:] == ["style", "mood", "mood_strength"] and inputs["style"].optional  # the parse requires it
    assert inputs["mood"].optional and inputs["mood_strength"].data_type == mc.TYPE_FP32


@pytest.fixture(scope="module")
def toy_server(toy, tmp_path_factory):
    """The toy checkpoint (with its captioner) behind the ensemble entry point, its step model batching calls across
    loops: its preprocessing parses, its words and style stages are steps of the ensemble, its sampler runs the tiled
    stage and the loop. The server's python models import the family's module (recorded in the repository), found
    on PYTHONPATH as a user's own package would be."""
    from tests.conftest import _serve

    ckpt, _, onnx_dir = toy
    repo = tmp_path_factory.mktemp("repo-toy") / "models"
    options = ServingOptions(entry="ensemble", step_batch=2, sampler_instances=1, warmup=False)
    build_repository(ckpt, onnx_dir, repo, options=options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        return _serve(repo)


def test_a_served_toy_request_equals_the_in_process_pipeline(toy, toy_server, style, tmp_path):
    from diffsr.app.serving.triton_client import RequestRefused, TritonClient

    ckpt, _, onnx_dir = toy
    lq = photo("chelsea", (24, 20))
    local = load_pipeline("onnxruntime", ckpt, onnx_dir=onnx_dir)
    with TritonClient(toy_server.http_url) as client:
        assert {"style", "mood"} <= set(client.endpoint())
        captioned = client.upscale(encode_png(lq), style=encode_png(style), mood="bright", mood_strength=2.0, steps=3)
        typed = client.upscale(encode_png(lq), style=encode_png(style), prompt="a cat", steps=3)
        with pytest.raises(RequestRefused, match="style is required"):
            client.upscale(encode_png(lq), steps=3)
    direct = local(Request(lq, ckpt.defaults.replace(steps=3, inputs={"mood": "bright", "mood_strength": 2.0}),
                           {"style": (style,)}))
    remote = decode_image(captioned.png, "answer")
    assert remote.shape == direct.image.shape == (80, 96, 3)
    assert np.abs(remote.astype(int) - direct.image.astype(int)).max() <= 1
    assert captioned.prompt == direct.prompt != ckpt.defaults.caption_suffix  # the caption, as in process
    assert typed.prompt == "a cat"
    caption = local.prompter(lq, ckpt.defaults)
    assert captioned.prompt == clean_caption(caption, ckpt.defaults.caption_drop, ckpt.defaults.caption_suffix)


def test_the_client_sends_the_toys_inputs(toy, toy_server, style, tmp_path):
    save_image(photo("chelsea", (24, 20)), tmp_path / "in.png")
    save_image(style, tmp_path / "style.png")
    result = CliRunner().invoke(app, ["client", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--url",
                                      toy_server.http_url, "--style", str(tmp_path / "style.png"), "--steps", "2",
                                      "--prompt", "a cat"])
    assert result.exit_code == 0, result.output
    assert load_image(tmp_path / "out.png").shape == (80, 96, 3) and "prompt: a cat" in result.output
    shutil.rmtree(tmp_path)


def test_the_gpu_check_asks_the_model_for_its_engines_and_benchmark_size(toy, tmp_path):
    """Its engines match when every submodule's plan was built from this checkpoint (the toy has no text_encoder);
    its benchmark photo is the one the checkpoint's `upscale` takes to the native size."""
    from diffsr.app.measure.gpu_check import bench_side, engines_match
    from diffsr.export.engines.metadata import EngineMeta, Environment, write_meta
    from diffsr.export.graphs.manifest import checkpoint_digest

    ckpt, _, _ = toy
    digest = checkpoint_digest(ckpt.path)
    for name in ckpt.model.submodules:
        write_meta(EngineMeta(submodule=name, plan_sha256="p" * 64, built_with=Environment("10", "gpu", "9.0"),
                              onnx_file=f"{name}.fp16.onnx", onnx_sha256="o" * 64, signature_sha256="s" * 64,
                              checkpoint_sha256=digest, target="server", profile={}, flags={}, device_memory_bytes=0,
                              build_seconds=0.0), tmp_path / f"{name}.plan")
    assert engines_match(tmp_path, ckpt)
    (tmp_path / "style.json").unlink()
    assert not engines_match(tmp_path, ckpt)
    assert bench_side(ckpt) == 16 and bench_side(dataclasses.replace(ckpt, defaults=ckpt.defaults.replace(upscale=2))) == 32


def test_a_diffsr_process_finds_the_toys_options_where_its_module_is_named(toy, tmp_path):
    """Not this test process, where the toy is registered: a `diffsr` process learns the family's options from the
    module `--checkpoint`'s diffsr.json names, or from `DIFFSR_FAMILIES`, before it parses its command line."""
    import subprocess
    import sys

    ckpt, _, _ = toy
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               COLUMNS="200")
    cli = [sys.executable, "-m", "diffsr.app.cli"]
    upscale = subprocess.run([*cli, "upscale", "--checkpoint", str(ckpt.path), "--help"], env=env, capture_output=True,
                             text=True, cwd=tmp_path)
    assert upscale.returncode == 0 and "--style" in upscale.stdout and "--mood-strength" in upscale.stdout, upscale.stderr
    client = subprocess.run([*cli, "client", "--help"], env=env | {"DIFFSR_FAMILIES": "tests.toy_family"},
                            capture_output=True, text=True, cwd=tmp_path)
    assert client.returncode == 0 and "the toy family" in client.stdout, client.stderr

