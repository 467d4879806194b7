"""Start the Triton server bundled in `nvidia-pytriton` (or a system one) on a model repository.

The wheel ships `tritonserver`, the python backend and one backend stub per Python version. The
backend directory is assembled in a temporary folder (library, utils, this Python's stub); the
server runs with this interpreter's libpython and the bundled libraries on LD_LIBRARY_PATH, and its
bin first on PATH, so python-backend models run the same Python and environment (diffsr included)
as the caller: the generated `model.py` files import `diffsr.triton_models.models`, so diffsr must be
installed in that environment (`pip install` or `pip install -e`).

A python model whose stub process dies (killed, out of memory) is not restarted by Triton 2.51: the model
answers every request "Stub process ... is not healthy" while the server still reports itself live and
ready (Triton server issue #8604). So the server runs with explicit model control and `StubWatch` reloads
such a model (unload, load: new stubs) as soon as its stub is seen dead. The model-repository API (load,
unload) is restricted to a header with a secret drawn per `TritonServer`: no remote client can unload models.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from diffsr.app.serving.stub_probe import is_dead, stub_processes
from diffsr.export.core.errors import DiffsrError
from diffsr.triton_models.repository import loop_model, verify_repository

log = logging.getLogger(__name__)
ADMIN_HEADER = "diffsr-admin"  # the header that unlocks Triton's model-repository API (load, unload)
LOG_LINES = 1000  # a long-running server keeps this many of its log lines (it forwards them all as they come)


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> Ports:
        """Three ports free on 127.0.0.1 now (for tests, demos and benchmarks)."""
        return cls(*(_free_port() for _ in range(3)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundled() -> tuple[Path, Path, Path]:
    """(tritonserver binary, python backend folder, bundled libraries) from nvidia-pytriton."""
    try:
        import pytriton
    except ImportError:
        raise DiffsrError("nvidia-pytriton is not installed: `pip install nvidia-pytriton`, or pass --system") from None
    root = Path(pytriton.__file__).parent
    return root / "tritonserver" / "bin" / "tritonserver", root / "tritonserver" / "backends" / "python", root.parent / "nvidia_pytriton.libs"


def _backend_dir(python_backend: Path, work: Path) -> Path:
    """backends/python: libtriton_python.so, triton_python_backend_utils.py, and this Python's stub."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = python_backend.parent.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise DiffsrError(f"nvidia-pytriton has no python backend stub for Python {version}: use 3.8 to 3.13")
    dst = work / "backends" / "python"
    dst.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy(python_backend / name, dst / name)
    shutil.copy(stub, dst / "triton_python_backend_stub")
    return work / "backends"


def live_stubs(server_pid: int) -> Counter[str]:
    """Running python-backend stub processes of a tritonserver, counted per model (a stub's command line
    names its model's `<repository>/<model>/<version>/model.py`); dead ones (zombies) are not counted."""
    counts: Counter[str] = Counter()
    for stub in stub_processes(server_pid):  # psutil.Error when the server itself is gone
        try:
            if is_dead(stub):
                continue
            script = next(arg for arg in stub.cmdline() if arg.endswith("model.py"))
        except (psutil.Error, StopIteration):  # gone meanwhile, or not a model's stub
            continue
        counts[Path(script).parts[-3]] += 1
    return counts


@dataclass
class Recovery:
    model: str
    seconds: float  # from the dead stub seen to the model loaded again
    error: str | None = None  # the reload failed (retried after `StubWatch.backoff_s`)


