"""Checkpoint submodule -> checked ONNX file: small steps named for what they turn into what.

    onnx_from_checkpoint  the submodule built with fake tensors (no weights in memory) -> torch.export
                          (dynamo) with the signature's dynamic dims -> `tidy` (folding, dead code) -> each
                          parameter bound to its stored tensor, read when written -> model.onnx
    name_dims             the signature's dim names on the graph's inputs and outputs
    infer_and_check       shape inference and `onnx.checker` full check (path based: > 2 GB works)
    lint_for_tensorrt     every op and dtype against TensorRT's ONNX parser support matrix

Tracing never holds the weights: the network is built under a FakeTensorMode, and each stored
tensor is read (FP16 on disk -> FP32), written and released in turn as the file is saved. SDXL's
ControlNet + UNet (15 GB in FP32) exports in a few GB of memory. Graphs past 2 GB are written with
external data (`<file>.data`).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer
import torch
from safetensors import safe_open
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.logs import quiet
from diffsr.export.model.checkpoint import Checkpoint, build, stored_weights, weight_source
from diffsr.export.model.dims import trace_sizes
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.samples import sample_inputs
from diffsr.export.model.signatures import Signature, parse_dim
from diffsr.export.model.weights import StoredWeights

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # the dynamo exporter's floor; TensorRT 10's parser reads opsets 9 to 20
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB; keep a margin for the graph itself
TENSORRT_OPS = Path(__file__).with_name("data") / "tensorrt_onnx_ops.json"
ONNX_TYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16", onnx.TensorProto.BFLOAT16: "BF16",
              onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
              onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.INT8: "INT8", onnx.TensorProto.DOUBLE: "DOUBLE"}


def torch_dynamic_shapes(model: ModelFamily, sig: Signature) -> dict[str, dict[int, Any]]:
    """The signature's named dims as torch.export Dims, from each dim's least size (a length's `least`: SegFormer's
    sides, whose spatial reductions need a few cells) to its declared bound; a side as a multiple of its cells
    (`NamedDim.multiple`)."""
    base = {}
    for d in model.dims():
        dim = Dim(d.name if d.multiple == 1 else f"{d.name}_units", min=d.least, max=d.bound)
        base[d.name] = dim if d.multiple == 1 else d.multiple * dim
    shapes: dict[str, dict[int, Any]] = {}
    for spec in sig.inputs:
        axes = {}
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, str):
                factor, name = parse_dim(dim)
                axes[axis] = base[name] if factor == 1 else factor * base[name]
        shapes[spec.name] = axes
    return shapes


def onnx_from_checkpoint(ckpt: Checkpoint, name: str, path: Path, opset: int = DEFAULT_OPSET) -> Path:
    sig = ckpt.model.signature(name)
    real_feed = sample_inputs(ckpt.model, name, trace_sizes(ckpt.model.dims()))
    fake = FakeTensorMode()
    try:
        with fake, warnings.catch_warnings(), quiet("torch.onnx"):  # its "torchvision is not installed" notes
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")  # benign dim-rename notes
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's own deprecations
            module = build(ckpt, name)
            parameters = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            feed = tuple(fake.from_tensor(t) for t in real_feed.values())
            program = torch.onnx.export(
                module, feed, dynamo=True, opset_version=opset,
                input_names=[t.name for t in sig.inputs], output_names=[t.name for t in sig.outputs],
                dynamic_shapes=torch_dynamic_shapes(ckpt.model, sig), optimize=False, verbose=False,
            )
    except DiffsrError:
        raise
    except Exception as e:  # the exporter raises many types; its message is what helps
        raise DiffsrError(f"ONNX export of {name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    model = program.model
    for init in model.graph.initializers.values():  # fake values must not reach the optimiser
        if init.name in parameters:
            init.const_value = None
        elif init.const_value is not None and "Fake" in type(getattr(init.const_value, "raw", None)).__name__:
            raise DiffsrError(f"ONNX export of {name}: {init.name!r} is neither a stored parameter nor a constant")
    tidy(model)
    # torch.export's value ranges are a dict printed in an order that depends on what the process traced
    # before: without it, the same checkpoint exports to the same bytes in any process
    model.graph.metadata_props.pop("pkg.torch.export.ExportedProgram.range_constraints", None)
    n_bytes = bind_weights(model, ckpt, name, parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    large = n_bytes > EXTERNAL_DATA_BYTES
    ir.save(model, str(path), external_data=path.name + ".data" if large else None)
    name_dims(path, sig)
    return path


def tidy(model: ir.Model) -> None:
    """onnxscript's optimiser without its pattern rewriter: inlining, constant folding, dead code, lifted
    constants, common subexpressions. The rewriter's matching grows faster than the graph (sdxl-tiny's
    ControlNet + UNet: 10.6 s with it, 1.6 s without, for 3.5 % fewer nodes; SDXL's did not finish in
    15 minutes), and TensorRT and ONNX Runtime fuse the same patterns themselves. Parameters (no value
    yet) are left alone, which the initializer deduplication notes once per parameter: quietened."""
    with quiet("onnx_ir.passes.common.initializer_deduplication"):
        _tidy(model)


def _tidy(model: ir.Model) -> None:
    common.InlinePass()(model)
    for _ in range(2):  # folding exposes dead code, whose removal can expose more folding
        onnxscript.optimizer.fold_constants(model)
        common.RemoveUnusedNodesPass()(model)
    ir.passes.Sequential(
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def bind_weights(model: ir.Model, ckpt: Checkpoint, name: str, parameters: dict[str, tuple[int, ...]]) -> int:
    """Bind every parameter initializer to its stored tensor, read (as FP32) only when the file is written;
    returns their bytes. A tensor the checkpoint lacks, or of another shape, is an error naming it.

    A parameter read only through a Transpose (every linear layer's weight, as the exporter writes it) is
    stored transposed and the Transpose removed: the folding a traced-with-weights export would have done,
    and without it ONNX Runtime and TensorRT fold it themselves when loading, holding both copies (SDXL's
    ControlNet + UNet: 24 GB instead of 15)."""
    permutations = _fold_weight_transposes(model, parameters)
    stores: dict[str, StoredWeights] = {}
    total = 0
    for init in model.graph.initializers.values():
        if init.const_value is not None:
            continue
        if init.name not in parameters:
            raise DiffsrError(f"ONNX export of {name}: initializer {init.name!r} has no value")
        folder, key = weight_source(ckpt.model, name, init.name)
        if folder not in stores:  # headers read once a folder
            stores[folder] = stored_weights(ckpt, folder)
        weights = stores[folder]
        stored = weights.shapes.get(key)
        if stored != parameters[init.name]:
            raise DiffsrError(f"weights in {weights} do not match its config.json: {key} is {stored}, "
                              f"expected {parameters[init.name]}")
        perm = permutations.get(init.name)
        shape = stored if perm is None else tuple(stored[i] for i in perm)
        init.const_value = ir.LazyTensor(_reader(*weights.locate(key), perm), dtype=ir.DataType.FLOAT,
                                         shape=ir.Shape(shape), name=init.name)
        init.shape = ir.Shape(shape)
        total += 4 * math.prod(stored)
    return total


def _fold_weight_transposes(model: ir.Model, parameters: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Remove each Transpose whose input is a parameter read by nothing else; returns parameter -> perm."""
    folded = {}
    for node in list(model.graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or source.name not in parameters or source.const_value is not None or len(source.uses()) != 1:
            continue
        rank = len(parameters[source.name])
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(rank)))
        node.outputs[0].replace_all_uses_with(source)
        model.graph.remove(node, safe=True)
        folded[source.name] = perm
    return folded


