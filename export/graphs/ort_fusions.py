"""FP32 ONNX -> the same graph with ONNX Runtime's fused kernels, for the portable (onnxruntime) flavour.

onnxscript's ORT fusions understand the dynamo exporter's graphs: every attention block becomes one
`com.microsoft.MultiHeadAttention` (its attention matrix is never materialised: ONNX Runtime runs it
in tiles), LayerNorm after a residual add a `SkipLayerNormalization`, erf-GELU a `Gelu`. These are
ONNX Runtime contrib ops: the file is for ONNX Runtime only. TensorRT's graphs (`.fp16.onnx`) are made
from the plain FP32 graph and never contain them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx_ir as ir

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.logs import quiet

ORT_SUFFIX = ".ort.onnx"


def fused_filename(submodule: str) -> str:
    return submodule + ORT_SUFFIX


def fuse_for_onnxruntime(src: Path, dst: Path) -> dict[str, int]:
    """Write `src` with ONNX Runtime's fusions to `dst` (external data where `src` has it); returns how
    many nodes of each contrib op the graph now holds."""
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))
    try:
        with quiet("onnxscript"):  # the rewriter logs every pattern it tries and rejects
            optimize_for_ort(model)
    except Exception as e:  # the rewriter raises many types; its message is what helps
        raise DiffsrError(f"ONNX Runtime fusions of {src.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    for stale in (dst, dst.with_name(dst.name + ".data")):
        stale.unlink(missing_ok=True)
    large = src.with_name(src.name + ".data").is_file()
    ir.save(model, str(dst), external_data=dst.name + ".data" if large else None)
    counts = Counter(node.op_type for node in model.graph.all_nodes() if node.domain == "com.microsoft")
    return dict(sorted(counts.items()))
