"""FP32 ONNX + calibration feeds -> INT8 explicit-quantization ONNX (Q/DQ) for TensorRT's strongly typed networks.

    select_layers   which Conv / MatMul nodes get INT8, and each one kept in higher precision with why
    int8_from_fp32  onnxruntime.quantization's `quantize_static` inserts the Q/DQ pairs and calibrates the
                    activations (percentile or entropy, over every recorded feed); the graph is then
                    raised to opset 19 (FP16 scales) and converted to FP16 elsewhere, the FP16 check's
                    layers kept FP32: the INT8 file is the FP16 file with INT8 convolutions and projections
    check_qdq       every Q/DQ pair symmetric (zero point 0, INT8), weights per output channel, no float
                    bias quantized: what TensorRT's explicit quantization takes

The quantization follows the field's recipe for diffusion UNets (NVIDIA ModelOpt's, TensorRT's demo):
symmetric INT8, weights per channel on the output-channel axis, activations per tensor, float bias, no
quantization of an INT8 layer's output; kept in higher precision: what the family names (`int8_kept`: for
SD the timestep and text embedding paths, the first and last convolutions, shortcut convolutions, the
ControlNet's conditioning and zero convolutions), attention's own matmuls and softmax, normalisations
(which are never quantized here: only Conv and MatMul with a weight are).
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.logs import quiet
from diffsr.export.graphs.to_fp16 import fp16_from_fp32

QUANTIZED_OPS = ("Conv", "MatMul")
QDQ_OPSET = 19  # QuantizeLinear / DequantizeLinear take FP16 scales from opset 19 (TensorRT 10 reads up to 20)
METHODS = ("percentile", "entropy")


def _kept_pattern(kept: Mapping[str, str]) -> re.Pattern[str] | None:
    """Weight names (module paths, as the exporter keeps them) holding one of `kept`'s parts."""
    return re.compile(r"(?:^|\.)(" + "|".join(map(re.escape, kept)) + r")(?:\.|$)") if kept else None


@dataclass(frozen=True)
class Int8Settings:
    """How activations are calibrated: `method` over the histogram of |x| merged across every feed (all
    timesteps); `percentile` of it for the percentile method."""

    method: str = "percentile"
    percentile: float = 99.999

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DiffsrError(f"calibration method {self.method!r} is not one of {list(METHODS)}")
        if not 90.0 <= self.percentile <= 100.0:
            raise DiffsrError(f"calibration percentile {self.percentile} is outside 90 to 100")


@dataclass(frozen=True)
class ExcludedLayer:
    """A Conv or MatMul left out of INT8, and why."""

    node: str
    op_type: str
    reason: str


def select_layers(onnx_path: Path, kept_modules: Mapping[str, str]) -> tuple[list[str], list[ExcludedLayer]]:
    """(nodes to quantize, Conv/MatMul nodes kept in higher precision with why). A layer is quantized when
    it multiplies an activation by a stored weight, is not on a path the family keeps (`kept_modules`: a
    part of the weight's name -> why), and does not read a
    graph input directly (the text embeddings, the latents: the network's inputs stay as given)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    inputs = {t.name for t in graph.input}
    quantize, excluded = [], []
    pattern = _kept_pattern(kept_modules)
    for node in graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        weight = node.input[1] if len(node.input) > 1 else ""
        kept = pattern.search(weight) if pattern is not None else None
        if weight not in weights:
            reason = "attention's matmul of two activations"
        elif kept:
            reason = kept_modules[kept.group(1)]
        elif node.input[0] in inputs:
            reason = f"reads the graph input {node.input[0]!r} directly"
        else:
            quantize.append(node.name)
            continue
        excluded.append(ExcludedLayer(node.name, node.op_type, reason))
    return quantize, excluded


class _Feeds:
    """onnxruntime.quantization's calibration reader over recorded feeds, read in strides (its calibrator
    holds every activation of a stride at once; histograms are merged across strides)."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]):
        self.feeds, self.start, self.end = feeds, 0, len(feeds)

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, end_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= self.end:
            return None
        self.start += 1
        return self.feeds[self.start - 1]


