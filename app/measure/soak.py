"""`diffsr soak`: many requests through a running endpoint at a fixed concurrency, bad ones mixed in.

Every good request is one of a few distinct inputs (a photo and a seed), each first sent alone; under load
its answer must be byte for byte that solo PNG. Every bad request (a corrupt image, zero steps, a NaN
guidance scale, an output past the pixel limit, in turn) must be refused as the client's fault
(gRPC INVALID_ARGUMENT, HTTP 400). Given the server's process id, the resident memory of the server and
its children (the python backend stubs) is read after the first `settle` requests and at the end: growth
past `memory_tolerance` is a leak. Loopback use: the loop is bounded by `requests`.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from diffsr.app.measure.bench import stats
from diffsr.app.measure.process_memory import tree_rss_mib
from diffsr.app.serving.triton_client import RequestRefused, TritonClient
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.progress import OnProgress, Progress, ignore

CLIENT_FAULT = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@dataclass(frozen=True)
class SoakSettings:
    requests: int = 200
    concurrency: int = 4
    bad_fraction: float = 0.1  # spread evenly: with 0.1, every tenth request is bad
    steps: int = 4
    size: tuple[int, int] = (64, 64)  # LQ input, width x height
    inputs: int = 4  # distinct good inputs (photo, seed)
    settle: int = 20  # requests after which the memory baseline is read
    memory_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.requests < 1 or self.concurrency < 1 or self.inputs < 1 or self.steps < 1:
            raise DiffsrError("--requests, --concurrency, --inputs and --steps must be at least 1")
        if not 0.0 <= self.bad_fraction < 1.0:
            raise DiffsrError(f"--bad-fraction {self.bad_fraction} must be in [0, 1)")
        if self.settle < 1:
            raise DiffsrError("--settle must be at least 1")
        if not 0.0 <= self.memory_tolerance < 1.0:
            raise DiffsrError(f"--memory-tolerance {self.memory_tolerance} must be in [0, 1)")

    def is_bad(self, i: int) -> bool:
        return math.floor((i + 1) * self.bad_fraction) > math.floor(i * self.bad_fraction)

    def bad_kind(self, i: int, kinds: int) -> int:
        """Which kind of bad request the i-th request is: the bad ones take each kind in turn."""
        return math.floor(i * self.bad_fraction) % kinds


@dataclass
class SoakReport:
    settings: SoakSettings
    protocol: str
    good: int = 0
    bad: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # good requests
    failures: list[str] = field(default_factory=list)  # a good request not answered with its solo image, a bad one not refused
    rss_settled_mib: float | None = None
    rss_end_mib: float | None = None

    @property
    def throughput(self) -> float:
        return self.good / self.seconds if self.seconds else 0.0

    def latency(self) -> dict[str, float]:
        """Median and p95 of the good requests' latencies (`app.bench.stats`)."""
        return stats(self.latencies_s) if self.latencies_s else {"median_s": float("nan"), "p95_s": float("nan")}

    def latency_json(self) -> dict[str, float | None]:
        """As `latency`, with None where there was no good answer (JSON has no NaN)."""
        return {k: None if math.isnan(v) else v for k, v in self.latency().items()}

    @property
    def memory_growth(self) -> float | None:
        if self.rss_settled_mib is None or self.rss_end_mib is None:
            return None
        return self.rss_end_mib / self.rss_settled_mib - 1.0

    @property
    def ok(self) -> bool:
        growth = self.memory_growth
        return not self.failures and (growth is None or growth <= self.settings.memory_tolerance)

    def to_json(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "protocol": self.protocol, "good": self.good, "bad": self.bad,
                "seconds": self.seconds, "images_per_s": self.throughput, **self.latency_json(),
                "rss_settled_mib": self.rss_settled_mib, "rss_end_mib": self.rss_end_mib,
                "memory_growth": self.memory_growth, "failures": self.failures, "ok": self.ok}


def server_rss_mib(pid: int) -> float:
    """Resident memory of the server and its stubs, MiB."""
    rss = tree_rss_mib(pid)
    if not rss:
        raise DiffsrError(f"no server process {pid} to measure")
    return rss


BAD_KINDS = ("corrupt image", "zero steps", "nan guidance", "past the pixel limit")


