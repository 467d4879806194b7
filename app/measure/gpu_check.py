"""`diffsr gpu-check`: the GPU checks and the GPU benchmark in one run, for whoever has a GPU.

    1. what is here: torch, CUDA device, TensorRT (or why not)
    2. parity: a real photo through the CPU FP32 reference and through each GPU path (eager FP16
       PyTorch, torch-cuda, tensorrt when engines are given), same seed; FP16 passes at PSNR >= 30 dB
    3. the CUDA graph: replaying the captured step gives the eager step's image on the same runners
    4. benchmark: `bench_preset` at its native output size (SD 128 -> 512, SDXL 256 -> 1024), 20 steps
       with CFG, eager FP16 PyTorch against torch-cuda
       (and tensorrt): per stage and end to end, medians, speed-ups, GPU memory added by loading

Running and judging are apart, as in `diffsr parity`: the report is data (JSON) with a verdict.
Checkpoints are made with seeded random weights in `workdir` unless already there.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffsr.app.measure.bench import Record, run_bench
from diffsr.app.measure.parity import TOLERANCES, ImageParity, judge_image
from diffsr.calib.data import photo, sample_request
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.engines.metadata import read_meta, tensorrt_module
from diffsr.export.graphs.manifest import checkpoint_digest
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.random_init import ensure_checkpoint
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline

GRAPH_TOLERANCE = 2  # max |graph - eager| on uint8: the same kernels, but the graph reads device scalars


@dataclass
class GpuReport:
    environment: dict[str, str]
    parity: list[dict[str, Any]] = field(default_factory=list)  # ImageParity rows, with the path's name
    graph_max_abs: int | None = None
    graph_captures: int = 0
    bench: list[Record] = field(default_factory=list)  # one per backend
    bench_title: str = ""

    @property
    def passed(self) -> bool:
        graph_ok = self.graph_max_abs is not None and self.graph_max_abs <= GRAPH_TOLERANCE
        return graph_ok and bool(self.parity) and all(row["passed"] for row in self.parity)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "bench": [r.to_json() for r in self.bench], "passed": self.passed}


def environment() -> dict[str, str]:
    if not torch.cuda.is_available():
        raise DiffsrError(f"no CUDA GPU: torch {torch.__version__} sees none (CUDA build: {torch.version.cuda})")
    major, minor = torch.cuda.get_device_capability()
    try:
        trt = str(tensorrt_module().__version__)
    except DiffsrError as e:
        trt = f"absent ({e})"
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}", "torch": torch.__version__,
            "cuda": str(torch.version.cuda), "tensorrt": trt, "host": platform.node()}


def _checkpoint(preset: str, workdir: Path, say: Callable[[str], None]) -> Checkpoint:
    say(f"the seeded random {preset} checkpoint in {workdir / f'checkpoint-{preset}'}")
    return ensure_checkpoint(preset, 0, workdir / f"checkpoint-{preset}")


def check_gpu(
    workdir: Path, parity_preset: str = "small", bench_preset: str = "sd15", runs: int = 3, warmup: int = 1,
    engines: Path | None = None, onnx: Path | None = None, say: Callable[[str], None] = lambda _: None,
) -> GpuReport:
    report = GpuReport(environment())
    say(f"GPU: {report.environment['gpu']}; TensorRT: {report.environment['tensorrt']}")
    workdir.mkdir(parents=True, exist_ok=True)

    # 2. parity against the CPU reference, on a real photo (64x64 -> 256x256), 20 steps, same seed
    ckpt = _checkpoint(parity_preset, workdir, say)
    request = sample_request(ckpt.model, photo("astronaut", (64, 64)), ckpt.defaults.replace(steps=20))
    say("parity: CPU FP32 reference")
    reference = Pipeline(load_runners("torch", ckpt), ckpt)(request).image
    paths: dict[str, Callable[[], Pipeline]] = {
        "torch fp16 eager": lambda: Pipeline(load_runners("torch", ckpt, "cuda", precision=Precision.FP16), ckpt, "cuda"),
        "torch-cuda (graph)": lambda: Pipeline(load_runners("torch-cuda", ckpt), ckpt, "cuda", cuda_graph=True),
    }
    if engines is not None and engines_match(engines, ckpt):
        paths["tensorrt (graph)"] = lambda: Pipeline(load_runners("tensorrt", ckpt, engines_dir=engines), ckpt, "cuda",
                                                     cuda_graph=True)
    outputs: dict[str, np.ndarray[Any, Any]] = {}
    for name, make in paths.items():
        say(f"parity: {name}")
        outputs[name] = make()(request).image
        row: ImageParity = judge_image((64, 64), reference, outputs[name], TOLERANCES[Precision.FP16])
        report.parity.append({"path": name, **asdict(row)})

    # 3. the CUDA graph against eager on the same runners
    say("CUDA graph replay against eager steps")
    runners = load_runners("torch-cuda", ckpt)
    eager = Pipeline(runners, ckpt, "cuda")(request).image
    graphed = Pipeline(runners, ckpt, "cuda", cuda_graph=True)
    first = graphed(request).image
    again = graphed(request).image  # the second request replays the graph, no new capture
    report.graph_max_abs = int(max(np.abs(first.astype(int) - eager.astype(int)).max(),
                                   np.abs(again.astype(int) - first.astype(int)).max()))
    report.graph_captures = graphed.graphs.captures if graphed.graphs is not None else 0
    del runners, graphed
    torch.cuda.empty_cache()

    # 4. the benchmark: eager FP16 PyTorch (the baseline) against the GPU backends
    bench_ckpt = _checkpoint(bench_preset, workdir, say)
    backends = ["torch", "torch-cuda"]
    if engines is not None and engines_match(engines, bench_ckpt):
        backends.append("tensorrt")
    say(f"benchmark: {bench_preset}, {', '.join(backends)}")
    side, scale = bench_side(bench_ckpt), bench_ckpt.defaults.upscale
    records = run_bench(bench_ckpt, onnx, backends, (side, side), 20, runs, warmup, (), say=say, device="cuda",
                        engines_dir=engines)
    report.bench = records
    report.bench_title = (f"{bench_preset} {side}x{side} -> {scale * side}x{scale * side}, 20 steps, CFG, {runs} runs after {warmup} warm-up; "
                          f"{report.environment['gpu']}")
    return report


def bench_side(ckpt: Checkpoint) -> int:
    """The benchmark photo's side: the one its `upscale` takes to the model's native output size."""
    return ckpt.model.native_latent * ckpt.model.latent_factor // ckpt.defaults.upscale


def engines_match(engines: Path, ckpt: Checkpoint) -> bool:
    """Whether the engine folder was built for this checkpoint (its metadata names the checkpoint)."""
    try:
        plans = [engines / f"{name}.plan" for name in ckpt.model.submodules]
        return all(read_meta(plan).checkpoint_sha256 == checkpoint_digest(ckpt.path) for plan in plans)
    except DiffsrError:
        return False
