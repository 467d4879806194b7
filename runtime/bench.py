"""`diffsr bench`: per-stage latency of every backend in one run, interleaved, with ratios.

Running and judging are apart: `run_bench` returns records (data, JSON-ready); `table_rows` and
`plot` present them. Each run upscales the same real photo with every backend in turn, so drift
of the machine hits all alike; medians and p95 are over the runs after warm-up. Triton is timed
end to end through its endpoint (its stages run in the server), and at each concurrency level.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from calib.data import photo
from export.checkpoint import Checkpoint
from export.config import LATENT_FACTOR
from export.errors import DiffsrError
from export.signatures import SUBMODULES, signatures

BACKENDS = ("torch", "torch-cuda", "onnxruntime", "tensorrt", "triton")
STAGES = ("preprocess", "text_encoder", "lq_encoder", "denoise_step", "denoise", "vae_decoder", "postprocess")


@dataclass
class Record:
    backend: str
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {median_s, p95_s}
    end_to_end: dict[str, float] = field(default_factory=dict)
    rss_mb: float = 0.0  # host memory the backend added when loaded (the server's processes for triton)
    device_mb: float = 0.0  # GPU memory the backend added when loaded: weights, engines, buffers (CUDA only)
    concurrency: list[dict[str, float]] = field(default_factory=list)  # triton: latency and throughput

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, **self.stages, "end_to_end": self.end_to_end, "rss_mb": self.rss_mb,
                "device_mb": self.device_mb, "concurrency": self.concurrency}


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_s": statistics.median(ordered), "p95_s": p95}


def _rss_mb(pids: list[int] | None = None) -> float:
    total = 0
    for pid in pids or [os.getpid()]:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total / 2**20


def _children(pid: int) -> list[int]:
    found = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), -1)
            if ppid == pid:
                found.append(int(entry.name))
    return found


def stage_flops(ckpt: Checkpoint, onnx_dir: Path, size: tuple[int, int]) -> dict[str, float]:
    """FLOPs per stage at the benchmark size (one denoising step: fusion transformer + ControlNet/UNet)."""
    from runtime.flops import graph_flops

    m = ckpt.model.latent_multiple * LATENT_FACTOR
    h, w = (-(-4 * size[1] // m) * m) // LATENT_FACTOR, (-(-4 * size[0] // m) * m) // LATENT_FACTOR
    dims = dict(batch=1, cfg_batch=2, text_batch=2, latent_height=h, latent_width=w)
    sigs = signatures(ckpt.model)
    f = {name: float(graph_flops(onnx_dir / f"{name}.onnx", sigs[name], dims)) for name in SUBMODULES}
    return {"text_encoder": f["text_encoder"], "lq_encoder": f["lq_encoder"],
            "denoise_step": f["fusion_transformer"] + f["controlnet_unet"], "vae_decoder": f["vae_decoder"]}


def run_bench(
    ckpt: Checkpoint, onnx_dir: Path | None, backends: list[str], size: tuple[int, int] = (128, 128), steps: int = 20,
    runs: int = 3, warmup: int = 1, concurrency: tuple[int, ...] = (1, 2, 4), triton_url: str | None = None,
    on_progress: Callable[[str], None] = lambda _: None, device: str = "cpu", engines_dir: Path | None = None,
) -> list[Record]:
    """`device`: where torch and onnxruntime run; on cuda, `torch` is the eager FP16 baseline.
    torch-cuda and tensorrt always run on CUDA, each denoising step a CUDA graph."""

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise DiffsrError(f"unknown backends {unknown}; choose from {list(BACKENDS)}")
    if runs < 1 or warmup < 0:
        raise DiffsrError(f"runs={runs} must be >= 1 and warmup={warmup} >= 0")
    image = photo("astronaut", size)
    config = ckpt.defaults.replace(steps=steps)
    records = {b: Record(b) for b in backends}
    calls: dict[str, Callable[[], dict[str, float]]] = {}
    server = None
    for backend in backends:
        on_progress(f"loading {backend}")
        before = _rss_mb()
        if backend == "triton":
            server, url = _triton(ckpt, onnx_dir, triton_url, on_progress)
            calls[backend] = _remote_call(url, _png(image), steps)
            records[backend].rss_mb = _rss_mb(_children(server.process.pid)) if server else 0.0
        else:
            used = _device_used_mb()
            pipe = _pipeline(backend, ckpt, onnx_dir, engines_dir, device)
            calls[backend] = lambda pipe=pipe: pipe(image, config).timings
            records[backend].rss_mb = _rss_mb() - before
            records[backend].device_mb = _device_used_mb() - used
    samples: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
    try:
        for i in range(warmup + runs):
            for backend in backends:  # interleaved: each run visits every backend
                on_progress(f"{'warm-up' if i < warmup else 'run'} {i + 1}/{warmup + runs}: {backend}")
                timings = calls[backend]()
                if i >= warmup:
                    samples[backend].append(timings)
        for backend in backends:
            rec, got = records[backend], samples[backend]
            rec.end_to_end = _stats([t["total"] for t in got])
            for stage in STAGES:
                if stage == "denoise_step" and "denoise" in got[0]:
                    rec.stages[stage] = _stats([t["denoise"] / steps for t in got])
                elif stage in got[0]:
                    rec.stages[stage] = _stats([t[stage] for t in got])
        if "triton" in backends:
            records["triton"].concurrency = _concurrency(calls["triton"], concurrency, runs, on_progress)
    finally:
        if server is not None:
            server.stop()
    return list(records.values())


def _pipeline(backend: str, ckpt: Checkpoint, onnx_dir: Path | None, engines_dir: Path | None, device: str):
    """torch and onnxruntime on `device` (torch in FP16 on CUDA: the eager baseline); the CUDA-only
    backends on their own device."""
    from export.config import Precision
    from runtime.backends import DEFAULTS, load_pipeline

    cuda_only = DEFAULTS[backend][0] == "cuda"
    precision = Precision.FP16 if backend == "torch" and device.startswith("cuda") else None
    return load_pipeline(backend, ckpt, None if cuda_only else device, onnx_dir, precision, engines_dir)


def _device_used_mb() -> float:
    """GPU memory in use on the current device, by every allocator (TensorRT's too); 0 without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _remote_call(url: str, png: bytes, steps: int) -> Callable[[], dict[str, float]]:
    """One request through the endpoint; a client per thread (tritonclient's HTTP client is not
    thread-safe), so the same call serves the concurrency sweep."""
    import threading

    from runtime.triton_client import TritonClient

    local = threading.local()

    def call() -> dict[str, float]:
        if not hasattr(local, "client"):
            local.client = TritonClient(url)
        return {"total": local.client.upscale(png, steps=steps).latency_s}

    return call


def _triton(ckpt, onnx_dir, url, on_progress):
    if url is not None:
        return None, url
    import tempfile

    from triton_models.repository import ServingOptions, build_repository
    from triton_models.server import Ports, TritonServer

    if onnx_dir is None:
        raise DiffsrError("the triton backend needs --onnx DIR, or --triton-url of a running server")
    repo = Path(tempfile.mkdtemp(prefix="diffsr-bench-")) / "models"
    build_repository(ckpt, onnx_dir, repo, options=ServingOptions(sampler_instances=4))
    on_progress("starting tritonserver")
    server = TritonServer(repo, Ports.free()).start()
    return server, server.http_url


def _concurrency(call, levels, runs, on_progress) -> list[dict[str, float]]:
    """Latency and throughput with N requests in flight, `runs` rounds of N each."""
    results = []
    for n in levels:
        on_progress(f"triton at concurrency {n}")
        latencies: list[float] = []
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            for _ in range(runs):
                latencies += [t["total"] for t in pool.map(lambda _: call(), range(n))]
        elapsed = time.perf_counter() - start
        results.append({"concurrency": n, **_stats(latencies), "throughput_rps": len(latencies) / elapsed})
    return results


def table_rows(records: list[Record], flops: dict[str, float] | None = None) -> list[list[str]]:
    """stage, then per backend 'median (p95) [x ratio vs torch]', then the stage's GFLOP."""
    base = next((r for r in records if r.backend == "torch"), None)
    rows = []
    for stage in [*STAGES, "end_to_end"]:
        row = [stage]
        for rec in records:
            s = rec.end_to_end if stage == "end_to_end" else rec.stages.get(stage)
            if not s:
                row.append("-")
                continue
            ref = (base.end_to_end if stage == "end_to_end" else base.stages.get(stage)) if base else None
            ratio = f" {ref['median_s'] / s['median_s']:.2f}x" if ref and rec is not base and s["median_s"] > 0 else ""
            row.append(f"{s['median_s']:.3f} ({s['p95_s']:.3f}){ratio}")
        row.append(f"{flops[stage] / 1e9:.1f}" if flops and stage in flops else "")
        rows.append(row)
    return rows


def plot(records: list[Record], path: Path, title: str) -> None:
    """Grouped bars: median seconds per stage, one bar per backend, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in (*STAGES, "end_to_end") if s != "denoise"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(records)
    for i, rec in enumerate(records):
        values = [(rec.end_to_end if s == "end_to_end" else rec.stages.get(s, {})).get("median_s", 0.0) for s in stages]
        ax.bar(np.arange(len(stages)) + i * width, values, width, label=rec.backend)
    ax.set_xticks(np.arange(len(stages)) + width * (len(records) - 1) / 2, stages, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("median seconds (log)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
