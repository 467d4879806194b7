"""The endpoint served by a real tritonserver, against the in-process ONNX Runtime pipeline: the session's
`server` (BLS entry point, step batching), the `narrow_server` (tiled, one loop instance, a queue of one),
the `sdxl_server` (the ensemble entry point), the `dit4sr_server` (the second family, tiled) and the `xpsr_server`
(two prompts a prompter writes), all from conftest."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from diffsr.app.serving.triton_client import TritonClient, request_inputs
from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.settings import Request
from diffsr.runtime.image import decode_image
from diffsr.runtime.image import encode_png as _png
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline
from tests.conftest import NARROW_TILING as SERVED_TILING  # 8 latent cells (64 px): the 40x32 photo is 9 tiles

SETTINGS = dict(steps=4, seed=11)


def _decode(png: bytes) -> np.ndarray:
    return decode_image(png, "the endpoint's answer")


@pytest.fixture(scope="module")
def lq():
    return photo("chelsea", (40, 32))


@pytest.fixture(scope="module")
def local(tiny_checkpoint, tiny_onnx):
    return Pipeline(load_runners("onnxruntime", tiny_checkpoint, onnx_dir=tiny_onnx), tiny_checkpoint)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_endpoint_matches_the_onnxruntime_pipeline(server, local, tiny_checkpoint, lq, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    with TritonClient(url, protocol) as client:  # closed: a server stopping waits for open connections
        remote = _decode(client.upscale(_png(lq), **SETTINGS).png)
    direct = local(Request(lq, tiny_checkpoint.defaults.replace(**SETTINGS))).image
    assert remote.shape == direct.shape == (128, 160, 3)
    assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tiled_endpoint_matches_the_tiled_onnxruntime_pipeline(narrow_server, local, tiny_checkpoint, lq, protocol):
    url = narrow_server.http_url if protocol == "http" else narrow_server.grpc_url
    with TritonClient(url, protocol) as client:  # closed: a server stopping waits for open connections
        remote = _decode(client.upscale(_png(lq), **SETTINGS).png)
    direct = local(Request(lq, tiny_checkpoint.defaults.replace(**SETTINGS, **SERVED_TILING))).image
    assert remote.shape == direct.shape == (128, 160, 3)
    assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1
    untiled = local(Request(lq, tiny_checkpoint.defaults.replace(**SETTINGS))).image
    assert np.abs(remote.astype(int) - untiled.astype(int)).max() > 1  # the server did tile (9 tiles of 64 px)


def test_request_settings_reach_the_sampler(narrow_server, local, tiny_checkpoint, lq):
    settings = dict(steps=3, seed=5, guidance_scale=1.0, prompt="a cat", negative_prompt="dogs", scheduler="dpmpp-2m")
    with TritonClient(narrow_server.http_url) as client:
        remote = _decode(client.upscale(_png(lq), **settings).png)
    direct = local(Request(lq, tiny_checkpoint.defaults.replace(**settings, **SERVED_TILING))).image
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
        "too large": dict(image=big),
        "zero steps": dict(image=png, steps=0),
        "10000 steps": dict(image=png, steps=10_000),
        "nan guidance": dict(image=png, guidance_scale=float("nan")),
        "unknown scheduler": dict(image=png, scheduler="euler_x"),
    }
    expected = {"corrupt": "cannot decode", "truncated": "cannot decode", "too large": "pixel limit",
                "zero steps": "steps=0", "10000 steps": "steps=10000", "nan guidance": "guidance_scale=nan",
                "unknown scheduler": "scheduler 'euler_x' is not supported"}
    for case, kwargs in bad.items():
        with pytest.raises(DiffsrError, match=expected[case]):
            client.upscale(**kwargs)
    raw = {
        "missing image": ([("steps", np.array([2], np.int32), "INT32")], "image is required"),
        "wrong dtype": ([("image", np.array([1], np.int32), "INT32")], "data-type"),
        "wrong rank": ([("image", np.array([[png]], dtype=np.object_), "BYTES")], "shape"),
        "non-utf8 prompt": ([("image", np.array([png], dtype=np.object_), "BYTES"),
                             ("prompt", np.array([b"\xff\xfe bad"], dtype=np.object_), "BYTES")],
                            "prompt is not valid UTF-8 text"),
    }
    for case, (tensors, message) in raw.items():
        with pytest.raises(InferenceServerException, match=message):
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
    alone = {s: client.upscale(_png(lq), steps=4, seed=s).png for s in seeds}

    def one(seed):
        with TritonClient(server.http_url) as own:
            return seed, own.upscale(_png(lq), steps=4, seed=seed).png

    before = _executions(server, "controlnet_unet")
    with ThreadPoolExecutor(8) as pool:
        together = dict(pool.map(one, seeds))
    assert together == alone  # step batching on: stacked calls give each loop exactly its own rows
    assert len(set(alone.values())) == len(seeds)
    requests, runs = (a - b for a, b in zip(_executions(server, "controlnet_unet"), before))
    assert requests == 8 * 4 and runs < requests, (requests, runs)  # some runs served several loops' calls


def _executions(server, model):
    """(calls, runs) of a model from Triton's own metrics: fewer runs than calls is step batching at work."""
    import re

    text = _metrics(server)

    def value(name):
        return float(re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M).group(1))

    return value("nv_inference_request_success"), value("nv_inference_exec_count")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sdxl_endpoint_matches_the_onnxruntime_pipeline(sdxl_server, sdxl_checkpoint, sdxl_onnx, lq, protocol):
    """Same request as SD's, through the ensemble entry point: the preprocess model tokenises for both
    encoders, the ensemble calls the text encoder, the sampler model builds time_ids."""
    url = sdxl_server.http_url if protocol == "http" else sdxl_server.grpc_url
    with TritonClient(url, protocol) as client:
        remote = _decode(client.upscale(_png(lq), prompt="a cat", **SETTINGS).png)
    local = Pipeline(load_runners("onnxruntime", sdxl_checkpoint, onnx_dir=sdxl_onnx), sdxl_checkpoint)
    direct = local(Request(lq, sdxl_checkpoint.defaults.replace(prompt="a cat", **SETTINGS))).image
    assert remote.shape == direct.shape == (128, 160, 3)
    assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1


