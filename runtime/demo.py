"""`make demo`: the whole product on one real photo, 128x128 -> 512x512, with a local checkpoint.

    1. a seeded random-weight checkpoint (created once)     .demo/checkpoint-<preset>
    2. the PyTorch reference pipeline                        .demo/<photo>_x4_<preset>_torch.png
    3. ONNX export (once), the ONNX Runtime pipeline         .demo/<photo>_x4_<preset>_onnxruntime.png
    4. a Triton repository, a real tritonserver, one request .demo/<photo>_x4_<preset>_triton.png
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from calib.data import PHOTOS, photo
from export.checkpoint import init_checkpoint, open_checkpoint
from export.errors import DiffsrError
from runtime.backends import load_runners
from runtime.image import save_image
from runtime.pipeline import Pipeline

DEMO_DIR = Path(".demo")
LQ_SIZE = (128, 128)  # the benchmark size: 128 in, 512 out


@dataclass
class DemoResult:
    lq_path: Path
    outputs: dict[str, Path] = field(default_factory=dict)  # backend -> image written
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # backend -> stage -> seconds
    endpoint_latency_s: float | None = None
    endpoint_max_abs_diff: int | None = None  # endpoint image against the ONNX Runtime pipeline's


def run_demo(preset: str = "tiny", photo_name: str = "astronaut", serve: bool = True,
             say: Callable[[str], None] = lambda _: None, folder: Path = DEMO_DIR) -> DemoResult:
    if photo_name not in PHOTOS:
        raise DiffsrError(f"unknown demo photo {photo_name!r}; choose one of {list(PHOTOS)}")
    ckpt_dir, onnx_dir = folder / f"checkpoint-{preset}", folder / f"onnx-{preset}"
    if not (ckpt_dir / "diffsr.json").is_file():
        say(f"creating the {preset} checkpoint in {ckpt_dir}")
        init_checkpoint(preset, 0, ckpt_dir)
    ckpt = open_checkpoint(ckpt_dir)
    lq = photo(photo_name, LQ_SIZE)
    result = DemoResult(folder / f"{photo_name}_lq.png")
    save_image(lq, result.lq_path)

    def upscale(backend: str, **kwargs) -> np.ndarray:
        say(f"upscaling with {backend}")
        out = Pipeline(load_runners(backend, ckpt, **kwargs), ckpt)(lq)
        result.outputs[backend] = folder / f"{photo_name}_x4_{preset}_{backend}.png"
        save_image(out.image, result.outputs[backend])
        result.timings[backend] = out.timings
        return out.image

    upscale("torch")
    if not (onnx_dir / "manifest.json").is_file():
        say(f"exporting ONNX to {onnx_dir} (once)")
        from export.exporter import export_checkpoint

        export_checkpoint(ckpt_dir, onnx_dir)
    direct = upscale("onnxruntime", onnx_dir=onnx_dir)
    if serve:
        result.endpoint_latency_s, remote = _serve_once(ckpt, onnx_dir, folder / f"triton-{preset}", lq, say)
        result.outputs["triton"] = folder / f"{photo_name}_x4_{preset}_triton.png"
        save_image(remote, result.outputs["triton"])
        result.endpoint_max_abs_diff = int(np.abs(remote.astype(int) - direct.astype(int)).max())
    return result


def _serve_once(ckpt, onnx_dir: Path, repo: Path, lq: np.ndarray, say) -> tuple[float, np.ndarray]:
    import shutil

    from runtime.triton_client import TritonClient
    from triton_models.repository import build_repository
    from triton_models.server import Ports, TritonServer

    shutil.rmtree(repo, ignore_errors=True)
    build_repository(ckpt, onnx_dir, repo)
    say("starting tritonserver")
    with TritonServer(repo, Ports.free()) as server:
        buf = io.BytesIO()
        Image.fromarray(lq).save(buf, format="PNG")
        say(f"upscaling through the endpoint at {server.http_url}")
        remote = TritonClient(server.http_url).upscale(buf.getvalue())
    return remote.latency_s, np.asarray(Image.open(io.BytesIO(remote.png)).convert("RGB"))
