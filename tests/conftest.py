"""Shared fixtures: seeded checkpoints, their ONNX exports, a real photo, real Triton servers.

Everything session-scoped is made once, at the smallest size that still tests its path:

- `tiny_checkpoint` is a checkpoint as main wrote it before families had names: its `diffsr.json` is the
  checked-in legacy file (no `family`, SDXL's keys at zero). Every test that uses it, export and serving
  included, also proves that an old checkpoint still works. `sdxl_checkpoint` and `dit4sr_checkpoint` have the
  current form; `dit4sr_checkpoint` also has a captioner (blip2-tiny), so its prompt is a caption.
- `tiny_onnx` goes through `diffsr export --fp16` with the smallest calibration that still exercises the
  FP16 check's path (one photo with the two default prompts, three steps: timesteps 667, 334 and 1, so the
  timestep embedding's arguments pass through FP16's trouble zone). `sdxl_onnx` is FP32 only, without ONNX
  Runtime's fused variants (the onnxruntime backend then runs the plain graphs): the SDXL tests need no
  more. `dit4sr_onnx` is FP32 without the fused variants and FP16, with tiny's small FP16 check. Exporting is mostly single-threaded tracing: each export the collected tests need runs in a
  `diffsr export` process of its own from the session's start, and the tests that need none run first,
  beside them (`pytest_collection_modifyitems`).
- Five `tritonserver`s at most per run: `server` (the tiny checkpoint, BLS entry, step batching on),
  `narrow_server` (tiled, one loop instance and a queue of one: the tiling, overload and fault tests),
  `sdxl_server` (the ensemble entry point), `dit4sr_server` (the second family, tiled, BLS entry), `xpsr_server`
  (two prompts written by a prompter, tiled, BLS entry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffsr.calib.data import photo
from diffsr.export.model.checkpoint import load_reference, open_checkpoint
from diffsr.export.model.random_init import init_checkpoint

DATA = Path(__file__).parent / "data"
NARROW_TILING = dict(tile=8, tile_overlap=2)  # 64 px tiles: the tests' small photos are several tiles


def diffusers_strict(cls, folder):
    """A diffusers class built from a checkpoint folder's config.json and given its weights strictly (FP32, eval)."""
    from safetensors.torch import load_file

    net = cls.from_config(json.loads((folder / "config.json").read_text()))
    net.load_state_dict({k: v.float() for k, v in load_file(folder / "diffusion_pytorch_model.safetensors").items()},
                        strict=True)
    return net.eval()