@pytest.fixture(scope="module")
def dit4sr_local(dit4sr_checkpoint, dit4sr_onnx):
    return Pipeline(load_runners("onnxruntime", dit4sr_checkpoint, onnx_dir=dit4sr_onnx), dit4sr_checkpoint)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_dit4sr_endpoint_matches_the_onnxruntime_pipeline(dit4sr_server, dit4sr_checkpoint, dit4sr_local, protocol):
    """The second family at the endpoint: three tokenisers in the preprocessing (T5's at its fixed length),
    the flow-matching sampler with CFG, tiled (64 px tiles), on a non-square photo with odd sides; no prompt, so
    the endpoint captions the photo first (its checkpoint has a captioner) and returns the prompt it used."""
    lq = photo("coffee", (29, 22))
    url = dit4sr_server.http_url if protocol == "http" else dit4sr_server.grpc_url
    with TritonClient(url, protocol) as client:
        answer = client.upscale(_png(lq), **SETTINGS)
    remote = _decode(answer.png)
    config = dit4sr_checkpoint.defaults.replace(**SETTINGS)
    direct = dit4sr_local(Request(lq, config.replace(**SERVED_TILING)))
    assert answer.prompt == direct.prompt != config.caption_suffix  # the caption, made the same way
    assert remote.shape == direct.image.shape == (88, 116, 3)
    assert np.array_equal(remote, direct.image)  # byte for byte
    untiled = dit4sr_local(Request(lq, config)).image
    assert np.abs(remote.astype(int) - untiled.astype(int)).max() > 1  # the server did tile


