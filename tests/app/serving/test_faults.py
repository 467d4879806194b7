"""Faults of a real tritonserver: a python backend stub process killed mid-request. Triton 2.51 does not
restart it (the model would answer "not healthy" for ever while the server reports ready); the server's
stub watch (`app.serving.triton_server.StubWatch`) reloads the model. The stubs killed are the narrow
server's (one loop instance: the running request's stub is the one to kill); the tests after it get the
server back whole (the watch's reloads are checked here)."""

import threading
import time

import pytest

from diffsr.app.serving.stub_probe import dead_stubs, is_dead, main, stub_processes
from diffsr.app.serving.triton_client import request_inputs
from diffsr.calib.data import photo
from diffsr.runtime.image import encode_png


@pytest.fixture(scope="module")
def png():
    return encode_png(photo("chelsea", (32, 32)))  # 128 px out: 9 of the narrow server's 64 px tiles a step


def _stub_of(server, model):
    for stub in stub_processes(server.process.pid):
        if not is_dead(stub) and f"/{model}/1/model.py" in " ".join(stub.cmdline()):
            return stub
    raise AssertionError(f"no stub process of {model}")


@pytest.mark.disruptive
@pytest.mark.parametrize("model", ["controlnet_unet", "diffsr"])
def test_a_killed_stub_fails_its_request_cleanly_and_the_model_comes_back(narrow_server, png, model):
    """SIGKILL of a stub (a per-step model's, or the entry model's own) while a 999-step request runs in it:
    that request gets an error naming the failure, not a hang; the watch reloads the model; the next
    requests are answered, with the same image as before the fault."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(narrow_server.grpc_url)
    try:
        before = client.infer("diffsr", request_inputs("grpc", png, steps=4)).as_numpy("upscaled")[0]
        outcome = {}

        def long_request():
            try:
                client.infer("diffsr", request_inputs("grpc", png, steps=999), client_timeout=120)  # still running at the kill
                outcome["status"] = "ok"
            except InferenceServerException as e:
                outcome["status"], outcome["message"] = e.status(), e.message()

        dead_before = len(dead_stubs(narrow_server.process.pid))
        running = threading.Thread(target=long_request)
        running.start()
        time.sleep(1.5)
        _stub_of(narrow_server, model).kill()
        killed = time.perf_counter()
        time.sleep(0.2)
        assert len(dead_stubs(narrow_server.process.pid)) == dead_before + 1
        probe = ["--pid", str(narrow_server.process.pid), "--url", f"http://{narrow_server.http_url}"]
        assert main(probe) == 1  # what a pod's liveness probe runs: Triton's own /v2/health/live still says 200
        running.join(timeout=120)
        assert not running.is_alive(), "the request in the killed stub never returned"
        assert outcome["status"] == "StatusCode.INTERNAL", outcome  # the server's fault, not the client's
        assert "not healthy" in outcome["message"] or "Stub" in outcome["message"], outcome
        while True:
            try:
                after = client.infer("diffsr", request_inputs("grpc", png, steps=4)).as_numpy("upscaled")[0]
                break
            except InferenceServerException:
                assert time.perf_counter() - killed < 60, "the server did not recover within 60 s"
                time.sleep(0.2)
        recovered = time.perf_counter() - killed
    finally:
        client.close()
    assert after == before
    reloads = [r for r in narrow_server.watch.recoveries if r.model == model]
    assert reloads and reloads[-1].error is None, narrow_server.watch.recoveries
    print(f"{model}: stub killed; the request's outcome: {outcome}; served again after {recovered:.1f} s "
          f"(model reload {reloads[-1].seconds:.1f} s)")


def test_only_the_watch_may_unload_models(narrow_server):
    """Explicit model control opens Triton's load/unload API; it is restricted to the server's own header."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    with http.InferenceServerClient(narrow_server.http_url) as client:
        with pytest.raises(InferenceServerException):
            client.unload_model("controlnet_unet")
        assert client.is_model_ready("controlnet_unet")


@pytest.mark.disruptive(server=True)
def test_a_dead_server_leaves_no_stub_running(narrow_server, png):
    """The session's last test (it takes the narrow server down): tritonserver SIGKILLed while a request runs
    leaves a stub of the model that was running it alive, orphaned, for good (Triton 2.51's stubs end with
    their server only when idle); `stop` ends it (the stubs share the server's process group)."""
    import psutil
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    stubs = stub_processes(narrow_server.process.pid)
    assert len(stubs) >= 2, stubs  # the entry model's and the per-step models'
    client = grpc.InferenceServerClient(narrow_server.grpc_url)
    running = threading.Thread(target=lambda: pytest.raises(InferenceServerException, client.infer, "diffsr",
                                                            request_inputs("grpc", png, steps=999), client_timeout=60))
    running.start()
    time.sleep(1.5)
    narrow_server.process.kill()
    narrow_server.process.wait()
    narrow_server.stop()
    gone, alive = psutil.wait_procs(stubs, timeout=5)
    running.join(timeout=60)
    client.close()
    assert not alive, [" ".join(p.cmdline()[:2]) for p in alive]
    narrow_server.process = None  # stopped here: the session's teardown has no crash of it to report
