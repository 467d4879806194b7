"""The benchmark command as a smoke test on tiny: one run, every backend, valid JSON and a chart."""

import json

from diffsr.app.bench import stats
from diffsr.app.cli import app
from typer.testing import CliRunner


def teststats_median_and_p95():
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
    for stage in ("text_encoder", "lq_encoder", "denoise_step", "vae_decoder"):
        assert records["onnxruntime"][stage]["median_s"] > 0 and data["flops"][stage] > 0
    assert [c["concurrency"] for c in records["triton"]["concurrency"]] == [1, 2]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
