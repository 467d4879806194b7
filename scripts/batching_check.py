"""Throughput with and without cross-request step batching, in one run: two servers on the same checkpoint
(8 loop instances each, batching off and on), and for each concurrency `rounds` rounds of that many requests
at once, alternating between the servers so drift falls on both alike. At concurrency 1 no batch can form:
its ratio is this measurement's noise. Each image is also checked against the unbatched server's answer to
the same request.

    python scripts/batching_check.py CHECKPOINT ONNX_DIR [--size 64x64] [--steps 20] [--rounds 3]
"""
import argparse
import re
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from diffsr.app.serving.triton_client import TritonClient
from diffsr.app.serving.triton_server import Ports, TritonServer
from diffsr.calib.data import photo
from diffsr.export.model.checkpoint import open_checkpoint
from diffsr.runtime.image import decode_image, encode_png
from diffsr.triton_models.repository import ServingOptions, build_repository

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("onnx")
parser.add_argument("--size", default="64x64")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--levels", default="1,2,4,8")
parser.add_argument("--delay-us", type=int, default=0)
args = parser.parse_args()
ck, onnx = open_checkpoint(args.checkpoint), Path(args.onnx)
w, h = (int(v) for v in args.size.split("x"))
levels = [int(v) for v in args.levels.split(",")]
png = encode_png(photo("astronaut", (h, w)))
settings = {"off": ServingOptions(sampler_instances=8, step_batch=0),
            "on": ServingOptions(sampler_instances=8, step_batch=8, step_batch_delay_us=args.delay_us)}
results, images, calls = {}, {}, {}


STEP_MODEL = ck.model.stages.step[-1]  # the step stage's last (SD: ControlNet + UNet), the step's cost


def counts(srv, model=STEP_MODEL):
    """(requests, executions) of a model, from Triton's metrics: calls per execution is the batch formed."""
    text = urllib.request.urlopen(f"http://{srv.host}:{srv.ports.metrics}/metrics", timeout=10).read().decode()
    value = lambda name: float(re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M).group(1))  # noqa: E731
    return value("nv_inference_request_success"), value("nv_inference_exec_count")


def one(srv, label, seed):
    with TritonClient(srv.grpc_url, "grpc") as client:
        result = client.upscale(png, steps=args.steps, seed=seed)
    images.setdefault(seed, {})[label] = result.png
    return result.latency_s


with ExitStack() as stack:  # both servers up; an idle one takes no CPU, so rounds alternate (off, on, off, on...)
    servers = {}
    for label, options in settings.items():
        repo = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="diffsr-batching-"))) / "models"
        build_repository(ck, onnx, repo, options=options)
        servers[label] = stack.enter_context(TritonServer(repo, Ports.free()))
        one(servers[label], label, 0)  # warm
    before = {label: counts(srv) for label, srv in servers.items()}
    for n in levels:
        spent = {label: [0.0, []] for label in servers}
        for r in range(args.rounds):
            for label, srv in servers.items():
                start = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    spent[label][1] += pool.map(lambda seed: one(srv, label, seed), [100 * n + 10 * r + i for i in range(n)])
                spent[label][0] += time.perf_counter() - start
        for label, (seconds, latencies) in spent.items():
            results[label, n] = (len(latencies) / seconds, float(np.median(latencies)))
            print(f"step batching {label:>3}, concurrency {n}: {results[label, n][0]:.3f} images/s, "
                  f"median latency {results[label, n][1]:.2f} s", flush=True)
    for label, srv in servers.items():
        after = counts(srv)
        calls[label] = (after[0] - before[label][0]) / (after[1] - before[label][1])

diffs = [np.abs(decode_image(v["on"], "on").astype(int) - decode_image(v["off"], "off").astype(int)).max()
         for v in images.values()]
identical = sum(v["on"] == v["off"] for v in images.values())
print(f"\n{ck.model.preset} {w}x{h} -> {4 * w}x{4 * h}, {args.steps} steps, CFG; {args.rounds} rounds per level")
print("| concurrency | images/s off | images/s on | ratio | median latency off | on |")
print("| --- | --- | --- | --- | --- | --- |")
for n in levels:
    (t_off, l_off), (t_on, l_on) = results["off", n], results["on", n]
    print(f"| {n} | {t_off:.3f} | {t_on:.3f} | {t_on / t_off:.2f}x | {l_off:.2f} s | {l_on:.2f} s |")
print(f"{STEP_MODEL} calls per execution, all levels: off {calls['off']:.2f}, on {calls['on']:.2f}")
print(f"images identical with and without batching: {identical} of {len(images)}; largest pixel difference {max(diffs)}")
