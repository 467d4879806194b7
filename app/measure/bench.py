"""`diffsr bench`: per-stage latency of every backend in one run, interleaved.

Measuring only: `run_bench` returns records (data, JSON-ready); `bench_report` presents them and
`process_memory` does the process accounting. Each run upscales the same real photo with every
backend in turn, so drift of the machine hits all alike; medians and p95 are over the runs after
warm-up. Triton is timed end to end through its endpoint (its stages run in the server), and at
each concurrency level. A server the benchmark starts is stopped, and its model repository removed,
whatever happens.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsr.app.measure.process_memory import device_used_mib, rss_mib, tree_rss_mib
from diffsr.app.serving.triton_client import TritonClient, remote_values
from diffsr.calib.data import photo, sample_request
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.dims import TARGETS
from diffsr.runtime.backends.names import BACKENDS as PIPELINE_BACKENDS
from diffsr.runtime.backends.names import DEFAULTS, SERVED
from diffsr.runtime.image import latent_grid
from diffsr.runtime.loading import load_pipeline
from diffsr.runtime.tiling import tiling_for

SERVED_ENSEMBLE = f"{SERVED}-ensemble"  # the endpoint with the ensemble entry point, to compare with the BLS one
ENTRIES = {SERVED: "bls", SERVED_ENSEMBLE: "ensemble"}
BACKENDS = (*PIPELINE_BACKENDS, SERVED, SERVED_ENSEMBLE)
# the pipeline's timings (the caption's where the checkpoint has a captioner: its image part, seconds per token)
Say = Callable[[str], None]


@dataclass
class Record:
    backend: str
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> {median_s, p95_s}
    end_to_end: dict[str, float] = field(default_factory=dict)
    # Host memory the backend added by loading, MiB: this process's resident growth for the in-process
    # backends; for triton, the resident memory of the server's process tree the benchmark started
    # (None for a server given by --triton-url, which this process cannot account for).
    host_mib: float | None = None
    device_mib: float = 0.0  # GPU memory the backend added by loading: weights, engines, buffers (CUDA only)
    concurrency: list[dict[str, float]] = field(default_factory=list)  # triton: latency and throughput

    def to_json(self) -> dict[str, Any]:
        return {"backend": self.backend, **self.stages, "end_to_end": self.end_to_end, "host_mib": self.host_mib,
                "device_mib": self.device_mib, "concurrency": self.concurrency}


def stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"median_s": statistics.median(ordered), "p95_s": p95}


def stage_flops(ckpt: Checkpoint, onnx_dir: Path, size: tuple[int, int]) -> dict[str, float]:
    """FLOPs per stage at the benchmark size (one denoising step: every submodule of the step stage),
    counted over the tiles the pipeline runs: one tile's FLOPs times the tiles (the text stage runs once)."""
    from diffsr.app.measure.flops import graph_flops

    model, scale = ckpt.model, ckpt.defaults.upscale
    tiles = tiling_for(model, ckpt.defaults).layout(*latent_grid(model, scale * size[1], scale * size[0]))
    dims = TARGETS["server"].at(model.dims(), side=(tiles[0].h, tiles[0].w))  # one image, guided, one tile
    paths = verified_files(onnx_dir, ckpt, Precision.FP32)

    def flops(names: tuple[str, ...], times: int) -> float:
        return sum(float(graph_flops(paths[name], model.signature(name), dims)) for name in names) * times

    stages, per_part = model.stages, {}
    for stage in stages.once:  # each part: a tiled stage runs once per tile, the others once
        per_part[stage.part] = per_part.get(stage.part, 0.0) + flops((stage.submodule,), len(tiles) if stage.tiled else 1)
    return {**per_part, "denoise_step": flops(stages.step, len(tiles)), "decode": flops((stages.decode,), len(tiles))}


def check_backends(backends: list[str]) -> None:
    unknown = [b for b in backends if b not in BACKENDS]
    if not backends or unknown:
        raise DiffsrError(f"unknown backends {unknown or backends}; choose one or more of {list(BACKENDS)}")


