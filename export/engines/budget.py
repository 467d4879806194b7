"""Device memory of the TensorRT engines at a target's largest shapes, before building them.

Per engine: its weights (FP16; INT8 where `diffsr quantize` would quantize: the same layer selection),
and its activation scratch: the FP32 graph's shapes inferred at the profile's largest input (ONNX Runtime's
symbolic shape inference), walked in
node order with every tensor freed after its last reader, each float element at FP16's two bytes; the
peak of that walk, attention's score matrices left out (TensorRT runs attention fused: `attention_scores`).
TensorRT fuses more layers and plans memory itself, so its scratch (recorded per plan by `build-engines`,
`device_memory_bytes`) is usually below this: the walk is the bound to plan a device by.

The pipeline holds every engine's weights and one scratch allocation, shared by the engines (they run
one after another: the TensorRT runner's `SharedScratch`), so a device needs the sum of the weights,
the largest scratch, and what the runtime itself takes (RUNTIME_RESERVE: the CUDA context, TensorRT and
its libraries, the Python process, the OS on a Jetson's shared memory: an assumption, not a measurement).
No weights are read: graphs are loaded without their external data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
from onnx import external_data_helper

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import manifest_model, read_manifest, verified_files
from diffsr.export.graphs.to_int8 import select_layers
from diffsr.export.model.dims import target

GIB = 1 << 30
RUNTIME_RESERVE = 2 * GIB  # assumed: CUDA context + TensorRT + Python process + OS share of a Jetson's memory
ORIN_MODULES_GIB = (8, 16, 32, 64)  # Jetson Orin Nano 8 GB, Orin NX 16 GB, AGX Orin 32 GB and 64 GB
SMALL_CONSTANT = 4096  # elements: initializers up to this size are read (shape inference needs their values)
ITEM_BYTES = {onnx.TensorProto.FLOAT: 2, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.INT64: 8,
              onnx.TensorProto.INT32: 4, onnx.TensorProto.BOOL: 1, onnx.TensorProto.INT8: 1}


@dataclass(frozen=True)
class EngineBudget:
    submodule: str
    shapes: dict[str, tuple[int, ...]]  # the profile's largest inputs
    weights_fp16: int  # bytes
    weights_int8: int  # bytes, the quantizable layers at one byte (plus their FP16 per-channel scales)
    activations: int  # bytes: peak of live FP16 activations at `shapes`
    quantized: bool = False  # whether the INT8 deployment quantizes it (else it serves FP16 there too)
    droppable: str = ""  # what stands in for its outputs where a deployment leaves it out (the family's `droppable`)

    def weights(self, precision: Precision) -> int:
        return self.weights_int8 if precision is Precision.INT8 and self.quantized else self.weights_fp16


def engine_budget(onnx_path: Path, name: str, shapes: dict[str, tuple[int, ...]],
                  kept_modules: Mapping[str, str]) -> EngineBudget:
    """`kept_modules`: what INT8 leaves out (the family's `int8_kept`)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    fp16 = int8 = 0
    quantized = set(select_layers(onnx_path, kept_modules)[0])
    int8_weights = {n.input[1]: n.op_type for n in graph.node if n.name in quantized}
    for init in graph.initializer:
        count = math.prod(init.dims)
        size = ITEM_BYTES.get(init.data_type, 4) * count
        fp16 += size
        if init.name in int8_weights:  # one byte a weight, an FP16 scale per output channel
            channels = init.dims[0 if int8_weights[init.name] == "Conv" else 1]
            int8 += count + 2 * channels
        else:
            int8 += size
    return EngineBudget(name, shapes, fp16, int8, _peak_activations(model, shapes, onnx_path))


def _peak_activations(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], onnx_path: Path) -> int:
    graph, what = model.graph, onnx_path.name
    inputs = [v.name for v in graph.input]
    # shape inference reads small constants (shapes, axes); a weight in the external data file becomes a
    # graph input of its shape, so that nothing reads gigabytes of values no shape depends on
    weights = []
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        if math.prod(init.dims) <= SMALL_CONSTANT:
            external_data_helper.load_external_data_for_tensor(init, str(onnx_path.parent))
            init.data_location = onnx.TensorProto.DEFAULT
            del init.external_data[:]
        else:
            weights.append(init)
    for init in weights:
        graph.initializer.remove(init)
        graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for value in graph.input:
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        for d, n in zip(dims, shapes[value.name]):
            d.Clear()
            d.dim_value = n
    del graph.value_info[:]
    # ONNX Runtime's symbolic shape inference folds the exporter's Shape -> Gather -> Concat chains at
    # concrete input sizes, where onnx's own inference leaves Expand and Reshape outputs unknown
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True).graph
    sizes: dict[str, int] = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if t.HasField("shape") and all(d >= 0 for d in dims):
            sizes[value.name] = ITEM_BYTES.get(t.elem_type, 4) * math.prod(dims)
    unknown = [o for n in graph.node for o in n.output if o and o not in sizes]
    if unknown:
        raise DiffsrError(f"{what}: shape inference left {len(unknown)} tensors without a size (first {unknown[0]!r})")
    for name in attention_scores(graph):
        sizes[name] = 0
    weight_names = {w.name for w in weights}
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    outputs = {o.name for o in graph.output}
    live = sum(sizes.get(name, 0) for name in inputs)
    peak = live
    for i, node in enumerate(graph.node):
        live += sum(sizes[o] for o in node.output if o)
        peak = max(peak, live)
        for name in set(node.input):
            if name in sizes and last_use.get(name) == i and name not in outputs:
                live -= sizes[name] if name not in weight_names else 0
    return peak


