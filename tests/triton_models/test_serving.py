"""The endpoint served by a real tritonserver, against the in-process ONNX Runtime pipeline: the session's
server has the BLS entry point (the default), the tiled server the ensemble one."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from diffsr.app.serving.triton_client import TritonClient, request_inputs
from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.backends import load_runners
from diffsr.runtime.image import decode_image
from diffsr.runtime.image import encode_png as _png
from diffsr.runtime.pipeline import Pipeline

SETTINGS = dict(steps=4, seed=11)
# the tiled server's tiles: 8 latent cells (64 px), so the tests' 40x32 photo is 9 tiles
SERVED_TILING = dict(tile=8, tile_overlap=2)


def _decode(png: bytes) -> np.ndarray:
    return decode_image(png, "the endpoint's answer")


@pytest.fixture(scope="module")
def lq():
    return photo("chelsea", (40, 32))


@pytest.fixture(scope="module")
def tiled_server(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    """A second server of the tiny checkpoint whose sampler tiles (the session's `server` does not), behind
    the ensemble entry point (the session's has the BLS one)."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from diffsr.app.serving.triton_server import Ports, TritonServer
    from diffsr.triton_models.repository import ServingOptions, build_repository

    repo = tmp_path_factory.mktemp("repo-tiled") / "models"
    build_repository(tiny_checkpoint, tiny_onnx, repo, "onnxruntime", options=ServingOptions(**SERVED_TILING, entry="ensemble"))
    with TritonServer(repo, Ports.free()) as srv:
        yield srv


@pytest.fixture(scope="module")
def local(tiny_checkpoint, tiny_onnx):
    return Pipeline(load_runners("onnxruntime", tiny_checkpoint, onnx_dir=tiny_onnx), tiny_checkpoint)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_endpoint_matches_the_onnxruntime_pipeline(server, local, tiny_checkpoint, lq, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    with TritonClient(url, protocol) as client:  # closed: a server stopping waits for open connections
        remote = _decode(client.upscale(_png(lq), **SETTINGS).png)
    direct = local(lq, tiny_checkpoint.defaults.replace(**SETTINGS)).image
    assert remote.shape == direct.shape == (128, 160, 3)
    assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tiled_endpoint_matches_the_tiled_onnxruntime_pipeline(tiled_server, local, tiny_checkpoint, lq, protocol):
    url = tiled_server.http_url if protocol == "http" else tiled_server.grpc_url
    with TritonClient(url, protocol) as client:  # closed: a server stopping waits for open connections
        remote = _decode(client.upscale(_png(lq), **SETTINGS).png)
    direct = local(lq, tiny_checkpoint.defaults.replace(**SETTINGS, **SERVED_TILING)).image
    assert remote.shape == direct.shape == (128, 160, 3)
    assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1
    untiled = local(lq, tiny_checkpoint.defaults.replace(**SETTINGS)).image
    assert np.abs(remote.astype(int) - untiled.astype(int)).max() > 1  # the server did tile (9 tiles of 64 px)


def test_request_settings_reach_the_sampler(tiled_server, local, tiny_checkpoint, lq):
    settings = dict(steps=3, seed=5, guidance_scale=1.0, prompt="a cat", negative_prompt="dogs")
    with TritonClient(tiled_server.http_url) as client:
        remote = _decode(client.upscale(_png(lq), **settings).png)
    direct = local(lq, tiny_checkpoint.defaults.replace(**settings, **SERVED_TILING)).image
    assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1


def _inputs(kind, tensors):
    """tritonclient's request inputs (`kind`: tritonclient.http or tritonclient.grpc) of (name, array,
    dtype) triples (HTTP sends them as binary data, its default)."""
    inputs = []
    for name, array, dtype in tensors:
        inputs.append(kind.InferInput(name, list(array.shape), dtype))
        inputs[-1].set_data_from_numpy(array)
    return inputs


def _raw_infer(server, tensors):
    import tritonclient.http as http

    with http.InferenceServerClient(server.http_url) as client:
        return client.infer("diffsr", _inputs(http, tensors), outputs=[http.InferRequestedOutput("upscaled", binary_data=True)])


def test_bad_requests_get_errors_and_the_server_keeps_serving(server, lq, request):
    from tritonclient.utils import InferenceServerException

    client = TritonClient(server.http_url)
    request.addfinalizer(client.close)
    before = client.upscale(_png(lq), **SETTINGS).png
    png = _png(lq)
    big = _png(np.zeros((1250, 1250, 3), np.uint8))  # x4 = 5000x5000, above the 4096x4096 limit
    bad = {
        "corrupt": dict(image=b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
        "truncated": dict(image=png[: len(png) // 2]),
        "one pixel": dict(image=_png(np.zeros((1, 1, 3), np.uint8))),
        "too large": dict(image=big),
        "zero steps": dict(image=png, steps=0),
        "10000 steps": dict(image=png, steps=10_000),
        "nan guidance": dict(image=png, guidance_scale=float("nan")),
    }
    expected = {"corrupt": "cannot decode", "truncated": "cannot decode", "one pixel": "not a multiple of 8",
                "too large": "pixel limit", "zero steps": "steps=0", "10000 steps": "steps=10000",
                "nan guidance": "guidance_scale=nan"}
    for case, kwargs in bad.items():
        with pytest.raises(DiffsrError, match=expected[case]):
            client.upscale(**kwargs)
    raw = {
        "missing image": [("steps", np.array([2], np.int32), "INT32")],
        "wrong dtype": [("image", np.array([1], np.int32), "INT32")],
        "wrong rank": [("image", np.array([[png]], dtype=np.object_), "BYTES")],
        "non-utf8 prompt": [("image", np.array([png], dtype=np.object_), "BYTES"),
                            ("prompt", np.array([b"\xff\xfe bad"], dtype=np.object_), "BYTES")],
    }
    for case, tensors in raw.items():
        with pytest.raises(InferenceServerException):
            _raw_infer(server, tensors)
    assert client.upscale(_png(lq), **SETTINGS).png == before


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_faults_are_invalid_argument_and_the_server_serves_on(server, lq, protocol):
    """HTTP 400 / gRPC INVALID_ARGUMENT, not INTERNAL, for a too large image and for a bad parameter."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    kind = http if protocol == "http" else grpc
    url = server.http_url if protocol == "http" else server.grpc_url
    expected = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    big = _png(np.zeros((1250, 1250, 3), np.uint8))  # a 5000x5000 output
    client = kind.InferenceServerClient(url)
    try:
        # 1000 steps pass the settings' range but not SD's scheduler (leading spacing would start at t = 1000)
        cases = {"pixel limit": request_inputs(protocol, big), "steps=0": request_inputs(protocol, _png(lq), steps=0),
                 "out of range for this scheduler": request_inputs(protocol, _png(lq), steps=1000)}
        for message, inputs in cases.items():
            with pytest.raises(InferenceServerException) as failed:
                client.infer("diffsr", inputs)
            assert failed.value.status() == expected, failed.value.message()
            assert message in failed.value.message()
    finally:
        client.close()
    with TritonClient(url, protocol) as own:
        assert _decode(own.upscale(_png(lq), steps=1).png).shape == (128, 160, 3)


def test_concurrent_requests_each_get_their_own_image(server, lq, request):
    seeds = list(range(100, 108))
    client = TritonClient(server.http_url)
    request.addfinalizer(client.close)
    alone = {s: client.upscale(_png(lq), steps=2, seed=s).png for s in seeds}

    def one(seed):
        with TritonClient(server.http_url) as own:
            return seed, own.upscale(_png(lq), steps=2, seed=seed).png

    before = _executions(server, "controlnet_unet")
    with ThreadPoolExecutor(8) as pool:
        together = dict(pool.map(one, seeds))
    assert together == alone  # step batching on: stacked calls give each loop exactly its own rows
    assert len(set(alone.values())) == len(seeds)
    requests, runs = (a - b for a, b in zip(_executions(server, "controlnet_unet"), before))
    assert requests == 8 * 2 and runs < requests, (requests, runs)  # some runs served several loops' calls


def _executions(server, model):
    """(calls, runs) of a model from Triton's own metrics: fewer runs than calls is step batching at work."""
    import re

    text = _metrics(server)

    def value(name):
        return float(re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M).group(1))

    return value("nv_inference_request_success"), value("nv_inference_exec_count")


@pytest.fixture(scope="module")
def sdxl_server(sdxl_checkpoint, sdxl_onnx, tmp_path_factory):
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from diffsr.app.serving.triton_server import Ports, TritonServer
    from diffsr.triton_models.repository import build_repository

    repo = tmp_path_factory.mktemp("repo-sdxl") / "models"
    build_repository(sdxl_checkpoint, sdxl_onnx, repo, "onnxruntime")
    with TritonServer(repo, Ports.free()) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sdxl_endpoint_matches_the_onnxruntime_pipeline(sdxl_server, sdxl_checkpoint, sdxl_onnx, lq, protocol):
    """Same request as SD's: the preprocess model tokenises for both encoders, the sampler builds time_ids."""
    url = sdxl_server.http_url if protocol == "http" else sdxl_server.grpc_url
    with TritonClient(url, protocol) as client:
        remote = _decode(client.upscale(_png(lq), prompt="a cat", **SETTINGS).png)
    local = Pipeline(load_runners("onnxruntime", sdxl_checkpoint, onnx_dir=sdxl_onnx), sdxl_checkpoint)
    direct = local(lq, sdxl_checkpoint.defaults.replace(prompt="a cat", **SETTINGS)).image
    assert remote.shape == direct.shape == (128, 160, 3)
    assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1


def test_a_cancelled_request_frees_its_instance_within_a_step(server, lq):
    """Four 200-step requests fill the server's four loop instances and are cancelled by their gRPC clients:
    each ends CANCELLED, and the next request takes what an idle server takes, not the rest of 200 steps."""
    import threading
    import time

    import tritonclient.grpc as grpc

    def inputs(steps):
        return request_inputs("grpc", _png(lq), steps=steps)

    client = grpc.InferenceServerClient(server.grpc_url)
    try:
        start = time.perf_counter()
        client.infer("diffsr", inputs(20))
        idle = time.perf_counter() - start
        errors, done = [], threading.Semaphore(0)
        cancelled_before = _scrape(server).get("diffsr_requests_cancelled_total", 0.0)

        def finished(result, error):
            errors.append(error)
            done.release()

        start = time.perf_counter()
        calls = [client.async_infer("diffsr", inputs(200), finished) for _ in range(4)]
        time.sleep(1.0)
        for call in calls:
            call.cancel()
        for _ in calls:
            assert done.acquire(timeout=60)
        assert all(e is not None and "CANCELLED" in str(e.status()) for e in errors), errors
        start = time.perf_counter()
        client.infer("diffsr", inputs(20))
        after = time.perf_counter() - start
    finally:
        client.close()
    # 200 steps of four requests on two cores would take well over 10x the idle request
    assert after < 2 * idle + 1.0, (after, idle)
    assert _scrape(server)["diffsr_requests_cancelled_total"] - cancelled_before == 4  # each stopped in the loop


def _metrics(server):
    """The text of Triton's metrics port."""
    import urllib.request

    with urllib.request.urlopen(f"http://{server.host}:{server.ports.metrics}/metrics", timeout=10) as response:
        return response.read().decode()


def _scrape(server):
    """name -> value of the `diffsr_*` series of the entry model on Triton's metrics port."""
    values = {}
    for line in _metrics(server).splitlines():
        if line.startswith("diffsr_") and 'model="diffsr"' in line and "le=" not in line:
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            values[name] = values.get(name, 0.0) + value
    return values


def test_metrics_count_steps_pixels_and_rejections(server, lq):
    """The entry model's own metrics, scraped from the metrics port around one good and one bad request."""
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    before = _scrape(server)
    with TritonClient(server.http_url) as client:
        client.upscale(_png(lq), steps=3)
    bad = http.InferenceServerClient(server.http_url)
    try:
        with pytest.raises(InferenceServerException):
            bad.infer("diffsr", _inputs(http, [("image", np.array([b"not an image"], dtype=np.object_), "BYTES")]))
    finally:
        bad.close()
    after = _scrape(server)
    delta = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    assert delta["diffsr_steps_total"] == 3 and delta["diffsr_step_seconds_count"] == 3, delta
    assert delta["diffsr_step_seconds_sum"] > 0
    assert delta["diffsr_output_pixels_total"] == 128 * 160
    assert delta["diffsr_requests_rejected_total"] == 1
    assert "diffsr_requests_cancelled_total" in after


@pytest.fixture(scope="module")
def narrow_server(tiny_checkpoint, tiny_onnx, tmp_path_factory):
    """One loop instance and a queue of one: a third request at once is overload."""
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    from diffsr.app.serving.triton_server import Ports, TritonServer
    from diffsr.triton_models.repository import ServingOptions, build_repository

    repo = tmp_path_factory.mktemp("repo-narrow") / "models"
    build_repository(tiny_checkpoint, tiny_onnx, repo, "onnxruntime",
                     options=ServingOptions(sampler_instances=1, max_queue_size=1, warmup=False))
    with TritonServer(repo, Ports.free()) as srv:
        yield srv


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_overload_is_unavailable_and_the_server_serves_on(narrow_server, lq, protocol):
    """Four requests at once against one instance and a queue of one: those beyond are refused at once as
    UNAVAILABLE (HTTP 503), the others answered; then the server serves the next request."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    kind = http if protocol == "http" else grpc
    url = narrow_server.http_url if protocol == "http" else narrow_server.grpc_url

    def one(_):
        client = kind.InferenceServerClient(url)
        try:
            client.infer("diffsr", request_inputs(protocol, _png(lq), steps=30))
            return "ok"
        except InferenceServerException as e:
            return f"{e.status()} {e.message()}"
        finally:
            client.close()

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(one, range(4)))
    refused = [o for o in outcomes if o != "ok"]
    assert refused and len(refused) < 4, outcomes
    expected = "503" if protocol == "http" else "UNAVAILABLE"
    assert all(expected in o for o in refused), outcomes
    with TritonClient(url, protocol) as client:
        assert _decode(client.upscale(_png(lq), steps=1).png).shape == (128, 160, 3)
