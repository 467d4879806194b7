"""The command line's one error boundary: whatever a user can get wrong is one line on stderr and exit 2,
checked before long work, for every command."""

from __future__ import annotations

import socket

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import diffsr.app.measure.bench
from diffsr.app.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture()
def png(tmp_path, photo_lq):
    path = tmp_path / "lq.png"
    Image.fromarray(photo_lq[:16, :16]).save(path)
    return path


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_every_command_goes_through_the_boundary():
    for info in app.registered_commands:
        assert hasattr(info.callback, "__wrapped__"), f"{info.name or info.callback.__name__} bypasses `command`"


def test_client_output_in_a_missing_folder_fails_before_the_request(png, tmp_path):
    result = _run("client", png, "-o", tmp_path / "nodir" / "x.png", "--url", f"127.0.0.1:{_closed_port()}")
    _one_line_error(result, f"cannot write {tmp_path / 'nodir' / 'x.png'}: folder {tmp_path / 'nodir'} does not exist")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_to_an_unreachable_server(png, tmp_path, protocol):
    url = f"127.0.0.1:{_closed_port()}"
    result = _run("client", png, "-o", tmp_path / "x.png", "--url", url, "--protocol", protocol)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and "\n" not in result.output.strip()
    assert f"cannot reach the server at {url} ({protocol})" in result.output
    assert not (tmp_path / "x.png").exists()


def test_bench_json_in_a_missing_folder_fails_before_any_run(tiny_checkpoint, tmp_path, monkeypatch):
    def no_run(*args, **kwargs):  # a spy: the run must not start
        raise AssertionError("run_bench was called before the output path was checked")

    monkeypatch.setattr(diffsr.app.measure.bench, "run_bench", no_run)
    result = _run("bench", "--checkpoint", tiny_checkpoint.path, "--backends", "torch", "--json", tmp_path / "no" / "b.json")
    _one_line_error(result, "folder")
    assert "does not exist" in result.output


@pytest.mark.parametrize("size, message", [
    ("0x0", "size '0x0' must be at least 1x1"),
    ("-4x8", "size '-4x8' must be at least 1x1"),
    ("big", "size 'big' is not WIDTHxHEIGHT"),
])
def test_bad_sizes(tiny_checkpoint, tiny_onnx, size, message):
    _one_line_error(_run("bench", "--checkpoint", tiny_checkpoint.path, "--backends", "torch", "--size", size), message)
    _one_line_error(_run("parity", "--checkpoint", tiny_checkpoint.path, "--onnx", tiny_onnx, "--size", size), message)


def test_bench_reports_bad_lists_without_swallowing_other_errors(tiny_checkpoint):
    _one_line_error(_run("bench", "--checkpoint", tiny_checkpoint.path, "--concurrency", "1,a"),
                    "--concurrency '1,a' is not a comma-separated list of integers")
    _one_line_error(_run("bench", "--checkpoint", tiny_checkpoint.path, "--backends", "torch,tpu"),
                    "unknown backends ['tpu']")
    _one_line_error(_run("bench", "--checkpoint", tiny_checkpoint.path, "--backends", "torch", "--concurrency", "0"),
                    "concurrency levels [0] must be >= 1")


def test_a_device_index_beyond_the_machine(tiny_checkpoint, png, tmp_path, monkeypatch):
    # A GPU cannot exist on this machine: torch is told there is exactly one (mocked); cuda:7 must be refused
    # by the device check, before any weight is moved.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = _run("upscale", png, "-o", tmp_path / "o.png", "--checkpoint", tiny_checkpoint.path, "--device", "cuda:7")
    _one_line_error(result, "device 'cuda:7' does not exist: this machine has 1 CUDA device(s), cuda:0 to cuda:0")


def test_upscale_output_paths(tiny_checkpoint, png, tmp_path):
    _one_line_error(_run("upscale", png, "-o", tmp_path / "no" / "o.png", "--checkpoint", tiny_checkpoint.path),
                    "does not exist")
    _one_line_error(_run("upscale", png, "-o", tmp_path, "--checkpoint", tiny_checkpoint.path), "is a folder")