def attention_scores(graph: onnx.GraphProto) -> set[str]:
    """The tensors of each attention's score matrix: from the MatMul of two activations (Q K^T) through
    scaling to the Softmax's output. TensorRT runs attention fused (flash-style, on Ampere and Orin
    GPUs in FP16): the matrix (tokens^2 per head: 340 MB at 96 x 96 latent cells) never exists."""
    producer = {o: n for n in graph.node for o in n.output}
    weights = {t.name for t in graph.initializer}
    scores: set[str] = set()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        chain, current = [node.output[0]], node.input[0]
        while current in producer and producer[current].op_type in ("Mul", "Div", "Add", "Cast", "Where"):
            chain.append(current)
            current = producer[current].input[0]
        source = producer.get(current)
        if source is not None and source.op_type == "MatMul" and not set(source.input) & weights:
            scores.update([*chain, current])
    return scores


def budget(onnx_dir: Path, target_name: str = "edge", max_batch: int | None = None, static: bool = False,
           ) -> list[EngineBudget]:
    """Every submodule's engine budget at `target_name`'s largest shapes, from the FP32 graphs of `onnx_dir`;
    INT8 for the submodules `diffsr quantize` quantized there (by default: those it quantizes by default)."""
    deployment = target(target_name).resized(max_batch, static)
    manifest = read_manifest(onnx_dir)
    model = manifest_model(manifest)
    paths = verified_files(onnx_dir, None, Precision.FP32)
    quantized = (manifest.get("int8_calibration") or {}).get("submodules", model.int8_default)
    ranges = deployment.dim_ranges(model.dims())
    return [replace(engine_budget(paths[name], name, {k: r.max for k, r in sig.shape_ranges(ranges).items()},
                                  model.int8_kept), quantized=name in quantized, droppable=model.stand_in(name))
            for name, sig in model.signatures().items()]


def device_total(engines: list[EngineBudget], precision: Precision, dropped: bool = False) -> int:
    """What the pipeline's engines need on the device: all weights, the largest scratch, the runtime;
    `dropped`: without the engines a deployment may leave out (dit4sr's T5, a captioner)."""
    kept = [e for e in engines if not (dropped and e.droppable)]
    weights = sum(e.weights(precision) for e in kept)
    return weights + max(e.activations for e in kept) + RUNTIME_RESERVE
