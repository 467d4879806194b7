"""`diffsr soak` against the session's real server: 40 requests at concurrency 4, one in ten bad (every bad kind
once); the command's default is 200, measured in docs/serving.md."""

import json

import pytest
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.app.measure.soak import BAD_KINDS, SoakReport, SoakSettings, run_soak
from diffsr.app.serving.stub_probe import main as stub_probe
from diffsr.export.core.errors import DiffsrError


def test_soak_with_bad_requests_mixed_in(server, tmp_path):
    """Every good answer equals its solo image, every bad one is INVALID_ARGUMENT, the server's memory (with
    its stubs) after the run is within 5 % of after the first 10 requests."""
    report = tmp_path / "soak.json"
    result = CliRunner().invoke(app, ["soak", "--url", server.grpc_url, "--requests", "40", "--concurrency", "4",
                                      "--bad-fraction", "0.1", "--server-pid", str(server.process.pid),
                                      "--settle", "10", "--size", "32x32", "--json", str(report)])
    print(result.output)
    assert result.exit_code == 0, result.output
    got = json.loads(report.read_text())
    assert got["failures"] == [] and got["ok"]
    assert got["good"] == 36 and got["bad"] == 4 == len(BAD_KINDS)
    assert got["rss_settled_mib"] > 100 and abs(got["memory_growth"]) <= 0.05
    assert 0 < got["median_s"] <= got["p95_s"]
    probe = ["--pid", str(server.process.pid), "--url", f"http://{server.http_url}"]
    assert stub_probe(probe) == 0  # the pods' liveness probe: live, every stub alive
    assert stub_probe([*probe, "--url", "http://127.0.0.1:9"]) == 1  # nothing answers there


def test_bad_requests_are_spread_evenly_and_take_every_kind_in_turn():
    settings = SoakSettings(requests=200, bad_fraction=0.1)
    bad = [i for i in range(200) if settings.is_bad(i)]
    assert len(bad) == 20 and all(b - a == 10 for a, b in zip(bad, bad[1:]))
    kinds = [settings.bad_kind(i, len(BAD_KINDS)) for i in bad]
    assert kinds[:4] == [0, 1, 2, 3] and all(kinds.count(k) == 5 for k in range(4))
    assert not any(SoakSettings(requests=50, bad_fraction=0.0).is_bad(i) for i in range(50))


def test_a_report_with_a_failure_or_grown_memory_is_not_ok():
    settings = SoakSettings()
    assert SoakReport(settings, "grpc", rss_settled_mib=1000.0, rss_end_mib=1040.0).ok
    assert not SoakReport(settings, "grpc", rss_settled_mib=1000.0, rss_end_mib=1060.0).ok
    assert not SoakReport(settings, "grpc", failures=["request 3 (input 3): the image differs from its solo answer"]).ok


@pytest.mark.parametrize("kwargs, message", [
    (dict(requests=0), r"--requests, --concurrency, --inputs and --steps must be at least 1"),
    (dict(bad_fraction=1.0), r"--bad-fraction 1.0 must be in \[0, 1\)"),
    (dict(concurrency=0), r"--requests, --concurrency, --inputs and --steps must be at least 1"),
    (dict(memory_tolerance=float("nan")), r"--memory-tolerance nan must be in \[0, 1\)"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(DiffsrError, match=message):
        SoakSettings(**kwargs)


def test_a_memory_baseline_after_the_last_request_is_refused():
    with pytest.raises(DiffsrError, match="send more than that"):
        run_soak("127.0.0.1:9", SoakSettings(requests=20, settle=20), server_pid=1)


def test_an_unreachable_endpoint_is_one_clear_error():
    result = CliRunner().invoke(app, ["soak", "--url", "127.0.0.1:9", "--requests", "30"])
    assert result.exit_code == 2
    assert "cannot reach the server" in result.output