def _bad_requests(size: tuple[int, int]) -> list[tuple[str, dict[str, Any]]]:
    from diffsr.calib.data import photo
    from diffsr.runtime.image import encode_png

    png = encode_png(photo("astronaut", (size[1], size[0])))
    requests: list[dict[str, Any]] = [dict(image=b"\x89PNG\r\n\x1a\n" + bytes(64)), dict(image=png, steps=0),
                dict(image=png, guidance_scale=float("nan")),
                dict(image=encode_png(np.zeros((1250, 1250, 3), np.uint8)))]  # x4: 5000 x 5000
    return list(zip(BAD_KINDS, requests))


def run_soak(url: str, settings: SoakSettings, protocol: str = "grpc", server_pid: int | None = None,
             on_progress: OnProgress = ignore) -> SoakReport:
    from diffsr.calib.data import photo
    from diffsr.runtime.image import encode_png

    if protocol not in CLIENT_FAULT:
        raise DiffsrError(f"unknown protocol {protocol!r}; choose one of {sorted(CLIENT_FAULT)}")
    if server_pid is not None and settings.settle >= settings.requests:
        raise DiffsrError(f"the memory baseline is read after {settings.settle} requests (--settle): send more than that")
    w, h = settings.size
    goods: list[dict[str, Any]] = [dict(image=encode_png(photo(PHOTOS[k % len(PHOTOS)], (h, w))), steps=settings.steps, seed=1000 + k)
             for k in range(settings.inputs)]
    bads = _bad_requests(settings.size)
    report = SoakReport(settings, protocol)
    with TritonClient(url, protocol) as client:
        solo = []
        for k, request in enumerate(goods):
            solo.append(client.upscale(**request).png)
            on_progress(Progress("solo", f"input {k + 1}", k + 1, len(goods)))
    local = threading.local()
    clients: list[TritonClient] = []
    lock = threading.Lock()
    done = 0

    def one(i: int) -> None:
        nonlocal done
        if not hasattr(local, "client"):
            local.client = TritonClient(url, protocol)
            with lock:
                clients.append(local.client)
        if settings.is_bad(i):
            what, request = bads[settings.bad_kind(i, len(bads))]
            try:
                local.client.upscale(**request)
                failure: str | None = f"request {i} ({what}) was answered, not refused"
            except RequestRefused as e:
                failure = None if e.status == CLIENT_FAULT[protocol] else f"request {i} ({what}): status {e.status}: {e}"
            except DiffsrError as e:
                failure = f"request {i} ({what}): {e}"
            latency = None
        else:
            k = i % len(goods)
            try:
                result = local.client.upscale(**goods[k])
                latency = result.latency_s
                failure = None if result.png == solo[k] else f"request {i} (input {k}): the image differs from its solo answer"
            except DiffsrError as e:
                latency, failure = None, f"request {i} (input {k}): {e}"
        with lock:
            done += 1
            report.bad += settings.is_bad(i)
            report.good += latency is not None and failure is None
            if latency is not None:
                report.latencies_s.append(latency)
            if failure is not None:
                report.failures.append(failure)
            if done == settings.settle and server_pid is not None:
                report.rss_settled_mib = server_rss_mib(server_pid)
            on_progress(Progress("soak", f"{len(report.failures)} failed", done, settings.requests))

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(settings.concurrency) as pool:
            try:
                list(pool.map(one, range(settings.requests)))
            except BaseException:  # Ctrl-C, or a worker's error: drop the requests not yet sent
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    finally:
        for c in clients:
            c.close()
    report.seconds = time.perf_counter() - start
    if server_pid is not None:
        report.rss_end_mib = server_rss_mib(server_pid)
    return report


def summary(report: SoakReport) -> list[str]:
    s = report.settings
    lines = [
        f"{s.requests} requests at concurrency {s.concurrency} over {report.protocol} ({report.bad} bad), "
        f"{s.size[0]}x{s.size[1]} -> x4, {s.steps} steps: {report.seconds:.1f} s",
        f"good answers {report.good}, equal to their solo images; throughput {report.throughput:.2f} images/s; "
        f"latency median {report.latency()['median_s']:.3f} s, p95 {report.latency()['p95_s']:.3f} s",
    ]
    growth = report.memory_growth
    if growth is not None:
        lines.append(f"server memory (RSS, with its stubs) after {s.settle} requests {report.rss_settled_mib:.0f} MiB, "
                     f"at the end {report.rss_end_mib:.0f} MiB: {growth:+.1%} (tolerance {s.memory_tolerance:.0%})")
    lines += [f"FAILED: {f}" for f in report.failures[:20]]
    if len(report.failures) > 20:
        lines.append(f"... and {len(report.failures) - 20} more failures")
    return lines

