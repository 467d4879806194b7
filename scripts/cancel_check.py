"""Cancellation and the entry point's cost, both entry points in one run: for each (BLS entry, ensemble),
a 20-step request on an idle server; four 200-step requests cancelled by their gRPC clients 3 s in; then
the next 20-step request. The BLS entry frees its instances within a step; the ensemble runs the
cancelled loops to their end.

    python scripts/cancel_check.py CHECKPOINT ONNX_DIR
"""
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import tritonclient.grpc as grpc

from diffsr.app.serving.triton_client import request_inputs
from diffsr.app.serving.triton_server import Ports, TritonServer
from diffsr.calib.data import photo
from diffsr.export.model.checkpoint import open_checkpoint
from diffsr.runtime.image import encode_png
from diffsr.triton_models.repository import ServingOptions, build_repository

ck, onnx = open_checkpoint(sys.argv[1]), Path(sys.argv[2])
png = encode_png(photo("astronaut", (64, 64)))


def inputs(steps):
    return request_inputs("grpc", png, steps=steps)


def timed(client, steps):
    start = time.perf_counter()
    client.infer("diffsr", inputs(steps))
    return time.perf_counter() - start


for entry in ("bls", "ensemble"):
    repo = Path(tempfile.mkdtemp(prefix="diffsr-cancel-")) / "models"
    build_repository(ck, onnx, repo, options=ServingOptions(sampler_instances=4, entry=entry))
    with TritonServer(repo, Ports.free()) as srv:
        client = grpc.InferenceServerClient(srv.grpc_url)
        timed(client, 2)  # warm
        idle = sorted(timed(client, 20) for _ in range(3))[1]
        done, statuses = threading.Semaphore(0), []
        def finished(result, error):  # tritonclient passes both by keyword
            statuses.append(error.status() if error else "OK")
            done.release()

        calls = [client.async_infer("diffsr", inputs(200), finished) for _ in range(4)]
        time.sleep(3.0)
        for call in calls:
            call.cancel()
        for _ in calls:
            done.acquire()
        after = timed(client, 20)
        client.close()
        print(f"{entry:>8}: 20 steps idle {idle:.2f} s (median of 3); 4 x 200 steps cancelled at 3 s -> {statuses}; "
              f"next 20-step request {after:.2f} s")
    shutil.rmtree(repo.parent)
