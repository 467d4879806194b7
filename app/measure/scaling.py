"""`diffsr scaling`: time and peak memory against image size, each (backend, size) in a process of its
own, so each peak resident set is that run's alone.

A case is an LQ size (WIDTHxHEIGHT: `skimage.data.astronaut()` resized to it) or the name of a
scikit-image photo at its own size (`coffee`: 600x400). In its process a case loads the backend, runs
one untimed 1-step upscale (the same tile shapes: first-call allocations are not timed), then the
timed upscale; the process reports its wall time, tiles and peak RSS (`ru_maxrss`, weights included).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffsr.calib.data import photo, sample_request
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.checkpoint import open_checkpoint
from diffsr.runtime.image import latent_grid, output_size
from diffsr.runtime.loading import load_pipeline
from diffsr.runtime.tiling import tiling_for

SCALING_BACKENDS = ("torch", "onnxruntime")


@dataclass
class ScalingRecord:
    backend: str
    case: str
    input: tuple[int, int]  # (width, height)
    output: tuple[int, int]
    tiles: int  # latent tiles per denoising step
    seconds: float
    peak_rss_mib: float

    @property
    def seconds_per_mp(self) -> float:
        return self.seconds / (self.output[0] * self.output[1] / 1e6)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_per_mp": self.seconds_per_mp}


def case_image(case: str) -> np.ndarray:
    """"WIDTHxHEIGHT" (astronaut resized) or a scikit-image photo's name (at its own size)."""
    if "x" in case and case.replace("x", "").isdigit():
        w, h = (int(v) for v in case.split("x"))
        return photo("astronaut", (w, h))
    from skimage import data

    if not hasattr(data, case):
        raise DiffsrError(f"case {case!r} is neither WIDTHxHEIGHT nor a scikit-image photo (e.g. coffee)")
    return photo(case, None)


def measure(checkpoint: Path, onnx_dir: Path | None, backend: str, case: str, steps: int) -> ScalingRecord:
    """One case, in this process (the child's side)."""
    ckpt = open_checkpoint(checkpoint)
    image = case_image(case)
    h, w = output_size(image.shape[0], image.shape[1], ckpt.defaults.upscale)
    pipe = load_pipeline(backend, ckpt, onnx_dir=onnx_dir)
    cfg = ckpt.defaults.replace(steps=steps)
    pipe(sample_request(ckpt.model, image, cfg.replace(steps=1)))  # untimed: first-call allocations at the same shapes
    start = time.perf_counter()
    pipe(sample_request(ckpt.model, image, cfg))
    seconds = time.perf_counter() - start
    tiles = tiling_for(ckpt.model, cfg).tiles(*latent_grid(ckpt.model, h, w))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return ScalingRecord(backend, case, (image.shape[1], image.shape[0]), (w, h), tiles, seconds, peak)


def run_scaling(checkpoint: Path, onnx_dir: Path | None, backends: list[str], cases: list[str], steps: int,
                say: Any = lambda _: None) -> list[ScalingRecord]:
    unknown = [b for b in backends if b not in SCALING_BACKENDS]
    if unknown or not backends:
        raise DiffsrError(f"scaling backends {unknown or backends}: choose of {list(SCALING_BACKENDS)}")
    if "onnxruntime" in backends and onnx_dir is None:
        raise DiffsrError("the onnxruntime backend needs --onnx DIR")
    for case in cases:
        case_image(case)  # a bad case fails now, not after the first runs
    records = []
    for backend in backends:
        for case in cases:
            say(f"{backend} {case}")
            args = json.dumps({"checkpoint": str(checkpoint), "onnx_dir": None if onnx_dir is None else str(onnx_dir),
                               "backend": backend, "case": case, "steps": steps})
            done = subprocess.run([sys.executable, "-m", "diffsr.app.measure.scaling", args], capture_output=True, text=True)
            if done.returncode != 0:
                raise DiffsrError(f"scaling run {backend} {case} failed: {done.stderr.strip().splitlines()[-1:]}")
            data = json.loads(done.stdout.strip().splitlines()[-1])
            records.append(ScalingRecord(**{**data, "input": tuple(data["input"]), "output": tuple(data["output"])}))
    return records


if __name__ == "__main__":  # the child process of run_scaling
    a = json.loads(sys.argv[1])
    rec = measure(Path(a["checkpoint"]), None if a["onnx_dir"] is None else Path(a["onnx_dir"]), a["backend"],
                  a["case"], a["steps"])
    print(json.dumps(asdict(rec)))
