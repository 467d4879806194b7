"""The server wrapper's own bookkeeping, without a server: its log is bounded, its last error found."""

from pathlib import Path

from diffsr.app.serving.triton_server import LOG_LINES, TritonServer


def test_a_long_running_server_keeps_only_its_last_log_lines():
    """`diffsr serve` runs for weeks: every line is forwarded as it comes, only the last LOG_LINES are kept (what
    an error message about the server's exit quotes)."""
    forwarded = []
    srv = TritonServer(Path("unused"), log_line=forwarded.append, watch_stubs=False)
    srv.say("E1130 an early error")
    for i in range(3 * LOG_LINES):
        srv.say(f"I1130 line {i}")
    assert len(forwarded) == 3 * LOG_LINES + 1 and len(srv.logs) == LOG_LINES
    assert srv.logs[-1] == f"I1130 line {3 * LOG_LINES - 1}\n"
    assert srv.last_error() == f"I1130 line {3 * LOG_LINES - 1}"  # the early error has scrolled out
    srv.say("E1130 the last error")
    srv.say("I1130 after it")
    assert srv.last_error() == "E1130 the last error"
