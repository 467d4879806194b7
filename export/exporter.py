"""`diffsr export`: a checkpoint -> one checked ONNX file per submodule, FP16 variants, a manifest.

    export_onnx   for each submodule: module -> model.onnx -> dims named -> inferred + checked
                  -> TensorRT lint; manifest.json
    write_fp16    for each submodule: model.onnx + the layers to keep FP32 (decided on real data by
                  `diffsr.calib.fp16`) -> model.fp16.onnx (IO as the signature says) -> checked -> lint;
                  the manifest gains the FP16 files, their kept layers and the calibration settings
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffsr.export.checkpoint import SUBMODULES, Checkpoint
from diffsr.export.config import Precision
from diffsr.export.errors import DiffsrError
from diffsr.export.fp16 import KeptLayer, fp16_from_fp32
from diffsr.export.manifest import (
    checkpoint_digest,
    file_sha256,
    read_manifest,
    signature_hash,
    verified_files,
    versions,
    write_manifest,
)
from diffsr.export.memory import return_freed_memory
from diffsr.export.onnx_export import DEFAULT_OPSET, infer_and_check, lint_for_tensorrt, onnx_from_checkpoint
from diffsr.export.progress import OnProgress, Progress, ignore
from diffsr.export.signatures import signatures

log = logging.getLogger(__name__)


def export_onnx(ckpt: Checkpoint, out: Path, opset: int = DEFAULT_OPSET, on_progress: OnProgress = ignore) -> dict[str, Any]:
    """Export every submodule in FP32; returns the manifest. A graph already in `out` from this checkpoint,
    signature and opset, its bytes unchanged, is kept: `diffsr export --fp16` after `diffsr export` only
    adds the FP16 graphs (in a fresh process, which for SDXL keeps the FP16 check under 16 GiB)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current = up_to_date(out, ckpt, opset)
    files: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(SUBMODULES):
        if name in current:
            files[name] = {Precision.FP32.value: current[name]}
            on_progress(Progress("export", f"{name} fp32 up to date", i + 1, len(SUBMODULES)))
            continue
        on_progress(Progress("export", f"{name} fp32", i, len(SUBMODULES)))
        start = time.perf_counter()
        path = out / Precision.FP32.filename(name)
        onnx_from_checkpoint(ckpt, name, path, opset)
        infer_and_check(path)
        lint_for_tensorrt(path)
        files[name] = {Precision.FP32.value: {"file": path.name, "seconds": round(time.perf_counter() - start, 2)}}
        return_freed_memory(collect=True)  # what tracing left behind, before the next submodule (or the FP16 check)
    on_progress(Progress("export", "fp32 graphs", len(SUBMODULES), len(SUBMODULES)))
    return write_manifest(out, ckpt, opset, files)


def up_to_date(out: Path, ckpt: Checkpoint, opset: int) -> dict[str, dict[str, Any]]:
    """submodule -> its FP32 manifest entry, for the graphs in `out` exported by the same library versions
    from this checkpoint, with their signature and `opset`, their bytes as recorded."""
    try:
        manifest = read_manifest(out)
    except DiffsrError:
        return {}
    if manifest.get("opset") != opset or manifest.get("versions") != versions():
        return {}
    if manifest.get("checkpoint", {}).get("sha256") != checkpoint_digest(ckpt.path):
        return {}
    sigs, kept = signatures(ckpt.model), {}
    for name in SUBMODULES:
        entry = manifest.get("submodules", {}).get(name, {})
        info = entry.get(Precision.FP32.value)
        if info is None or entry.get("signature_sha256") != signature_hash(sigs[name]):
            continue
        path = out / info["file"]
        if path.is_file() and file_sha256(path) == info.get("sha256"):
            kept[name] = {k: v for k, v in info.items() if k != "sha256"}
    return kept


def write_fp16(
    out: Path, ckpt: Checkpoint, kept: Mapping[str, Sequence[KeptLayer]], calibration: Mapping[str, Any],
    on_progress: OnProgress = ignore,
) -> dict[str, Any]:
    """FP16 graphs beside the verified FP32 ones of `out`, `kept[name]` staying FP32 in each; returns
    the manifest, which records the kept layers (and why) and the calibration that chose them."""
    out = Path(out)
    fp32 = verified_files(out, ckpt, SUBMODULES, Precision.FP32)
    missing = [name for name in SUBMODULES if name not in kept]
    if missing:
        raise DiffsrError(f"no FP16 keep-list for {missing}: run the FP16 check on every submodule")
    manifest = read_manifest(out)
    files = {name: {Precision.FP32.value: manifest["submodules"][name][Precision.FP32.value]} for name in SUBMODULES}
    for i, name in enumerate(SUBMODULES):
        on_progress(Progress("fp16", f"{name} fp16", i, len(SUBMODULES)))
        src, path = fp32[name], out / Precision.FP16.filename(name)
        large = src.with_name(src.name + ".data").is_file()
        fp16_from_fp32(src, path, {k.node for k in kept[name]}, external_data=large)
        infer_and_check(path)
        lint_for_tensorrt(path)
        files[name][Precision.FP16.value] = {"file": path.name, "kept_fp32": [asdict(k) for k in kept[name]]}
    on_progress(Progress("fp16", "fp16 graphs", len(SUBMODULES), len(SUBMODULES)))
    return write_manifest(out, ckpt, manifest["opset"], files, fp16_calibration=dict(calibration))
