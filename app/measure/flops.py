"""FLOPs of an ONNX graph at given sizes: 2 x multiply-accumulates of its Conv, MatMul and Gemm
nodes, from onnxruntime's symbolic shape inference with the inputs fixed to those sizes (ONNX's
own inference loses the sizes through the attention reshapes).
Element-wise ops, norms and softmax are left out: they are bandwidth, not FLOP, bound."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import onnx

from diffsr.export.model.signatures import Signature


def graph_flops(path: Path, sig: Signature, dims: Mapping[str, int]) -> int:
    path = Path(path).resolve()
    model = onnx.load(str(path), load_external_data=False)
    shapes = sig.input_shapes(dims)
    for value in model.graph.input:
        for d, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            d.Clear()
            d.dim_value = size
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    del model.graph.value_info[:]
    cwd = os.getcwd()
    os.chdir(path.parent)  # it reads small constants (reshape targets) from external data, relative to cwd
    try:
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    finally:
        os.chdir(cwd)
    known = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]  # 0 where still unknown
             for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    known |= {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        out = known.get(node.output[0]) if node.output else None
        if not out or 0 in out:
            continue
        if node.op_type == "Conv":
            weight = known.get(node.input[1])
            if weight:  # (C_out, C_in / groups, k...): MACs per output element = C_in / groups * prod(k)
                total += 2 * math.prod(out) * math.prod(weight[1:])
        elif node.op_type in ("MatMul", "Gemm"):
            a = known.get(node.input[0])
            if a:
                transposed = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
                total += 2 * math.prod(out) * (a[-2] if transposed else a[-1])
    return total
