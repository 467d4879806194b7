"""The backends' names and defaults, in a module that imports nothing heavy (the command line's help
text reads them before any backend is loaded)."""

from __future__ import annotations

from diffsr.export.core.precision import Precision

BACKENDS = ("torch", "torch-cuda", "onnxruntime", "tensorrt")
DEFAULTS = {  # backend -> (device, precision)
    "torch": ("cpu", Precision.FP32),
    "torch-cuda": ("cuda", Precision.FP16),
    "onnxruntime": ("cpu", Precision.FP32),
    "tensorrt": ("cuda", Precision.FP16),
}
CUDA_GRAPHS = ("torch-cuda", "tensorrt")  # backends whose denoising step the pipeline captures in a CUDA graph
SERVED = "triton"  # the benchmark's name for the pipeline behind a Triton endpoint