def test_a_path_under_a_file_is_one_line(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    _one_line_error(_run("export", "--checkpoint", tiny_checkpoint.path, "--out", blocker / "onnx"), "file.txt")
    _one_line_error(_run("init", "--out", blocker), f"output folder {blocker} is a file: choose a new --out")


def test_gpu_check_json_path_is_checked_first(tmp_path):
    _one_line_error(_run("gpu-check", "--json", tmp_path / "no" / "r.json"), "does not exist")


def test_missing_onnx_folder_for_parity(tiny_checkpoint, tmp_path):
    _one_line_error(_run("parity", "--checkpoint", tiny_checkpoint.path, "--onnx", tmp_path / "none"), "no manifest.json")


def test_unknown_parity_submodule(tiny_checkpoint, tiny_onnx):
    _one_line_error(_run("parity", "--checkpoint", tiny_checkpoint.path, "--onnx", tiny_onnx, "--submodules", "unet"),
                    "no submodule ['unet'] in this sd checkpoint: its submodules are ['text_encoder',")


def test_serve_on_a_missing_repository(tmp_path):
    _one_line_error(_run("serve", "--repo", tmp_path / "none"), "has no diffsr model: build it with `diffsr triton-repo`")


def test_unknown_parity_shapes(tiny_checkpoint, tiny_onnx):
    _one_line_error(_run("parity", "--checkpoint", tiny_checkpoint.path, "--onnx", tiny_onnx, "--shapes", "min,huge"),
                    "parity shapes ['min', 'huge'] must be one or more of ['min', 'opt', 'odd']")


def _broken_copy(tiny_checkpoint, tmp_path, edit):
    """A copy of the tiny checkpoint, its files linked (not copied), with `edit(folder)` applied."""
    import os
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(tiny_checkpoint.path, folder, copy_function=os.link)
    edit(folder)
    return folder


def _rewrite_json(path, change):
    import json

    data = json.loads(path.read_text())
    change(data)
    path.unlink()  # a linked file: replaced, the session's checkpoint untouched
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("edit, message", [
    # a diffsr.json setting of the wrong type: refused on opening, naming the file and the setting
    (lambda f: _rewrite_json(f / "diffsr.json", lambda d: d["pipeline"].update(steps="20")),
     "diffsr.json: pipeline setting steps='20' is not an integer"),
    (lambda f: _rewrite_json(f / "diffsr.json", lambda d: d["model"].update(unet_channels=32)),
     "sd model config unet_channels=32 is not a list"),
    # a tokenizer broken or missing: refused on opening, not after the weights load
    (lambda f: ((f / "tokenizer" / "tokenizer.json").unlink(), (f / "tokenizer" / "tokenizer.json").write_text("{")),
     "tokenizer file is not valid JSON: "),
    (lambda f: (f / "tokenizer" / "tokenizer.json").unlink(), "tokenizer file missing: "),
    (lambda f: ((f / "tokenizer" / "tokenizer_config.json").unlink(),
                (f / "tokenizer" / "tokenizer_config.json").write_text("[1, 2")), "tokenizer file is not valid JSON: "),
    # a component's weights or config missing
    (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "checkpoint file missing: "),
    (lambda f: (f / "vae" / "config.json").unlink(), "checkpoint file missing: "),
])
def test_a_broken_checkpoint_is_refused_when_it_opens(tiny_checkpoint, png, tmp_path, edit, message):
    folder = _broken_copy(tiny_checkpoint, tmp_path, edit)
    _one_line_error(_run("upscale", png, "-o", tmp_path / "x.png", "--checkpoint", folder), message)


def test_a_command_whose_prerequisite_was_not_run_says_which(tiny_checkpoint, tiny_onnx):
    """The session's tiny export has FP16 graphs but no INT8 ones: `diffsr quantize` was not run."""
    result = _run("parity", "--checkpoint", tiny_checkpoint.path, "--onnx", tiny_onnx, "--precision", "int8")
    _one_line_error(result, f"{tiny_onnx} holds no INT8 graphs: make them first with `diffsr quantize")


@pytest.mark.parametrize("option", ["--prompt", "--negative-prompt"])
def test_text_that_is_not_utf8_is_refused_as_the_endpoint_refuses_it(tiny_checkpoint, png, tmp_path, option):
    """A command line's bytes that are not UTF-8 arrive as lone surrogates: the parse refuses them in the words it
    uses for the endpoint's BYTES that do not decode."""
    result = _run("upscale", png, "-o", tmp_path / "x.png", "--checkpoint", tiny_checkpoint.path, option,
                  b"caf\xe9".decode("utf-8", "surrogateescape"))
    _one_line_error(result, f"{option[2:].replace('-', '_')} is not valid UTF-8 text")


def test_upscale_never_writes_over_its_own_photo(tiny_checkpoint, png, tmp_path):
    before = png.read_bytes()
    _one_line_error(_run("upscale", png, "-o", png, "--checkpoint", tiny_checkpoint.path),
                    f"--out {png} is the input photo {png}: write the result to another file, or pass --overwrite")
    assert png.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (("-o", "{tmp}/x.txt"), "cannot write {tmp}/x.txt: .txt names no photo format diffsr writes"),
    (("-o", "{tmp}/x.ico"), "cannot write {tmp}/x.ico: .ico names no photo format"),  # Pillow's: at most 256 px
    (("-o", "{tmp}/x"), "cannot write {tmp}/x: no extension names no photo format"),
    (("-o", "{tmp}/x.png", "--top-k", "3"), "--top-k says how many photos --gallery picks: give --gallery INDEX too"),
])
def test_upscale_refuses_before_the_work(tiny_checkpoint, png, tmp_path, args, message):
    """An output name that says no image format (it failed after the whole run), --top-k without a gallery (it was
    ignored)."""
    result = _run("upscale", png, *[a.format(tmp=tmp_path) for a in args], "--checkpoint", tiny_checkpoint.path)
    _one_line_error(result, message.format(tmp=tmp_path))