def test_the_endpoint_captions_only_without_a_prompt(dit4sr_server, lq):
    """The caption stage runs (its metrics move: one caption, its tokens) for a request without a prompt, and
    not at all for one with a prompt, which comes back as the prompt used."""
    before = _scrape(dit4sr_server)
    with TritonClient(dit4sr_server.http_url) as client:
        client.upscale(_png(lq), steps=1)
        middle = _scrape(dit4sr_server)
        prompted = client.upscale(_png(lq), prompt="a cat on a sofa", steps=1)
    after = _scrape(dit4sr_server)
    assert middle["diffsr_caption_seconds_count"] - before.get("diffsr_caption_seconds_count", 0.0) == 1
    assert middle["diffsr_caption_tokens_total"] - before.get("diffsr_caption_tokens_total", 0.0) >= 1
    assert middle["diffsr_caption_seconds_sum"] > before.get("diffsr_caption_seconds_sum", 0.0)
    assert prompted.prompt == "a cat on a sofa"
    for name in ("diffsr_caption_seconds_count", "diffsr_caption_tokens_total"):
        assert after[name] == middle[name], name


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_xpsr_endpoint_writes_both_prompts_as_the_onnxruntime_pipeline(xpsr_server, xpsr_checkpoint, xpsr_onnx,
                                                                      protocol):
    """XPSR at the endpoint, tiled, on a non-square photo: without prompts, its LLaVA prompter writes both (two
    texts: the prompter's metrics count two, their tokens move) and the endpoint returns them with an image byte for
    byte the in-process ONNX Runtime pipeline's; a typed low-level prompt comes back verbatim and only the high-level
    one is written."""
    lq = photo("coffee", (23, 17))
    local = Pipeline(load_runners("onnxruntime", xpsr_checkpoint, onnx_dir=xpsr_onnx), xpsr_checkpoint)
    url = xpsr_server.http_url if protocol == "http" else xpsr_server.grpc_url
    settings = dict(steps=2, seed=5)
    before = _scrape(xpsr_server)
    with TritonClient(url, protocol) as client:
        answer = client.upscale(_png(lq), **settings)
        middle = _scrape(xpsr_server)
        typed = client.upscale(_png(lq), prompt_low="blurry, jpeg artifacts", **settings)
    after = _scrape(xpsr_server)
    config = xpsr_checkpoint.defaults.replace(**settings, **SERVED_TILING)
    direct = local(Request(lq, config))
    assert answer.prompts == direct.prompts and set(answer.prompts) == {"prompt", "prompt_low"}
    assert answer.prompts["prompt_low"] and answer.prompts["prompt"] != config.caption_suffix  # both written
    assert np.array_equal(_decode(answer.png), direct.image) and direct.image.shape == (68, 92, 3)
    assert middle["diffsr_prompter_seconds_count"] - before.get("diffsr_prompter_seconds_count", 0.0) == 2
    assert middle["diffsr_prompter_tokens_total"] - before.get("diffsr_prompter_tokens_total", 0.0) >= 2
    assert after["diffsr_prompter_seconds_count"] - middle["diffsr_prompter_seconds_count"] == 1
    assert typed.prompts == {"prompt": answer.prompts["prompt"], "prompt_low": "blurry, jpeg artifacts"}
    by_hand = local(Request(lq, config.replace(inputs={"prompt_low": "blurry, jpeg artifacts"})))
    assert np.array_equal(_decode(typed.png), by_hand.image) and not np.array_equal(by_hand.image, direct.image)


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
            client.infer("diffsr", request_inputs(protocol, _png(lq), steps=10))
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


@pytest.mark.parametrize("size,scheduler", [((183, 183), "ddim"), ((57, 86), "dpmpp-2m")])
def test_any_photo_size_comes_back_at_four_times_with_either_scheduler(server, local, tiny_checkpoint, size, scheduler):
    """A 183x183 RGBA photo and a 57x86 one: exactly 4x their size from the endpoint; the smaller one is the
    in-process pipeline's image (with DPM-Solver++ 2M at 10 steps, through the endpoint too)."""
    from PIL import Image

    rgba = Image.fromarray(photo("astronaut", size)).convert("RGBA")
    rgba.putalpha(180)
    buffer = __import__("io").BytesIO()
    rgba.save(buffer, format="PNG")
    settings = dict(steps=10 if scheduler == "dpmpp-2m" else 2, seed=3, scheduler=scheduler)
    with TritonClient(server.http_url) as client:
        remote = _decode(client.upscale(buffer.getvalue(), **settings).png)
    w, h = size
    assert remote.shape == (4 * h, 4 * w, 3)
    if w * h < 100 * 100:  # the 732 px one is four tiles a step: its endpoint-vs-pipeline check is the tiled tests'
        direct = local(Request(decode_image(buffer.getvalue()), tiny_checkpoint.defaults.replace(**settings))).image
        assert np.abs(remote.astype(int) - direct.astype(int)).max() <= 1


def test_refsr_endpoint_takes_any_number_of_references_as_the_onnxruntime_pipeline(refsr_server, refsr_checkpoint,
                                                                                  refsr_onnx):
    """refsr behind the ensemble entry point, tiled, on a non-square photo: `references` is a BYTES tensor of any
    count (none: the tensor left out), and each answer is byte for byte the in-process ONNX Runtime
    pipeline's with the same references; references change the answer, their order does not."""
    from diffsr.app.serving.triton_client import remote_values
    from diffsr.runtime.requests import parse_request

    ckpt = refsr_checkpoint
    local = Pipeline(load_runners("onnxruntime", ckpt, onnx_dir=refsr_onnx), ckpt)
    lq = photo("astronaut", (27, 19))
    refs = [photo("coffee", (31, 45)), photo("rocket", (60, 13)), photo("camera", (20, 20))]
    settings = dict(steps=2, seed=7)
    answers, directs = [], []
    with TritonClient(refsr_server.grpc_url, "grpc") as client:
        for given in ([], refs[:1], refs, refs[::-1]):
            request = parse_request(ckpt.model, ckpt.defaults, {"image": lq, "references": given, **settings})
            request = Request(request.photo, request.settings.replace(**SERVED_TILING), request.photos)
            answers.append(_decode(client.upscale(**remote_values(ckpt.model, request), **settings).png))
            directs.append(local(request).image)
    for answer, direct in zip(answers, directs):
        assert np.array_equal(answer, direct) and answer.shape == (76, 108, 3)
    assert not np.array_equal(answers[0], answers[1]) and not np.array_equal(answers[1], answers[2])
    assert np.abs(answers[2].astype(int) - answers[3].astype(int)).max() <= 1


