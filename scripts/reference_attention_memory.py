"""refsr's `reference_attention` graph on ONNX Runtime (CPU): one call at a latent tile with R references, its time and
the process's peak memory (where attention is not fused, the scores it holds; docs/refsr.md).

    diffsr init --preset refsr --out ck && diffsr export --checkpoint ck --out onnx --no-ort-fusions
    python scripts/reference_attention_memory.py onnx/reference_attention.onnx --references 10 --latent 128
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graph")
    parser.add_argument("--references", type=int, default=10)
    parser.add_argument("--latent", type=int, default=128, help="the tile's side in latent cells")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.graph, options, providers=["CPUExecutionProvider"])
    z_lq, kv = (i.shape for i in session.get_inputs())
    rng = np.random.default_rng(0)
    feed = {"z_lq": rng.standard_normal((1, z_lq[1], args.latent, args.latent)).astype(np.float32),
            "reference_kv": rng.standard_normal((args.references, kv[1])).astype(np.float32)}
    start = time.perf_counter()
    (out,) = session.run(["reference_residuals"], feed)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{args.references} references at a {args.latent}-cell tile: {time.perf_counter() - start:.1f} s, "
          f"output {tuple(out.shape)}, peak memory {peak_gib:.2f} GiB")


if __name__ == "__main__":
    main()
