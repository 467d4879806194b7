"""`diffsr export`: a checkpoint -> one checked ONNX file per submodule, an FP16 variant, a manifest.

    for each submodule:  module -> model.onnx -> dims named -> inferred + checked -> TensorRT lint
    with fp16:           real-data activation ranges on the FP32 graphs -> layers kept FP32
                         -> model.fp16.onnx (IO as the signature says) -> checked -> lint
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from export.checkpoint import SUBMODULES, Checkpoint, load_submodule, open_checkpoint
from export.config import Precision
from export.errors import DiffsrError
from export.fp16 import fp16_from_fp32
from export.manifest import write_manifest
from export.onnx_export import DEFAULT_OPSET, infer_and_check, lint_for_tensorrt, onnx_from_module
from export.signatures import signatures

log = logging.getLogger(__name__)
Progress = Callable[[str], None]  # called with a short description as each piece of work finishes


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    calibration: dict[str, Any] | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Export every submodule; returns the manifest. `calibration` overrides the FP16 check's data
    (keys of `calibrate_fp16`: photos, prompts, steps, size)."""
    ckpt = open_checkpoint(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sigs = signatures(ckpt.model)
    done = on_progress or (lambda _: None)
    files: dict[str, dict[str, Any]] = {}
    for name in SUBMODULES:
        start = time.perf_counter()
        path = out / Precision.FP32.filename(name)
        onnx_from_module(load_submodule(ckpt, name), sigs[name], ckpt.model, path, opset)
        infer_and_check(path)
        lint_for_tensorrt(path)
        files[name] = {Precision.FP32.value: {"file": path.name, "seconds": round(time.perf_counter() - start, 2)}}
        done(f"{name} fp32")
    if fp16:
        kept = calibrate_fp16(ckpt, out, **(calibration or {}), on_progress=done)
        for name in SUBMODULES:
            path = out / Precision.FP16.filename(name)
            src = out / Precision.FP32.filename(name)
            large = src.with_name(src.name + ".data").is_file()
            fp16_from_fp32(src, path, {k["node"] for k in kept[name]}, external_data=large)
            infer_and_check(path)
            lint_for_tensorrt(path)
            files[name][Precision.FP16.value] = {"file": path.name, "kept_fp32": kept[name]}
            done(f"{name} fp16")
    return write_manifest(out, ckpt, opset, files)


def calibrate_fp16(
    ckpt: Checkpoint, onnx_dir: Path, photos: tuple[str, ...] = ("astronaut", "coffee", "chelsea"),
    prompts: tuple[str, ...] | None = None, steps: int = 20, size: int = 64, on_progress: Progress | None = None,
) -> dict[str, list[dict]]:
    """Run the reference pipeline on real photos (size x size LQ) and prompts, all timesteps; replay
    every submodule's recorded inputs through its FP32 graph; return the layers to keep FP32."""
    from calib.data import PROMPTS
    from calib.data import photos as load_photos
    from calib.fp16 import activation_ranges, fp32_layers, kept_json, record_feeds
    from runtime.backends import load_runners

    if not photos:
        raise DiffsrError("the FP16 check needs at least one calibration photo")
    done = on_progress or (lambda _: None)
    feeds = record_feeds(ckpt, load_runners("torch", ckpt), load_photos((size, size), photos),
                         prompts or PROMPTS[:2], steps, on_run=lambda: done("calibration run"))
    kept = {}
    for name in SUBMODULES:
        path = onnx_dir / Precision.FP32.filename(name)
        kept[name] = kept_json(fp32_layers(path, activation_ranges(path, feeds[name])))
        for layer in kept[name]:
            log.warning("%s: keeping %s (%s) in FP32: %s", name, layer["node"], layer["op_type"], layer["reason"])
        done(f"{name} ranges")
    return kept
