"""Liveness of a tritonserver's python backend stubs, for a server that runs without `diffsr serve`'s stub
watch (a Kubernetes pod running `tritonserver` itself). Triton 2.51 neither restarts a stub that died nor
reports it: `/v2/health/live` stays 200 while the stub's model fails every request. A dead stub stays a
zombie child of the server (Triton does not reap it), so its presence is the sign: this probe exits 1 when
any stub of the server has died, and the kubelet restarts the container.

    python3 -m diffsr.app.stub_probe [--pid PID]     (default: every process named tritonserver)

Only psutil is imported: an exec probe runs every period.
"""

from __future__ import annotations

import argparse
import sys

import psutil

STUB = "triton_python_backend_stub"


def dead_stubs(server_pid: int) -> list[int]:
    """The pids of the server's stub processes that have died (zombies)."""
    dead = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if child.name() == STUB and child.status() == psutil.STATUS_ZOMBIE:
                dead.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return dead


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m diffsr.app.stub_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pid", type=int, help="the tritonserver's pid (default: every process named tritonserver)")
    args = parser.parse_args(argv)
    servers = [args.pid] if args.pid else [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "tritonserver"]
    if not servers:
        print("stub probe: no tritonserver process", file=sys.stderr)
        return 1
    try:
        dead = {pid: dead_stubs(pid) for pid in servers}
    except psutil.NoSuchProcess as e:
        print(f"stub probe: tritonserver {e.pid} is gone", file=sys.stderr)
        return 1
    failed = {pid: stubs for pid, stubs in dead.items() if stubs}
    for pid, stubs in failed.items():
        print(f"stub probe: tritonserver {pid} has {len(stubs)} dead python backend stub(s) (pids {stubs}): "
              "their models fail every request", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
