#!/usr/bin/env bash
# The GPU checks and the GPU benchmark in one go, on a machine with an NVIDIA GPU:
#
#   scripts/gpu_check.sh [diffsr gpu-check options, e.g. --engines DIR --runs 5]
#
# Makes .venv-gpu on top of the machine's own CUDA build of torch (--system-site-packages, so no
# CPU wheel replaces it), installs diffsr and what the GPU paths need (from PyPI; with WHEELS=DIR
# from that folder of wheels alone, for machines without a registry), runs the GPU and TensorRT
# tests, then `diffsr gpu-check` (parity against the CPU reference, CUDA graph against eager steps,
# the sd15 benchmark), leaving its report in gpu-check.json and the log in gpu-check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-gpu}

"$PYTHON" - <<'PY'
import sys
try:
    import torch
except ImportError:
    sys.exit(f"gpu_check: {sys.executable} has no torch; run with PYTHON=<a python whose torch is built for CUDA>")
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU here")
PY
test -x "$VENV/bin/python" || "$PYTHON" -m venv --system-site-packages "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet)
if [ -n "${WHEELS:-}" ]; then pip+=(--no-index --find-links "$WHEELS"); fi
"${pip[@]}" --no-deps -e .
# torch stays the machine's; Triton's packages are not needed for these checks
"${pip[@]}" diffusers transformers safetensors onnx onnxscript onnxruntime pillow scikit-image typer rich \
    matplotlib polygraphy psutil accelerate onnx-ir pytest
"${pip[@]}" --no-deps open-clip-torch  # the CLIP BPE vocabulary only (its torchvision is not needed)

{
    "$VENV/bin/python" -m pytest -ra tests/runtime/backends/test_torch_cuda.py tests/runtime/backends/test_tensorrt_runner.py \
        tests/export/engines/test_build.py tests/runtime/test_loop.py
    "$VENV/bin/diffsr" gpu-check --json gpu-check.json "$@"
} 2>&1 | tee gpu-check.log