def _reader(file: Path, key: str, perm: tuple[int, ...] | None) -> Any:
    def read() -> ir.Tensor:
        with safe_open(str(file), "pt") as f:
            tensor = f.get_tensor(key).float()
        return ir.Tensor((tensor if perm is None else tensor.permute(perm)).contiguous().numpy())

    return read


def name_dims(path: Path, sig: Signature) -> None:
    """Write the signature's dims ("batch", "8*latent_height", ...) onto the graph's inputs and outputs."""
    model = onnx.load(str(path), load_external_data=False)
    specs = {t.name: t for t in sig.inputs + sig.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in specs:
            raise DiffsrError(f"{path.name}: graph value {value.name!r} is not in the {sig.name} signature")
        for d, dim in zip(value.type.tensor_type.shape.dim, specs[value.name].shape):
            if isinstance(dim, str):
                d.dim_param = dim
            else:
                d.dim_value = dim
    onnx.save(model, str(path))  # initializers stay in the external data file, untouched


def infer_and_check(path: Path) -> None:
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True)
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise DiffsrError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from None


@cache
def tensorrt_support() -> dict[str, Any]:
    return json.loads(TENSORRT_OPS.read_text(encoding="utf-8"))


def lint_for_tensorrt(path: Path) -> None:
    """Refuse ops TensorRT's ONNX parser lacks, or dtypes it does not take for them, naming the node."""
    data = tensorrt_support()
    model = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not data["opset_min"] <= opset <= data["opset_max"]:
        raise DiffsrError(f"{path.name}: opset {opset} is outside TensorRT's {data['opset_min']}..{data['opset_max']}")
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        support = data["operators"].get(node.op_type)
        if node.domain not in ("", "ai.onnx") or support is None or not support["supported"]:
            raise DiffsrError(f"{path.name}: node {node.name!r} is a {node.domain or 'ai.onnx'}::{node.op_type}, "
                              f"which TensorRT's ONNX parser does not support")
        dtype = ONNX_TYPES.get(types.get(node.input[0], 0)) if node.input else None
        if dtype is not None and support["types"] and dtype not in support["types"]:
            raise DiffsrError(f"{path.name}: node {node.name!r} ({node.op_type}) takes {dtype}; "
                              f"TensorRT's parser takes {support['types']} for it")
