"""FP32 ONNX -> FP16 ONNX whose chosen layers stay FP32 inside the graph (strongly typed).

Weights and activations become FP16; graph inputs and outputs keep the signature's FP32 through
casts at the edges; every node named in `keep_fp32` computes in FP32 with casts around it. This is
the only FP16 form TensorRT 11 builds (precision follows the ONNX types), and 10.x builds it too.

Written here rather than taken from onnxruntime's float16 converter: on the dynamo exporter's
graphs that one leaves dangling casts on initializers feeding `Where` (the checker rejects them).
The graph is read without its external data; weights are then read, converted and written one at a
time, so converting SDXL's 15 GB ControlNet + UNet holds one tensor, not the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from diffsr.export.core.errors import DiffsrError

F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = 65504.0


@dataclass(frozen=True)
class KeptLayer:
    """A node to keep in FP32, and why (what the FP16 check saw)."""

    node: str
    op_type: str
    max_abs: float
    reason: str

FLOAT_ONLY_INPUTS = {"Resize": {1, 2}}  # roi and scales are tensor(float) whatever the data type


def fp16_from_fp32(src: Path, dst: Path, keep_fp32: set[str], external_data: bool) -> Path:
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise DiffsrError(f"{src.name}: graphs with subgraphs (If, Loop) are not supported by the FP16 conversion")
    names = {n.name for n in graph.node}
    unknown = sorted(set(keep_fp32) - names)
    if unknown:
        raise DiffsrError(f"{src.name}: nodes to keep in FP32 not in the graph: {unknown[:3]}")
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types |= {t.name: t.data_type for t in graph.initializer}
    is_float = {name for name, t in types.items() if t == F32}
    kept = [n.name in keep_fp32 for n in graph.node]
    consumers: dict[str, list[bool]] = {}
    for node, k in zip(graph.node, kept):
        for i, name in enumerate(node.input):
            float_only = i in FLOAT_ONLY_INPUTS.get(node.op_type, ())
            consumers.setdefault(name, []).append(k or float_only)

    # 1. The precision every float value will have: FP32 for graph inputs, for initializers only
    #    FP32 consumers read, and for kept nodes' outputs; FP16 for everything else.
    precision = {x.name: F32 for x in graph.input if x.name in is_float}
    for init in graph.initializer:
        if init.name in is_float:
            precision[init.name] = F32 if all(consumers.get(init.name, [True])) else F16
    for node, k in zip(graph.node, kept):
        for out in node.output:
            if out in is_float:
                precision[out] = F32 if k else F16

    # 2. Graph outputs produced in FP16 get a final cast back to the signature's FP32.
    tail = []
    for out in graph.output:
        if precision.get(out.name) == F16:
            inner = f"{out.name}__fp16"
            for node in graph.node:
                node.output[:] = [inner if o == out.name else o for o in node.output]
                node.input[:] = [inner if i == out.name else i for i in node.input]
            precision[inner] = F16
            tail.append(helper.make_node("Cast", [inner], [out.name], to=F32, name=f"{out.name}__to_fp32"))

    # 3. Walk the nodes: retype the FP16 ones, cast every float input that arrives in the wrong precision.
    nodes, casts = [], {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__{'fp32' if to == F32 else 'fp16'}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{casts[key]}__cast"))
        return casts[key]

    for node, k in zip(graph.node, kept):
        want_node = F32 if k else F16
        for i, name in enumerate(node.input):
            if name in precision:
                want = F32 if i in FLOAT_ONLY_INPUTS.get(node.op_type, ()) else want_node
                if precision[name] != want:
                    node.input[i] = cast(name, want)
        if not k:
            _retype_node(node)
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes + tail)
    del graph.value_info[:]  # re-inferred by the checker step

    # 4. The weights, one at a time: FP16 where read by FP16 nodes, into the new file or its data file.
    with _tensor_store(dst, external_data) as store:
        for init in graph.initializer:
            to_half = precision.get(init.name) == F16
            if to_half or init.data_location == TensorProto.EXTERNAL:
                array = numpy_helper.to_array(init, base_dir=str(src.parent))
                store(init, np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16) if to_half else array)
    dst.unlink(missing_ok=True)  # a new file, never rewritten in place: it may be a hard link (`linked_copy`)
    onnx.save(model, str(dst))
    return dst


@contextmanager
def _tensor_store(dst: Path, external: bool) -> Iterator[Callable[[TensorProto, np.ndarray], None]]:
    """store(initializer, array): the array becomes the initializer's data, inline or appended to
    `<dst>.data` (external data, as ONNX locates it: relative to the model file)."""
    dst.with_name(dst.name + ".data").unlink(missing_ok=True)  # a data file of an earlier conversion
    if not external:
        yield lambda init, array: init.CopyFrom(numpy_helper.from_array(array, init.name))
        return
    location = dst.name + ".data"
    with open(dst.with_name(location), "wb") as data:

        def store(init: TensorProto, array: np.ndarray) -> None:
            tensor = numpy_helper.from_array(array, init.name)
            raw = tensor.raw_data
            external_data_helper.set_external_data(tensor, location, offset=data.tell(), length=len(raw))
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            data.write(raw)
            init.CopyFrom(tensor)

        yield store


def _retype_node(node: onnx.NodeProto) -> None:
    """Make a node that produced FP32 produce FP16: casts, constants, constant fills."""
    if node.op_type == "Constant" and any(a.name in ("value_float", "value_floats") for a in node.attribute):
        (attr,) = node.attribute
        value = np.asarray(attr.f if attr.name == "value_float" else list(attr.floats), dtype=np.float16)
        node.ClearField("attribute")
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
        return
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == F32:
            attr.i = F16
        elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == F32 and node.op_type in ("Constant", "ConstantOfShape"):
            array = np.clip(numpy_helper.to_array(attr.t), -FP16_MAX, FP16_MAX).astype(np.float16)
            attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))
