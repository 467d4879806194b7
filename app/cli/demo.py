"""`make demo`: the whole product on one real photo, 128x128 -> 512x512, with a local checkpoint.

    1. the trained demo model (`app/demo_model`, made by scripts/train_demo.py), or with a preset a seeded
       random-weight checkpoint of it (created once)     .demo/checkpoint-<preset>
    2. the PyTorch reference pipeline                        .demo/<photo>_x4_<tag>_torch.png
    3. ONNX export (once), the ONNX Runtime pipeline         .demo/<photo>_x4_<tag>_onnxruntime.png
    4. a Triton repository, a real tritonserver, one request .demo/<photo>_x4_<tag>_triton.png

The LQ input is the photo at 512x512 downscaled x4 (bicubic); every output, and bicubic upscaling, is scored
against that 512x512 photo as the papers score SR (PSNR and SSIM on Y, 4 px border: `diffsr eval`'s).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffsr.app.measure.quality import bicubic, psnr_y, ssim_y
from diffsr.app.serving.triton_client import TritonClient
from diffsr.app.serving.triton_server import Ports, TritonServer
from diffsr.calib.data import PHOTOS, photo, sample_request
from diffsr.export.core.errors import DiffsrError
from diffsr.export.graphs.exporter import export_onnx
from diffsr.export.model.checkpoint import Checkpoint, open_checkpoint
from diffsr.export.model.random_init import ensure_checkpoint
from diffsr.runtime.image import decode_image, encode_png, save_image
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline
from diffsr.triton_models.repository import build_repository

DEMO_DIR = Path(".demo")
DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_model"  # the trained checkpoint shipped with diffsr
TRAINED = "trained"  # the demo model's label in file names
LQ_SIZE = (128, 128)  # the benchmark size: 128 in, 512 out
SCALE = 4


@dataclass
class DemoResult:
    lq_path: Path
    outputs: dict[str, Path] = field(default_factory=dict)  # backend -> image written
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # backend -> stage -> seconds
    endpoint_latency_s: float | None = None
    endpoint_max_abs_diff: int | None = None  # endpoint image against the ONNX Runtime pipeline's
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # bicubic or backend -> (PSNR-Y, SSIM-Y)


def run_demo(preset: str | None = None, photo_name: str = "astronaut", serve: bool = True,
             say: Callable[[str], None] = lambda _: None, folder: Path = DEMO_DIR,
             triton_url: str | None = None, steps: int | None = None) -> DemoResult:
    """`preset`: a seeded random-weight checkpoint of it instead of the trained demo model; `triton_url`: send
    the photo to a running server of this checkpoint instead of starting one; `steps`: the sampler's steps
    (default: the checkpoint's)."""
    if photo_name not in PHOTOS:
        raise DiffsrError(f"unknown demo photo {photo_name!r}; choose one of {list(PHOTOS)}")
    tag = preset or TRAINED
    folder.mkdir(parents=True, exist_ok=True)  # wherever the demo is started: a clean clone has no .demo/
    onnx_dir = folder / f"onnx-{tag}"
    if preset is None:
        say(f"the trained demo model in {DEMO_MODEL}")
        ckpt = open_checkpoint(DEMO_MODEL)
    else:
        say(f"the {preset} checkpoint in {folder / f'checkpoint-{preset}'} (created once)")
        ckpt = ensure_checkpoint(preset, 0, folder / f"checkpoint-{preset}")
    config = ckpt.defaults.replace(steps=steps)
    hr = photo(photo_name, (SCALE * LQ_SIZE[0], SCALE * LQ_SIZE[1]))
    lq = bicubic(hr, LQ_SIZE)
    result = DemoResult(folder / f"{photo_name}_lq.png")
    save_image(lq, result.lq_path)

    def score(label: str, image: np.ndarray) -> None:
        result.scores[label] = (psnr_y(image, hr, SCALE), ssim_y(image, hr, SCALE))

    score("bicubic", bicubic(lq, hr.shape[1::-1]))

    def upscale(backend: str, **kwargs) -> np.ndarray:
        say(f"upscaling with {backend}")
        out = Pipeline(load_runners(backend, ckpt, **kwargs), ckpt)(sample_request(ckpt.model, lq, config))
        result.outputs[backend] = folder / f"{photo_name}_x4_{tag}_{backend}.png"
        save_image(out.image, result.outputs[backend])
        result.timings[backend] = out.timings
        score(backend, out.image)
        return out.image

    upscale("torch")
    say(f"exporting ONNX to {onnx_dir} (kept when up to date)")
    export_onnx(ckpt, onnx_dir)
    direct = upscale("onnxruntime", onnx_dir=onnx_dir)
    if serve:
        if triton_url is None:
            result.endpoint_latency_s, remote = _serve_once(ckpt, onnx_dir, folder / f"triton-{tag}", lq, steps, say)
        else:
            result.endpoint_latency_s, remote = _ask(triton_url, lq, steps, say)
        result.outputs["triton"] = folder / f"{photo_name}_x4_{tag}_triton.png"
        save_image(remote, result.outputs["triton"])
        score("triton", remote)
        result.endpoint_max_abs_diff = int(np.abs(remote.astype(int) - direct.astype(int)).max())
    return result


def _serve_once(ckpt: Checkpoint, onnx_dir: Path, repo: Path, lq: np.ndarray, steps: int | None,
                say: Callable[[str], None]) -> tuple[float, np.ndarray]:
    shutil.rmtree(repo, ignore_errors=True)
    build_repository(ckpt, onnx_dir, repo)
    say("starting tritonserver")
    with TritonServer(repo, Ports.free()) as server:
        return _ask(server.http_url, lq, steps, say)


def _ask(url: str, lq: np.ndarray, steps: int | None, say: Callable[[str], None]) -> tuple[float, np.ndarray]:
    say(f"upscaling through the endpoint at {url}")
    with TritonClient(url) as client:
        remote = client.upscale(encode_png(lq), steps=steps)
    return remote.latency_s, decode_image(remote.png, "the endpoint's answer")