def run_bench(
    ckpt: Checkpoint, onnx_dir: Path | None, backends: list[str], size: tuple[int, int] = (128, 128), steps: int = 20,
    runs: int = 3, warmup: int = 1, concurrency: tuple[int, ...] = (1, 2, 4), triton_url: str | None = None,
    say: Say = lambda _: None, device: str = "cpu", engines_dir: Path | None = None,
) -> list[Record]:
    """`device`: where torch and onnxruntime run; on cuda, `torch` is the eager FP16 baseline.
    torch-cuda and tensorrt always run on CUDA, each denoising step a CUDA graph."""
    check_backends(backends)
    if runs < 1 or warmup < 0:
        raise DiffsrError(f"runs={runs} must be >= 1 and warmup={warmup} >= 0")
    if any(c < 1 for c in concurrency):
        raise DiffsrError(f"concurrency levels {list(concurrency)} must be >= 1")
    request = sample_request(ckpt.model, photo("astronaut", size), ckpt.defaults.replace(steps=steps))
    records = {b: Record(b) for b in backends}
    calls: dict[str, Callable[[], dict[str, float]]] = {}
    with ExitStack() as stack:  # a server started here is stopped, its repository removed, on any exit
        for backend in backends:
            say(f"loading {backend}")
            if backend in ENTRIES:
                url = triton_url if backend == SERVED else None
                if url is None:
                    server = stack.enter_context(local_triton_server(ckpt, onnx_dir, stack, say, ENTRIES[backend]))
                    url = server.http_url
                    records[backend].host_mib = tree_rss_mib(server.process.pid if server.process else None)
                calls[backend] = _remote_call(url, remote_values(ckpt.model, request), steps, stack)
            else:
                before, used = rss_mib(), device_used_mib()
                pipe = _pipeline(backend, ckpt, onnx_dir, engines_dir, device)
                calls[backend] = lambda pipe=pipe: pipe(request).timings
                records[backend].host_mib = rss_mib() - before
                records[backend].device_mib = device_used_mib() - used
        samples: dict[str, list[dict[str, float]]] = {b: [] for b in backends}
        for i in range(warmup + runs):
            for backend in backends:  # interleaved: each run visits every backend
                say(f"{'warm-up' if i < warmup else 'run'} {i + 1}/{warmup + runs}: {backend}")
                timings = calls[backend]()
                if i >= warmup:
                    samples[backend].append(timings)
        for backend in backends:
            rec, got = records[backend], samples[backend]
            rec.end_to_end = stats([t["total"] for t in got])
            for stage in got[0]:  # the pipeline's parts as it timed them (a family's own stages among them)
                if stage == "denoise":
                    rec.stages["denoise_step"] = stats([t["denoise"] / steps for t in got])
                if stage != "total":
                    rec.stages[stage] = stats([t[stage] for t in got])
        if SERVED in backends:
            records[SERVED].concurrency = _concurrency(calls[SERVED], concurrency, runs, say)
    return list(records.values())


def _pipeline(backend: str, ckpt: Checkpoint, onnx_dir: Path | None, engines_dir: Path | None, device: str) -> Any:
    """torch and onnxruntime on `device` (torch in FP16 on CUDA: the eager baseline); the CUDA-only
    backends on their own device."""
    cuda_only = DEFAULTS[backend][0] == "cuda"
    precision = Precision.FP16 if backend == "torch" and device.startswith("cuda") else None
    return load_pipeline(backend, ckpt, None if cuda_only else device, onnx_dir, precision, engines_dir)


def _remote_call(url: str, values: dict[str, Any], steps: int, stack: ExitStack) -> Callable[[], dict[str, float]]:
    """One request through the endpoint (`values`: the photo and the model's other inputs, as `remote_values` gives
    them); a client per thread (tritonclient's HTTP client is not thread-safe), so the same call serves the
    concurrency sweep. `stack` closes the clients."""
    local = threading.local()
    sent = {k: v for k, v in values.items() if k != "image"}

    def call() -> dict[str, float]:
        if not hasattr(local, "client"):
            local.client = stack.enter_context(TritonClient(url))
        return {"total": local.client.upscale(values["image"], steps=steps, **sent).latency_s}

    return call


def local_triton_server(ckpt: Checkpoint, onnx_dir: Path | None, stack: ExitStack, say: Say, entry: str = "bls",
                   tiling: tuple[int | None, int | None] = (None, None)) -> Any:
    """A server on a repository (with `entry` as its entry point, `tiling` its tile and overlap) in a
    temporary folder that `stack` removes; entered by the caller.
    Imported here: Triton's packages are only needed when the triton backend is benchmarked (the GPU
    check runs without them)."""
    from diffsr.app.serving.triton_server import Ports, TritonServer
    from diffsr.triton_models.repository import ServingOptions, build_repository

    if onnx_dir is None:
        raise DiffsrError("the triton backend needs --onnx DIR, or --triton-url of a running server")
    repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diffsr-bench-"))) / "models"
    options = ServingOptions(sampler_instances=4, entry=entry, tile=tiling[0], tile_overlap=tiling[1])
    build_repository(ckpt, onnx_dir, repo, options=options)
    say("starting tritonserver")
    return TritonServer(repo, Ports.free())


def _concurrency(call: Callable[[], dict[str, float]], levels: tuple[int, ...], runs: int, say: Say) -> list[dict[str, float]]:
    """Latency and throughput with N requests in flight, `runs` rounds of N each."""
    results = []
    for n in levels:
        say(f"triton at concurrency {n}")
        latencies: list[float] = []
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            for _ in range(runs):
                latencies += [t["total"] for t in pool.map(lambda _: call(), range(n))]
        elapsed = time.perf_counter() - start
        results.append({"concurrency": n, **stats(latencies), "throughput_rps": len(latencies) / elapsed})
    return results