def test_a_server_with_a_gallery_picks_references_for_a_request_without(refsr_gallery_server, refsr_gallery,
                                                                        refsr_checkpoint, refsr_onnx):
    """BLS entry with a gallery (top 2): a request without references is answered with the gallery's two photos
    nearest its photo (its own file first, when it is one) and named in `picked_references`; the image is the
    in-process pipeline's given those files; a request with references of its own keeps them, and nothing is picked."""
    from diffsr.runtime.image import load_image
    from diffsr.runtime.requests import parse_request

    ckpt, (_, folder) = refsr_checkpoint, refsr_gallery
    local = Pipeline(load_runners("onnxruntime", ckpt, onnx_dir=refsr_onnx), ckpt)
    lq = load_image(folder / "rocket.png")  # a gallery photo itself
    settings = dict(steps=2, seed=3)
    with TritonClient(refsr_gallery_server.http_url) as client:
        picked = client.upscale(_png(lq), **settings)
        given = client.upscale(_png(lq), references=[_png(photo("camera", (30, 30)))], **settings)
    assert len(picked.picked) == 2 and picked.picked[0] == "rocket.png" and given.picked == []
    request = parse_request(ckpt.model, ckpt.defaults, {"image": lq, "references": [folder / n for n in picked.picked],
                                                        **settings})
    assert np.array_equal(_decode(picked.png), local(request).image)
    request = parse_request(ckpt.model, ckpt.defaults, {"image": lq, "references": [photo("camera", (30, 30))],
                                                        **settings})
    assert np.array_equal(_decode(given.png), local(request).image)


def test_a_gallery_is_refused_where_it_cannot_serve(refsr_checkpoint, refsr_onnx, refsr_gallery, tiny_checkpoint,
                                                    tiny_onnx, tmp_path):
    from diffsr.triton_models.repository import ServingOptions, build_repository

    index = str(refsr_gallery[0])
    with pytest.raises(DiffsrError, match="this sd checkpoint takes no reference photos"):
        build_repository(tiny_checkpoint, tiny_onnx, tmp_path / "a", options=ServingOptions(gallery=index))
    with pytest.raises(DiffsrError, match="--gallery-top-k 11: use 1 to 10"):
        build_repository(refsr_checkpoint, refsr_onnx, tmp_path / "b", options=ServingOptions(gallery=index,
                                                                                            gallery_top_k=11))
    from diffsr.runtime.gallery import Gallery

    emptied = Gallery.load(refsr_gallery[0])
    emptied.remove({name for name, _ in emptied.photos.values()})
    emptied.save(tmp_path / "empty")
    with pytest.raises(DiffsrError, match="--gallery .*empty holds no photos"):
        build_repository(refsr_checkpoint, refsr_onnx, tmp_path / "c", options=ServingOptions(gallery=str(tmp_path / "empty")))


def test_sisrm_endpoint_returns_the_label_words_as_the_onnxruntime_pipeline(sisrm_server, sisrm_checkpoint, sisrm_onnx):
    """SISRM behind the ensemble entry point, tiled, on a non-square photo: the preprocessing segments the photo (its
    models over BLS), the label words make the prompt the endpoint returns, and the image is byte for byte the
    in-process ONNX Runtime pipeline's; a typed prompt comes back verbatim, before the words; fewer words change the
    prompt and the image."""
    ckpt = sisrm_checkpoint
    local = Pipeline(load_runners("onnxruntime", ckpt, onnx_dir=sisrm_onnx), ckpt)
    lq = photo("chelsea", (27, 19))
    settings = dict(steps=2, seed=7)
    with TritonClient(sisrm_server.grpc_url, "grpc") as client:
        answer = client.upscale(_png(lq), **settings)
        typed = client.upscale(_png(lq), prompt="a cat on a sofa", labels=2, **settings)
    config = ckpt.defaults.replace(**settings, **SERVED_TILING)
    direct = local(Request(lq, config))
    suffix = ckpt.defaults.caption_suffix
    words = direct.prompt.removesuffix(f", {suffix}").split(", ")
    assert len(words) == 5 and answer.prompts == direct.prompts
    assert np.array_equal(_decode(answer.png), direct.image) and direct.image.shape == (76, 108, 3)
    by_hand = local(Request(lq, config.replace(prompt="a cat on a sofa", inputs={"labels": 2})))
    assert typed.prompt == by_hand.prompt and typed.prompt.startswith("a cat on a sofa, ")
    assert np.array_equal(_decode(typed.png), by_hand.image) and not np.array_equal(by_hand.image, direct.image)
