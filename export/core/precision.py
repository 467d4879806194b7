"""Numeric precision of an exported graph or engine: one enum."""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"  # FP16 weights and activations; the layers the FP16 check keeps stay FP32 in the graph
    INT8 = "int8"  # the FP16 graph with INT8 (Q/DQ) convolutions and projections: `diffsr quantize`

    def filename(self, submodule: str) -> str:
        return f"{submodule}.onnx" if self is Precision.FP32 else f"{submodule}.{self.value}.onnx"
