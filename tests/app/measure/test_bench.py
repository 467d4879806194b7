"""The benchmark: a smoke run on tiny (every backend, valid JSON and a chart), its memory column, and a
server it starts being stopped, its repository removed, when a later step fails."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

import diffsr.app.serving.triton_server
from diffsr.app.cli.main import app
from diffsr.app.measure.bench import run_bench, stats
from diffsr.app.measure.bench_report import MEMORY_HEADER, memory_line
from diffsr.app.measure.process_memory import tree_rss_mib
from diffsr.export.core.errors import DiffsrError


def test_stats_median_and_p95():
    assert stats([3.0, 1.0, 2.0]) == {"median_s": 2.0, "p95_s": 3.0}
    assert stats([5.0]) == {"median_s": 5.0, "p95_s": 5.0}


def test_bench_smoke(tiny_checkpoint, tiny_onnx, server, tmp_path):
    out, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(app, [
        "bench", "--checkpoint", str(tiny_checkpoint.path), "--onnx", str(tiny_onnx), "--size", "32x32",
        "--steps", "2", "--runs", "1", "--warmup", "0", "--concurrency", "1,2", "--triton-url", server.http_url,
        "--json", str(out), "--plot", str(chart)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    records = {r["backend"]: r for r in data["records"]}
    assert set(records) == {"torch", "onnxruntime", "triton"}
    for name, rec in records.items():
        assert rec["end_to_end"]["median_s"] > 0 and rec["end_to_end"]["p95_s"] >= rec["end_to_end"]["median_s"]
    for stage in ("text", "lq", "denoise_step", "decode"):
        assert records["onnxruntime"][stage]["median_s"] > 0 and data["flops"][stage] > 0
    assert [c["concurrency"] for c in records["triton"]["concurrency"]] == [1, 2]
    # one memory column, one meaning: in-process backends measured, a server given by URL not accounted for
    assert isinstance(records["torch"]["host_mib"], float) and records["triton"]["host_mib"] is None
    assert f"{MEMORY_HEADER}: torch " in result.output and "triton -" in result.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_row_says_what_was_not_measured():
    from diffsr.app.measure.bench import Record

    line = memory_line([Record("torch", host_mib=812.4), Record("triton", host_mib=None)])
    assert line == f"{MEMORY_HEADER}: torch 812, triton -"


def test_tree_rss_counts_children():
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        proc = psutil.Process(parent.pid)
        for _ in range(100):
            if proc.children():
                break
            __import__("time").sleep(0.05)
        child = proc.children()[0]
        alone = proc.memory_info().rss / 2**20
        assert tree_rss_mib(parent.pid) >= alone + child.memory_info().rss / 2**20 * 0.9
    finally:
        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()


def test_a_started_server_is_stopped_and_its_repository_removed_on_failure(tiny_checkpoint, tiny_onnx, monkeypatch):
    """The server the benchmark starts is stood in for by a sleeping process (TritonServer's own start and
    stop around it, only the command and the readiness wait replaced): what is tested is that bench stops
    what it started and removes its repository when a later step fails, not Triton (the suite starts three)."""
    started = []

    class Recorded(diffsr.app.serving.triton_server.TritonServer):
        def command(self):
            return [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ)

        def _wait_ready(self, timeout):
            started.append(self)

    monkeypatch.setattr(diffsr.app.serving.triton_server, "TritonServer", Recorded)
    before = set(Path(tempfile.gettempdir()).glob("diffsr-bench-*"))
    # triton loads first (a server process starts), then the tensorrt backend cannot load on this machine
    with pytest.raises(DiffsrError, match="tensorrt"):
        run_bench(tiny_checkpoint, tiny_onnx, ["triton", "tensorrt"], (32, 32), steps=1, runs=1, warmup=0)
    (server,) = started
    assert server.process is not None and server.process.poll() is not None  # stopped
    assert set(Path(tempfile.gettempdir()).glob("diffsr-bench-*")) == before  # its repository removed


def test_bench_has_a_row_for_the_reference_stage(refsr_checkpoint, refsr_onnx, tmp_path):
    """refsr: the bench's request carries references (two), and the reference stage is a row of its own beside the
    per-step one, with its FLOPs (once per request: the same whatever the steps)."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--checkpoint", str(refsr_checkpoint.path), "--onnx", str(refsr_onnx), "--size", "24x16",
        "--steps", "2", "--runs", "1", "--warmup", "0", "--backends", "onnxruntime", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (record,) = data["records"]
    assert record["references"]["median_s"] > 0 and record["denoise_step"]["median_s"] > 0
    assert data["flops"]["references"] > 0 and data["flops"]["denoise_step"] > 0
    assert "references" in result.output
