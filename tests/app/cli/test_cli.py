"""The `diffsr` command: happy paths and every bad input giving one clear line and a non-zero exit."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffsr.app.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture()
def lq_png(tmp_path, photo_lq):
    path = tmp_path / "lq.png"
    Image.fromarray(photo_lq[:32, :48]).save(path)
    return path


def test_upscale_writes_a_4x_png(tiny_checkpoint, lq_png, tmp_path):
    out = tmp_path / "out.png"
    result = _run("upscale", lq_png, "-o", out, "--checkpoint", tiny_checkpoint.path, "--steps", 2, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (192, 128)
    assert "denoise" in result.output and "total" in result.output
    assert "prompt: clean, natural, high quality" in result.output  # the prompt used: no captioner, the default


def test_upscale_refuses_to_caption_without_a_captioner(tiny_checkpoint, lq_png, tmp_path):
    result = _run("upscale", lq_png, "-o", tmp_path / "o.png", "--checkpoint", tiny_checkpoint.path, "--steps", 1,
                  "--caption", "always")
    assert result.exit_code != 0 and 'caption="always" needs an attachment that writes the prompt' in result.output


def test_rgba_and_16bit_inputs_are_converted(tiny_checkpoint, tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (16, 16), (200, 10, 10, 128)).save(rgba)
    grey16 = tmp_path / "grey16.png"
    Image.fromarray((np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)).save(grey16)
    for src in (rgba, grey16):
        out = tmp_path / f"{src.stem}_x4.png"
        result = _run("upscale", src, "-o", out, "--checkpoint", tiny_checkpoint.path, "--steps", 1)
        assert result.exit_code == 0, result.output
        assert Image.open(out).mode == "RGB" and Image.open(out).size == (64, 64)


def test_init_writes_a_checkpoint_and_refuses_to_overwrite(tmp_path):
    assert _run("init", "--out", tmp_path / "c", "--seed", 1).exit_code == 0
    assert (tmp_path / "c" / "diffsr.json").is_file()
    again = _run("init", "--out", tmp_path / "c")
    assert again.exit_code == 2 and "not empty" in again.output
    bad = _run("init", "--out", tmp_path / "d", "--preset", "huge")
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.output


def test_init_adds_a_captioner_where_asked(tmp_path):
    from diffsr.export.model.attachments.captioner import open_captioner

    result = _run("init", "--out", tmp_path / "c", "--captioner", "blip2-tiny")
    assert result.exit_code == 0 and "with a blip2-tiny captioner" in result.output, result.output
    assert open_captioner(tmp_path / "c" / "captioner").num_query_tokens == 32
    bad = _run("init", "--out", tmp_path / "d", "--captioner", "blip3")
    assert bad.exit_code == 2 and "unknown captioner preset 'blip3'" in bad.output and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_image", "input image not found"),
        ("corrupt_image", "cannot decode"),
        ("empty_image", "cannot decode"),
        ("missing_checkpoint", "checkpoint folder not found"),
        ("zero_steps", "steps=0 is out of range"),
        ("nan_guidance", "guidance_scale=nan is out of range"),
        ("bad_start", "start='middle' is not supported"),
        ("bad_backend", "unknown backend 'cuda9'"),
    ],
)
def test_bad_input_is_one_clear_line(case, message, tiny_checkpoint, lq_png, tmp_path):
    args = {"image": lq_png, "checkpoint": tiny_checkpoint.path, "extra": []}
    if case == "missing_image":
        args["image"] = tmp_path / "nope.png"
    elif case == "corrupt_image":
        args["image"] = tmp_path / "bad.png"
        args["image"].write_bytes(lq_png.read_bytes()[:100])
    elif case == "empty_image":
        args["image"] = tmp_path / "empty.png"
        args["image"].write_bytes(b"")
    elif case == "missing_checkpoint":
        args["checkpoint"] = tmp_path / "no_ckpt"
    else:
        args["extra"] = {"zero_steps": ["--steps", 0], "nan_guidance": ["--guidance", "nan"],
                         "bad_start": ["--start", "middle"], "bad_backend": ["--backend", "cuda9"]}[case]
    out = tmp_path / "out.png"
    result = _run("upscale", args["image"], "-o", out, "--checkpoint", args["checkpoint"], *args["extra"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_entry_point_exits_non_zero_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "diffsr.app.cli", "upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png"),
         "--checkpoint", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: input image not found: {tmp_path / 'x.png'}"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("args, message", [
    (["--cuda-graph"], "CUDA graphs need a CUDA device; this pipeline runs on cpu"),
    (["--backend", "torch-cuda"], "the torch-cuda backend on cuda needs a CUDA GPU"),
    (["--backend", "tensorrt", "--engines", "e"], "the tensorrt backend on cuda needs a CUDA GPU"),
    (["--backend", "torch", "--device", "cuda"], "the torch backend on cuda needs a CUDA GPU"),
    (["--device", "gpu0"], "device 'gpu0' is not a device: use cpu, cuda or cuda:N"),
    (["--backend", "onnx"], "unknown backend 'onnx'"),
    (["--precision", "bf16"], "precision 'bf16' is not supported"),
    (["--precision", "int8"], "the torch backend runs fp32 or fp16; INT8 graphs run on onnxruntime or tensorrt"),
])
def test_gpu_options_without_a_gpu_fail_on_one_line(tiny_checkpoint, lq_png, tmp_path, args, message):
    result = _run("upscale", lq_png, "-o", tmp_path / "o.png", "--checkpoint", tiny_checkpoint.path, "--steps", 1, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.count("error:") == 1


def test_cli_runs_the_fp16_reference_on_the_cpu(tiny_checkpoint, photo_lq, tmp_path):
    src, out = tmp_path / "lq.png", tmp_path / "fp16.png"
    Image.fromarray(photo_lq[:16, :24]).save(src)  # PyTorch's FP16 on a CPU is slow: a small image
    result = _run("upscale", src, "-o", out, "--checkpoint", tiny_checkpoint.path, "--steps", 2, "--precision", "fp16")
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (96, 64)


def test_client_writes_what_the_endpoint_answers(server, tmp_path, photo_lq):
    from diffsr.app.serving.triton_client import TritonClient
    from diffsr.runtime.image import decode_image, encode_png

    src, out = tmp_path / "lq.png", tmp_path / "out.png"
    src.write_bytes(encode_png(photo_lq[:32, :40]))
    result = _run("client", src, "-o", out, "--url", server.grpc_url, "--protocol", "grpc", "--steps", 2)
    assert result.exit_code == 0, result.output
    with TritonClient(server.http_url) as remote:
        direct = remote.upscale(src.read_bytes(), steps=2).png
    assert np.array_equal(decode_image(out.read_bytes()), decode_image(direct))
    assert f"{src} -> {out} via grpc://{server.grpc_url}: " in result.output


def test_upscale_takes_references_and_picks_them_from_a_gallery(refsr_checkpoint, tmp_path):
    """refsr: `--reference` repeated; `--gallery INDEX --top-k K` prints the K photos it picked, nearest first (the
    query's own file first), and its image is the one those files give as `--reference`; a gallery's photo that is
    gone is named."""
    from diffsr.calib.data import PHOTOS, photo

    folder = tmp_path / "gallery"
    (folder / "more").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        Image.fromarray(photo(name, (40 + 9 * i, 30 + 5 * i))).save(folder / ("more" if i % 2 else ".") / f"{name}.png")
    lq = folder / "more" / "coffee.png"  # the query is itself a gallery photo
    index = tmp_path / "index"
    assert _run("gallery", "build", folder, "--checkpoint", refsr_checkpoint.path, "--out", index).exit_code == 0
    ckpt, settings = ("--checkpoint", refsr_checkpoint.path), ("--steps", 2, "--seed", 4)
    picked = _run("upscale", lq, "-o", tmp_path / "g.png", *ckpt, *settings, "--gallery", index, "--top-k", 2)
    assert picked.exit_code == 0, picked.output
    line = next(x for x in picked.output.splitlines() if x.startswith("references from"))
    names = [part.split(" (")[0] for part in line.split(": ", 1)[1].split(", ")]
    assert len(names) == 2 and names[0] == "more/coffee.png"
    given = _run("upscale", lq, "-o", tmp_path / "r.png", *ckpt, *settings,
                 *[a for n in names for a in ("--reference", folder / n)])
    assert given.exit_code == 0, given.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png")), np.asarray(Image.open(tmp_path / "r.png")))
    assert _run("upscale", lq, "-o", tmp_path / "n.png", *ckpt, *settings).exit_code == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "n.png")), np.asarray(Image.open(tmp_path / "r.png")))
    (folder / names[1]).unlink()
    gone = _run("upscale", lq, "-o", tmp_path / "x.png", *ckpt, "--gallery", index, "--top-k", 2)
    assert gone.exit_code != 0 and "are gone: build the index again" in gone.output
    no_refs = _run("upscale", lq, "-o", tmp_path / "y.png", "--checkpoint", refsr_checkpoint.path, "--reference",
                   tmp_path / "missing.png")
    assert no_refs.exit_code != 0 and "input image not found" in no_refs.output


def test_gallery_is_refused_for_a_family_without_references(tiny_checkpoint, lq_png, tmp_path):
    result = _run("upscale", lq_png, "-o", tmp_path / "o.png", "--checkpoint", tiny_checkpoint.path, "--gallery",
                  tmp_path)
    assert result.exit_code != 0 and "--gallery picks reference photos; this sd checkpoint takes none" in result.output
