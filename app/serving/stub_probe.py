"""Liveness of a tritonserver and its python backend stubs, for a server that runs without `diffsr serve`'s
stub watch (a Kubernetes pod running `tritonserver` itself). Triton 2.51 neither restarts a stub that died
nor reports it: `/v2/health/live` stays 200 while the stub's model fails every request. A dead stub stays a
zombie child of the server (Triton 2.51's python backend does not reap it; a later one that does would
hide it from this probe: re-check on upgrading the image), so its presence is the sign. The probe exits 1 when
the server does not answer `/v2/health/live` or any of its stubs has died, and the kubelet restarts the
container.

    python3 -m diffsr.app.serving.stub_probe [--pid PID] [--url http://127.0.0.1:8000]

Only psutil and the standard library are imported: an exec probe runs every period.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

import psutil

STUB = "triton_python_backend_stub"


def stub_processes(server_pid: int) -> list[psutil.Process]:
    """The server's python backend stub processes, dead ones (zombies) included. Linux keeps 15 characters of
    a process name and psutil completes it from the command line, which a zombie no longer has: so a stub
    is matched on its first 15."""
    found = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if child.name()[:15] == STUB[:15]:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def is_dead(process: psutil.Process) -> bool:
    try:
        return bool(process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def dead_stubs(server_pid: int) -> list[int]:
    """The pids of the server's stub processes that have died."""
    return [p.pid for p in stub_processes(server_pid) if is_dead(p)]


def problems(pids: list[int], url: str) -> list[str]:
    found = []
    try:
        with urllib.request.urlopen(f"{url}/v2/health/live", timeout=3) as response:
            if response.status != 200:
                found.append(f"{url}/v2/health/live answered {response.status}")
    except (urllib.error.URLError, OSError) as e:
        found.append(f"{url}/v2/health/live: {e}")
    for pid in pids:
        try:
            dead = dead_stubs(pid)
        except psutil.NoSuchProcess:
            found.append(f"tritonserver {pid} is gone")
            continue
        if dead:
            found.append(f"tritonserver {pid} has {len(dead)} dead python backend stub(s) (pids {dead}): "
                         "their models fail every request")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m diffsr.app.serving.stub_probe",
                                     description="Liveness of a tritonserver and its python backend stubs.")
    parser.add_argument("--pid", type=int, help="the tritonserver's pid (default: every process named tritonserver)")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server's HTTP endpoint")
    args = parser.parse_args(argv)
    pids = [args.pid] if args.pid else [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "tritonserver"]
    found = problems(pids, args.url) if pids else ["no tritonserver process"]
    for problem in found:
        print(f"stub probe: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