def test_a_folder_given_as_a_photo_is_named_a_folder(tiny_checkpoint, tmp_path):
    from diffsr.export.core.errors import DiffsrError
    from diffsr.runtime.image import load_image

    with pytest.raises(DiffsrError, match="is a folder, not a photo"):
        load_image(tmp_path)


def test_a_photo_is_read_as_its_orientation_tag_shows_it(tmp_path):
    """A camera's JPEG stored landscape with EXIF orientation 6 (rotate 90 degrees clockwise to view) is read as viewers
    show it: portrait."""
    from diffsr.runtime.image import load_image

    stored = Image.new("RGB", (32, 24), (200, 30, 30))
    stored.paste((30, 30, 200), (0, 0, 16, 24))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    rgb = load_image(tmp_path / "tagged.jpg")
    assert rgb.shape == (32, 24, 3)
    assert rgb[2, 12, 2] > 150 and rgb[-3, 12, 0] > 150  # the stored left (blue) is now the top, red the bottom


def test_an_opset_the_exporter_cannot_write_is_refused(tiny_checkpoint, tmp_path):
    result = _run("export", "--checkpoint", tiny_checkpoint.path, "--out", tmp_path / "o", "--opset", "7")
    assert result.exit_code == 2 and "'--opset': Input should be greater than or equal to 18" in result.output, result.output
    assert not (tmp_path / "o").exists()


def test_a_gallery_top_k_without_a_gallery_is_refused(tiny_checkpoint, tmp_path):
    result = _run("triton-repo", "--checkpoint", tiny_checkpoint.path, "--onnx", tmp_path, "--out", tmp_path / "r",
                  "--gallery-top-k", "3")
    _one_line_error(result, "--gallery-top-k says how many photos --gallery picks: give --gallery INDEX too")