def graphs_run(modules, names):
    """run(name, **inputs) over an image-to-text model's graphs as torch modules (`names`: their
    `runtime.caption.Graphs`): the image graph's output under its name, a language-model graph's as logits, keys and
    values."""

    def run(name, **inputs):
        with torch.no_grad():
            out = modules[name](**inputs)
        return {names.features: out} if name == names.image else dict(zip(("logits", "keys", "values"), out))

    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    path = init_checkpoint("tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "tiny").path
    shutil.copy(DATA / "legacy-tiny-diffsr.json", path / "diffsr.json")
    return open_checkpoint(path)


@pytest.fixture(scope="session")
def sdxl_checkpoint(tmp_path_factory):
    return init_checkpoint("sdxl-tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "sdxl-tiny")


@pytest.fixture(scope="session")
def dit4sr_checkpoint(tmp_path_factory):
    """dit4sr-tiny with a blip2-tiny captioner: the checkpoint whose prompt is its LQ image's caption (its export,
    FP16 check, parity and endpoint include the captioner's graphs)."""
    from diffsr.export.model.attachments.captioner import init_captioner

    path = init_checkpoint("dit4sr-tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "dit4sr-tiny").path
    init_captioner("blip2-tiny", 0, path)
    return open_checkpoint(path)


@pytest.fixture(scope="session")
def xpsr_checkpoint(tmp_path_factory):
    """xpsr-tiny with a llava-tiny prompter: both prompts written of the photo where a request gives none (its
    export, parity and endpoint include the prompter's graphs)."""
    from diffsr.export.model.attachments.prompter import init_prompter

    path = init_checkpoint("xpsr-tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "xpsr-tiny").path
    init_prompter("llava-tiny", 0, path)
    return open_checkpoint(path)


@pytest.fixture(scope="session")
def refsr_checkpoint(tmp_path_factory):
    """refsr-tiny with a clip-tiny gallery encoder: reference photos given with the request or picked from a gallery."""
    from diffsr.export.model.attachments.gallery_encoder import init_gallery_encoder

    path = init_checkpoint("refsr-tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "refsr-tiny").path
    init_gallery_encoder("clip-tiny", 0, path)
    return open_checkpoint(path)


@pytest.fixture(scope="session")
def sisrm_checkpoint(tmp_path_factory):
    """sisrm-tiny: its segmenter's label words join the prompt; its segmentation conditions every step."""
    return init_checkpoint("sisrm-tiny", seed=0, out=tmp_path_factory.mktemp("ckpt") / "sisrm-tiny")


@pytest.fixture(scope="session")
def demo_model():
    """The trained demo model shipped in the repository (read only: tests copy it before writing)."""
    from diffsr.app.cli.demo import DEMO_MODEL

    return open_checkpoint(DEMO_MODEL)


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    return load_reference(tiny_checkpoint.path)[1]


@pytest.fixture(scope="session")
def photo_lq():
    """A real photo (skimage's astronaut), 64x64, as a small LQ input."""
    return photo("astronaut", (64, 64))


# the session's exports: the checkpoint fixture each exports, and its `diffsr export` arguments; the trained demo
# model's export is the one `diffsr demo` makes, run as a new user runs `make demo`: in an empty folder; the toy
# family's (`tests/toy_family.py`, registered only while its tests run) is made and exported by its own module
EXPORTS = {
    "tiny": ("tiny_checkpoint", ("--fp16", "--calib-photos", "astronaut", "--calib-steps", "3")),
    "sdxl": ("sdxl_checkpoint", ("--no-ort-fusions",)),
    "dit4sr": ("dit4sr_checkpoint", ("--no-ort-fusions", "--fp16", "--calib-photos", "astronaut", "--calib-steps", "3")),
    "demo": ("demo_model", None),
    "toy": (None, None),
    "xpsr": ("xpsr_checkpoint", ("--no-ort-fusions",)),
    "refsr": ("refsr_checkpoint", ("--no-ort-fusions", "--fp16", "--calib-photos", "astronaut", "--calib-steps", "3")),
    "sisrm": ("sisrm_checkpoint", ("--no-ort-fusions", "--fp16", "--calib-photos", "astronaut", "--calib-steps", "3")),
}
DEMO_STEPS = "2"
ROOT = Path(__file__).resolve().parent.parent  # where `tests.toy_family` imports from, as a package of one's own


def _command(family: str, ckpt, out: Path) -> tuple[list[str], Path | None, Path]:
    """(command, working folder, where its ONNX folder will be) of a session export."""
    cli = [sys.executable, "-m", "diffsr.app.cli"]
    if family == "demo":  # `diffsr demo` in an empty folder: its export lands in .demo/
        return [*cli, "demo", "--no-serve", "--steps", DEMO_STEPS], out, out / ".demo" / "onnx-trained"
    if family == "toy":  # the checkpoint (with a captioner) in out/checkpoint, its graphs in out/onnx
        make = "import sys; from pathlib import Path; from tests.toy_family import make; make(Path(sys.argv[1]))"
        return [sys.executable, "-c", make, str(out)], ROOT, out / "onnx"
    return [*cli, "export", "--checkpoint", str(ckpt.path), "--out", str(out), *EXPORTS[family][1]], None, out


def _needs_export(item, family: str) -> bool:
    """A test asks for `<family>_onnx` (or a fixture built on it: a server), or picks it through a `model` or
    `report` parameter (the tests that run both families call `getfixturevalue`)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    named = [v for k, v in params.items() if k in ("model", "report")]
    return f"{family}_onnx" in item.fixturenames or any(v == family or (isinstance(v, tuple) and v[0] == family)
                                                        for v in named)


def pytest_configure(config):
    config.addinivalue_line("markers", "disruptive(server=False): kills a shared server's stubs, or with server=True the server (run last)")
    # three processes share two cores while the exports run (tracing is single-threaded): a torch thread
    # pool of one here keeps a descheduled worker thread from stalling every parallel op
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The exports run in processes of their own from the session's start; the tests that need none of them
    run first, beside them, in their collected order."""
    config.exports_wanted = [f for f in EXPORTS if any(_needs_export(item, f) for item in items)]
    # last, the tests that kill a server's processes: were the server to go down with them, nothing else fails
    items.sort(key=lambda item: (any(_needs_export(item, f) for f in EXPORTS), _disruption(item)))


def _disruption(item) -> int:
    """0: none; 1: kills a server's stubs (the server recovers); 2: kills a server (the session's last)."""
    marker = item.get_closest_marker("disruptive")
    return 0 if marker is None else 2 if marker.kwargs.get("server") else 1


@pytest.fixture(scope="session", autouse=True)
def _exports(request, tmp_path_factory):
    """family -> (process, folder, log) of each export the collected tests need, started now."""
    started = {}
    env = _export_env()
    for family in getattr(request.config, "exports_wanted", []):
        fixture = EXPORTS[family][0]
        ckpt = request.getfixturevalue(fixture) if fixture else None
        folder = tmp_path_factory.mktemp(f"onnx-{family}")
        log = folder.parent / f"export-{family}.log"
        command, cwd, out = _command(family, ckpt, folder)
        with log.open("w") as sink:
            started[family] = (subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd), out, log)
    try:
        yield started
    finally:
        for process, _, _ in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _export_env() -> dict[str, str]:
    """One torch thread per exporting process (tracing is single-threaded); the toy family importable."""
    return dict(os.environ, OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def _exported(family, request, tmp_path_factory):
    started = request.getfixturevalue("_exports")
    if family not in started:  # asked for by a test the collection could not tell: made now, the same way
        fixture = EXPORTS[family][0]
        command, cwd, out = _command(family, request.getfixturevalue(fixture) if fixture else None,
                                     tmp_path_factory.mktemp(f"onnx-{family}"))
        subprocess.run(command, cwd=cwd, env=_export_env(), check=True, capture_output=True)
        return out
    process, out, log = started[family]
    assert process.wait() == 0, log.read_text()[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny_onnx(request, tmp_path_factory):
    """The tiny checkpoint exported FP32 (with ONNX Runtime's fused variants) and FP16, through the CLI, with
    a small real-data FP16 check."""
    out = _exported("tiny", request, tmp_path_factory)
    calibration = json.loads((out / "manifest.json").read_text())["fp16_calibration"]
    assert calibration["photos"] == ["astronaut"] and calibration["steps"] == 3, calibration
    return out


@pytest.fixture(scope="session")
def sdxl_onnx(request, tmp_path_factory):
    """The sdxl-tiny checkpoint exported FP32 only, without ONNX Runtime's fused variants."""
    return _exported("sdxl", request, tmp_path_factory)


@pytest.fixture(scope="session")
def demo_onnx(request, tmp_path_factory):
    """The trained demo model exported FP32, with ONNX Runtime's fused variants (the onnxruntime backend's): made by
    `diffsr demo --no-serve` run in an empty folder (`.demo/onnx-trained` there), as a clean clone's `make demo` is."""
    return _exported("demo", request, tmp_path_factory)


@pytest.fixture(scope="session")
def xpsr_onnx(request, tmp_path_factory):
    """The xpsr-tiny checkpoint exported FP32, without ONNX Runtime's fused variants."""
    return _exported("xpsr", request, tmp_path_factory)


@pytest.fixture(scope="session")
def refsr_onnx(request, tmp_path_factory):
    """The refsr-tiny checkpoint exported FP32, without ONNX Runtime's fused variants, and FP16 (through the FP16
    check: each photo's tiles, its references)."""
    return _exported("refsr", request, tmp_path_factory)


@pytest.fixture(scope="session")
def sisrm_onnx(request, tmp_path_factory):
    """The sisrm-tiny checkpoint exported FP32, without ONNX Runtime's fused variants, and FP16 (through the FP16
    check)."""
    return _exported("sisrm", request, tmp_path_factory)


@pytest.fixture(scope="session")
def toy_onnx(request, tmp_path_factory):
    """The toy family's checkpoint, with a blip2-tiny captioner, and its FP32 graphs without ONNX Runtime's fused
    variants: (checkpoint folder, ONNX folder), made in the background by `tests.toy_family.make`."""
    onnx = _exported("toy", request, tmp_path_factory)
    return onnx.parent / "checkpoint", onnx


@pytest.fixture(scope="session")
def dit4sr_onnx(request, tmp_path_factory):
    """The dit4sr-tiny checkpoint exported FP32 without ONNX Runtime's fused variants, and FP16 (T5 and the
    transformer through the FP16 check, as tiny's)."""
    return _exported("dit4sr", request, tmp_path_factory)


SERVERS: list = []  # every server the session started, stopped together at its end


@pytest.fixture(scope="session", autouse=True)
def _stop_servers_together():
    """A stop waits seconds for Triton to drain and unload its models: the session's servers are all told at
    once, then waited for."""
    yield
    for srv in SERVERS:
        if srv.process is not None and srv.process.poll() is None:
            srv.process.terminate()
        elif srv.process is not None:  # it died on its own: what it said last goes into the log
            print(f"tritonserver {srv.repository} exited with {srv.process.returncode} during the session; its last lines:",
                  *list(srv.logs)[-40:], sep="\n", file=sys.stderr)
    for srv in SERVERS:
        srv.stop()


def _serve(repo):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from diffsr.app.serving.triton_server import Ports, TritonServer

    srv = TritonServer(repo, Ports.free()).start(timeout=600)
    SERVERS.append(srv)
    return srv


def _serve_repository(name, ckpt, onnx, tmp_path_factory, **options):
    """A checkpoint's repository (ONNX Runtime, these `ServingOptions`) under a real tritonserver."""
    from diffsr.triton_models.repository import ServingOptions, build_repository

    repo = tmp_path_factory.mktemp(f"repo-{name}") / "models"
    build_repository(ckpt, onnx, repo, "onnxruntime", options=ServingOptions(**options))
    return _serve(repo)


@pytest.fixture(scope="session")
def tiny_repo(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    from diffsr.triton_models.repository import ServingOptions, build_repository

    out = tmp_path_factory.mktemp("repo") / "models"
    # step batching on here (off by default), so the serving tests run the stacked per-step calls; a 10 ms
    # queue delay so that concurrent loops' calls do meet (at 2 ms, one round in three of eight concurrent
    # 2-step requests formed no batch at all)
    options = ServingOptions(sampler_instances=4, step_batch=8, step_batch_delay_us=10_000)
    build_repository(tiny_checkpoint, tiny_onnx, out, "onnxruntime", options=options)
    return out


@pytest.fixture(scope="session")
def server(tiny_repo):
    """A real tritonserver (from nvidia-pytriton) serving the tiny checkpoint's generated repository."""
    return _serve(tiny_repo)


@pytest.fixture(scope="session")
def narrow_server(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    """The tiny checkpoint again, tiled (64 px tiles), with one loop instance and a queue of one: a third
    request at once is overload, and the running request's stub is the one a fault test kills."""
    return _serve_repository("narrow", tiny_checkpoint, tiny_onnx, tmp_path_factory, sampler_instances=1,
                             max_queue_size=1, warmup=False, **NARROW_TILING)


@pytest.fixture(scope="session")
def sdxl_server(sdxl_checkpoint, sdxl_onnx, tmp_path_factory):
    """The sdxl-tiny checkpoint behind the ensemble entry point (the others have the BLS one)."""
    return _serve_repository("sdxl", sdxl_checkpoint, sdxl_onnx, tmp_path_factory, entry="ensemble",
                             sampler_instances=1, warmup=False)


@pytest.fixture(scope="session")
def dit4sr_server(dit4sr_checkpoint, dit4sr_onnx, tmp_path_factory):
    """The dit4sr-tiny checkpoint behind the BLS entry point, tiled as `narrow_server` (64 px tiles)."""
    return _serve_repository("dit4sr", dit4sr_checkpoint, dit4sr_onnx, tmp_path_factory, sampler_instances=1,
                             warmup=False, **NARROW_TILING)


@pytest.fixture(scope="session")
def xpsr_server(xpsr_checkpoint, xpsr_onnx, tmp_path_factory):
    """The xpsr-tiny checkpoint with its llava-tiny prompter behind the BLS entry point, tiled as `narrow_server`."""
    return _serve_repository("xpsr", xpsr_checkpoint, xpsr_onnx, tmp_path_factory, sampler_instances=1,
                             warmup=False, **NARROW_TILING)


@pytest.fixture(scope="session")
def refsr_server(refsr_checkpoint, refsr_onnx, tmp_path_factory):
    """The refsr-tiny checkpoint behind the ensemble entry point (its reference stages in the sampler, a request's
    `references` a BYTES tensor of any count), tiled as `narrow_server`."""
    return _serve_repository("refsr", refsr_checkpoint, refsr_onnx, tmp_path_factory, entry="ensemble",
                             sampler_instances=1, warmup=False, **NARROW_TILING)


@pytest.fixture(scope="session")
def sisrm_server(sisrm_checkpoint, sisrm_onnx, tmp_path_factory):
    """The sisrm-tiny checkpoint behind the ensemble entry point (its prompting stages run by the preprocessing over
    BLS, the segmentation handed on to the sampler's tiles), tiled as `narrow_server`."""
    return _serve_repository("sisrm", sisrm_checkpoint, sisrm_onnx, tmp_path_factory, entry="ensemble",
                             sampler_instances=1, warmup=False, **NARROW_TILING)


@pytest.fixture(scope="session")
def refsr_gallery(refsr_checkpoint, tmp_path_factory):
    """A gallery of the skimage photos at odd sizes, built with refsr-tiny's gallery encoder: (its index, its folder)."""
    from PIL import Image

    from diffsr.calib.data import PHOTOS
    from diffsr.runtime.gallery import build_gallery, torch_encoder

    folder = tmp_path_factory.mktemp("gallery") / "photos"
    folder.mkdir()
    for i, name in enumerate(PHOTOS):
        Image.fromarray(photo(name, (35 + 11 * i, 50 - 4 * i))).save(folder / f"{name}.png")
    index = folder.parent / "index"
    build_gallery(folder, index, torch_encoder(refsr_checkpoint))
    return index, folder


@pytest.fixture(scope="session")
def refsr_gallery_server(refsr_checkpoint, refsr_onnx, refsr_gallery, tmp_path_factory):
    """refsr-tiny behind the BLS entry point with a gallery: a request without references gets its two nearest."""
    return _serve_repository("refsr-gallery", refsr_checkpoint, refsr_onnx, tmp_path_factory, sampler_instances=1,
                             warmup=False, gallery=str(refsr_gallery[0]), gallery_top_k=2)