def int8_from_fp32(
    src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], keep_fp32: set[str], settings: Int8Settings,
    kept_modules: Mapping[str, str],
) -> tuple[list[str], list[ExcludedLayer]]:
    """Write the INT8 graph of `src` (FP32) to `dst`: Q/DQ on the selected layers, calibrated on `feeds`,
    FP16 elsewhere but for `keep_fp32` (the FP16 check's layers). Returns (quantized, excluded)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise DiffsrError(f"{src.name}: no calibration feeds recorded")
    quantize, excluded = select_layers(src, kept_modules)
    # a layer the FP16 check keeps FP32 stays out: a cast between its DQ and it would stop TensorRT's fusion
    excluded += [ExcludedLayer(n, "", "kept FP32 by the FP16 check") for n in quantize if n in keep_fp32]
    quantize = [n for n in quantize if n not in keep_fp32]
    if not quantize:
        raise DiffsrError(f"{src.name}: no Conv or MatMul layer to quantize")
    large = src.with_name(src.name + ".data").is_file()
    stride = max(d for d in range(1, 5) if len(feeds) % d == 0)
    method = CalibrationMethod.Percentile if settings.method == "percentile" else CalibrationMethod.Entropy
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".int8-") as tmp:
        qdq = Path(tmp) / "qdq.onnx"
        # the quantizer prints its progress on stdout and advice on the root logger (pre-processing, which
        # is for CNN classifiers' shape inference); the CLI's output stays its own
        with contextlib.redirect_stdout(io.StringIO()), quiet(""):
            quantize_static(
                str(src), str(qdq), _Feeds(feeds), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                calibrate_method=method, nodes_to_quantize=quantize, op_types_to_quantize=list(QUANTIZED_OPS),
                use_external_data_format=large,
                extra_options={
                    "ActivationSymmetric": True, "WeightSymmetric": True, "CalibTensorRangeSymmetric": True,
                    "QuantizeBias": False,  # TensorRT takes a float bias and fuses it
                    "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                    "DedicatedQDQPair": False, "CalibPercentile": settings.percentile,
                    "CalibStridedMinMax": stride,
                },
            )
        _raise_opset(qdq, QDQ_OPSET, large)
        fp16_from_fp32(qdq, dst, keep_fp32, external_data=large)
    check_qdq(dst)
    return quantize, excluded


def _raise_opset(path: Path, version: int, large: bool) -> None:
    """Declare the default domain at `version`: from 18 to 19 the ops this exporter writes only gained
    types (FP16 scales for Q/DQ among them) and attributes whose defaults keep opset 18's behaviour."""
    model = onnx.load(str(path), load_external_data=False)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < version:
            opset.version = version
    onnx.save(model, str(path))  # external data stays where it is


@dataclass(frozen=True)
class QdqSummary:
    quantize_nodes: int
    weight_tensors: int  # per-channel INT8 weights


def check_qdq(path: Path) -> QdqSummary:
    """Refuse what TensorRT's explicit quantization does not take: a Q/DQ zero point that is not an INT8
    zero, a weight quantized per tensor or on another axis than its output channels (Conv: 0; MatMul's
    [in, out] weight: 1)."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    q_nodes = weights = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        q_nodes += node.op_type == "QuantizeLinear"
        if len(node.input) < 3 or node.input[2] not in inits:
            raise DiffsrError(f"{path.name}: {node.name} has no stored zero point")
        zero = inits[node.input[2]]
        if zero.data_type != TensorProto.INT8 or np.any(_array(zero, path) != 0):
            raise DiffsrError(f"{path.name}: {node.name} is not symmetric INT8 (zero point must be an INT8 0)")
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights += 1
            weight, scale = inits[node.input[0]], inits[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            op = next((u.op_type for u in users.get(node.output[0], [])), "?")
            want = {"Conv": 0, "MatMul": 1}.get(op)
            if want is None or len(scale.dims) != 1 or axis != want or scale.dims[0] != weight.dims[axis]:
                raise DiffsrError(f"{path.name}: weight {node.input[0]} of a {op} is not quantized per output channel "
                                  f"(scale {list(scale.dims)}, axis {axis})")
    return QdqSummary(q_nodes, weights)


def _array(tensor: TensorProto, path: Path) -> Any:
    return numpy_helper.to_array(tensor, base_dir=str(path.parent))