@dataclass
class StubWatch:
    """Every `interval_s`, compare each model's running stubs with those it had when the server got ready; a
    model short of one is reloaded (Triton's explicit model control: unload, load). The reload takes every
    instance of that model down for its duration (Triton's unload lets requests already in the healthy
    instances finish first): a stub that died is an error to mend, not a routine event."""

    server: TritonServer
    interval_s: float = 0.5
    backoff_s: float = 5.0
    recoveries: list[Recovery] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def start(self) -> StubWatch:
        assert self.server.process is not None
        self.expected = live_stubs(self.server.process.pid)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="diffsr-stub-watch")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        import tritonclient.http as http

        process = self.server.process
        assert process is not None
        with http.InferenceServerClient(self.server.http_url, network_timeout=600.0) as client:
            while not self._stop.wait(self.interval_s) and process.poll() is None:
                try:
                    live = live_stubs(process.pid)
                    if not client.is_server_live():  # the server is going down, not one stub
                        continue
                    for model, count in self.expected.items():
                        if live[model] < count and not self._stop.is_set():
                            self._reload(client, model)
                except Exception as e:  # noqa: BLE001 - the watch must outlive any one failure
                    self.server.say(f"diffsr: stub watch: {type(e).__name__}: {e}; retrying in {self.backoff_s:.0f} s")
                    self._stop.wait(self.backoff_s)

    def _reload(self, client: Any, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        start = time.perf_counter()
        self.server.say(f"diffsr: a python backend stub of model {model!r} died; reloading the model")
        headers = self.server.admin_headers
        try:
            client.unload_model(model, headers=headers)
            client.load_model(model, headers=headers)
        except InferenceServerException as e:
            self.recoveries.append(Recovery(model, time.perf_counter() - start, str(e)))
            self.server.say(f"diffsr: reloading {model!r} failed: {e}; retrying in {self.backoff_s:.0f} s")
            self._stop.wait(self.backoff_s)
            return
        self.recoveries.append(Recovery(model, time.perf_counter() - start))
        self.server.say(f"diffsr: model {model!r} reloaded in {self.recoveries[-1].seconds:.1f} s")


class TritonServer:
    """A tritonserver process: start() waits until the ensemble is ready (and starts the stub watch);
    stop() shuts it down."""

    def __init__(self, repository: Path, ports: Ports = Ports(), host: str = "127.0.0.1", system: bool = False,
                 log_line: Callable[[str], None] | None = None, ready_model: str = "diffsr", watch_stubs: bool = True):
        self.repository, self.ports, self.host, self.system = Path(repository), ports, host, system
        self.log_line, self.ready_model = log_line, ready_model
        self.process: subprocess.Popen[str] | None = None
        self.logs: deque[str] = deque(maxlen=LOG_LINES)  # the last lines: what an error message quotes
        self._work: tempfile.TemporaryDirectory[str] | None = None  # the backend folder, while running
        self.watch: StubWatch | None = StubWatch(self) if watch_stubs else None
        # explicit model control lets a client unload models: only a caller holding this header may (HTTP; a
        # gRPC client would send it as "triton-grpc-protocol-diffsr-admin"). The secret is on the server's
        # command line, so this keeps out remote clients, not local users.
        self.admin_headers = {ADMIN_HEADER: secrets.token_hex(16)}

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = os.environ.copy()
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the stub finds this venv, diffsr in it
        if self.system:
            binary = shutil.which("tritonserver")
            if binary is None:
                raise DiffsrError("no tritonserver on PATH: drop --system to use the one in nvidia-pytriton")
            extra: list[str] = []
        else:
            binary_path, python_backend, libs = _bundled()
            binary = str(binary_path)
            # this interpreter's libpython first: the stub must not mix another 3.x build's with our stdlib
            libpython = sysconfig.get_config_var("LIBDIR") if sysconfig.get_config_var("Py_ENABLE_SHARED") else None
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libpython, str(libs), env.get("LD_LIBRARY_PATH")]))
            self._work = self._work or tempfile.TemporaryDirectory(prefix="diffsr-triton-")
            extra = [f"--backend-directory={_backend_dir(python_backend, Path(self._work.name))}"]
        return [
            binary, f"--model-repository={self.repository}", f"--http-address={self.host}",
            f"--grpc-address={self.host}", f"--metrics-address={self.host}", f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}", f"--metrics-port={self.ports.metrics}", "--exit-on-error=true",
            "--model-control-mode=explicit", "--load-model=*",  # every model, and reloadable (StubWatch)
            f"--http-restricted-api=model-repository:{ADMIN_HEADER}={self.admin_headers[ADMIN_HEADER]}",
            f"--grpc-restricted-protocol=model-repository:{ADMIN_HEADER}={self.admin_headers[ADMIN_HEADER]}",
            "--strict-readiness=true", "--log-verbose=0", "--exit-timeout-secs=10", *self._pool_args(), *extra,
        ], env

    def _pool_args(self) -> list[str]:
        """GPU repositories ask for a CUDA memory pool sized by the generator (see cuda_pool_bytes)."""
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2 as mc

        sampler = self.repository / loop_model(self.repository) / "config.pbtxt"
        if not sampler.is_file():
            return []
        config = text_format.Parse(sampler.read_text(), mc.ModelConfig())
        pool = int(config.parameters["cuda_memory_pool_bytes"].string_value or 0)
        return [f"--cuda-memory-pool-byte-size=0:{pool}"] if pool else []

    def warm_up(self, image: bytes, steps: int = 2) -> float:
        """One request at the served shape, so first-call costs (allocations, graph captures) are paid
        before traffic; returns its latency."""
        from diffsr.app.serving.triton_client import TritonClient

        with TritonClient(self.http_url) as client:
            return client.upscale(image, steps=steps).latency_s

    def start(self, timeout: float = 300.0) -> TritonServer:
        if not (self.repository / self.ready_model / "config.pbtxt").is_file():
            raise DiffsrError(f"{self.repository} has no {self.ready_model} model: build it with `diffsr triton-repo`")
        verify_repository(self.repository)  # its graphs are still the ones triton-repo copied
        try:  # whatever fails on the way, nothing is left running and the temporary folder goes
            cmd, env = self.command()
            try:
                # a session of its own: the stubs stay in the server's process group, found by it even after a crash
                self.process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                                start_new_session=True)
            except OSError as e:
                raise DiffsrError(f"cannot start {cmd[0]}: {e.strerror}") from None
            threading.Thread(target=self._pump, daemon=True).start()
            self._wait_ready(timeout)
            if self.watch is not None:
                self.watch.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        import tritonclient.http as http

        assert self.process is not None
        with http.InferenceServerClient(self.http_url) as client:  # closed after: Triton's shutdown waits for open connections
            self._poll_ready(client, timeout)

    def _poll_ready(self, client: Any, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the log pump read the last lines
                raise DiffsrError(f"tritonserver exited with code {self.process.returncode}: {self.last_error()}")
            try:
                if client.is_model_ready(self.ready_model):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise DiffsrError(f"tritonserver did not get {self.ready_model} ready within {timeout:.0f} s")

    def last_error(self) -> str:
        """What a one-line message about its exit shows: the last model that failed to load (the usual cause), else
        the last error line (or the last line). A machine without a GPU logs NVML and CUDA errors that are no cause."""
        lines = [line.strip() for line in self.logs]
        failed = [line for line in lines if "failed to load '" in line]  # a model's own failure, not the summary
        errors = [line for line in lines if line.startswith("E") and "NVML" not in line and "Cuda" not in line]
        chosen = failed[:1] or errors[-1:] or lines[-1:]
        return chosen[0] if chosen else "no output"

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.say(line.rstrip())

    def say(self, line: str) -> None:
        """One line of the server's log (its own, or the stub watch's)."""
        self.logs.append(line + "\n")
        if self.log_line is not None:
            self.log_line(line)

    def stop(self, timeout: float = 60.0) -> None:
        if self.watch is not None:
            self.watch.stop()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Triton drains in-flight requests and unloads models
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:  # a server that died (killed, crashed) leaves its python stubs running
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):  # none left
                pass
        if self._work is not None:
            self._work.cleanup()
            self._work = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
