"""The endpoint on a real photo at its own size (coffee, 600x400 -> 2400x1600) against the in-process
ONNX Runtime pipeline, the server's process-tree memory while it works, and a 5000x5000 request refused
as INVALID_ARGUMENT before the next request is served.

    python scripts/endpoint_check.py CHECKPOINT ONNX_DIR
"""
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import tritonclient.grpc as grpc
from skimage import data
from tritonclient.utils import InferenceServerException

from diffsr.app.serving.triton_client import TritonClient
from diffsr.app.serving.triton_server import Ports, TritonServer
from diffsr.export.model.checkpoint import open_checkpoint
from diffsr.export.model.settings import Request
from diffsr.runtime.image import decode_image, encode_png
from diffsr.runtime.loading import load_pipeline
from diffsr.triton_models.repository import build_repository

ck, onnx = open_checkpoint(sys.argv[1]), Path(sys.argv[2])
repo = Path(tempfile.mkdtemp(prefix="diffsr-endpoint-")) / "models"
build_repository(ck, onnx, repo)
coffee = np.asarray(data.coffee())
peak = 0
with TritonServer(repo, Ports.free()) as srv:
    proc = psutil.Process(srv.process.pid)
    def tree():
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    base = tree()
    stop = False
    def watch():
        global peak
        while not stop:
            peak = max(peak, tree()); time.sleep(0.2)
    th = threading.Thread(target=watch); th.start()
    with TritonClient(srv.http_url) as c:
        t = time.time(); remote = decode_image(c.upscale(encode_png(coffee)).png); served = time.time() - t
    stop = True; th.join()
    print(f"served {remote.shape} in {served:.1f} s; server tree RSS {base/2**30:.2f} GiB idle, peak {peak/2**30:.2f} GiB")
    big = encode_png(np.zeros((1250, 1250, 3), np.uint8))
    cl = grpc.InferenceServerClient(srv.grpc_url)
    inp = grpc.InferInput("image", [1], "BYTES"); inp.set_data_from_numpy(np.array([big], dtype=np.object_))
    try:
        cl.infer("diffsr", [inp]); print("5000x5000 ACCEPTED?!")
    except InferenceServerException as e:
        print("5000x5000:", e.status(), e.message()[:120])
    with TritonClient(srv.grpc_url, "grpc") as c:
        nxt = decode_image(c.upscale(encode_png(coffee[:128, :128]), steps=2).png)
    print("next request served:", nxt.shape)
shutil.rmtree(repo.parent)
local = load_pipeline("onnxruntime", ck, onnx_dir=onnx)
t = time.time(); direct = local(Request(coffee, ck.defaults)).image; print(f"in-process {time.time()-t:.1f} s")
print("max |endpoint - in-process| on uint8:", np.abs(remote.astype(int) - direct).max())
