"""Backends: one small `Runner` class each (`base.py` holds the interface and its checks).

    torch_runner        torch (the PyTorch reference) and torch-cuda (FP16, channels-last, SDPA)
    onnxruntime_runner  the exported ONNX graphs on ONNX Runtime
    tensorrt_runner     the TensorRT plans of `diffsr build-engines`
    on_demand           runners that load on first use (one stage's weights in memory at a time)
    names               the backends' names and defaults, importable without loading any of them

`runtime/loading.py` chooses and loads them.
"""
