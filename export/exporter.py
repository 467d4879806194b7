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
    EXPORTER_REVISION,
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
    signature, opset and exporter, its bytes unchanged, is kept: `diffsr export --fp16` after `diffsr export`
    only adds the FP16 graphs, in a fresh process (for SDXL its peak is then the FP16 check's own)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current = up_to_date(out, ckpt, opset)
    files: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(SUBMODULES):
        if name in current:  # kept, with its FP16 graph when it has one (made from this very FP32 graph)
            files[name] = current[name]
            on_progress(Progress("export", f"{name} fp32 up to date", i + 1, len(SUBMODULES)))
            continue
        for stale in (out / Precision.FP16.filename(name), out / (Precision.FP16.filename(name) + ".data")):
            stale.unlink(missing_ok=True)  # an FP16 graph of the FP32 graph about to be replaced
        on_progress(Progress("export", f"{name} fp32", i, len(SUBMODULES)))
        start = time.perf_counter()
        path = out / Precision.FP32.filename(name)
        onnx_from_checkpoint(ckpt, name, path, opset)
        infer_and_check(path)
        lint_for_tensorrt(path)
        files[name] = {Precision.FP32.value: {"file": path.name, "seconds": round(time.perf_counter() - start, 2)}}
        return_freed_memory(collect=True)  # what tracing left behind, before the next submodule (or the FP16 check)
    on_progress(Progress("export", "fp32 graphs", len(SUBMODULES), len(SUBMODULES)))
    fp16 = all(Precision.FP16.value in files[name] for name in SUBMODULES)
    extra = {"fp16_calibration": read_manifest(out).get("fp16_calibration")} if fp16 else {}
    if not fp16:  # FP16 graphs are all or nothing: a partial set is removed, `--fp16` makes them anew
        for name in SUBMODULES:
            files[name].pop(Precision.FP16.value, None)
            for stale in (out / Precision.FP16.filename(name), out / (Precision.FP16.filename(name) + ".data")):
                stale.unlink(missing_ok=True)
    return write_manifest(out, ckpt, opset, files, **extra)


def up_to_date(out: Path, ckpt: Checkpoint, opset: int) -> dict[str, dict[str, Any]]:
    """submodule -> {precision: manifest entry} of the graphs in `out` that this exporter revision and
    these library versions made from this checkpoint, with their signature and `opset`, bytes unchanged
    (the FP16 graph too, where there is one). A manifest that cannot be read means nothing is."""
    try:
        manifest = read_manifest(out)
        if (manifest["opset"], manifest.get("exporter_revision"), manifest["versions"]) != (
                opset, EXPORTER_REVISION, versions()):
            return {}
        if manifest["checkpoint"]["sha256"] != checkpoint_digest(ckpt.path):
            return {}
        sigs, kept = signatures(ckpt.model), {}
        for name in SUBMODULES:
            entry = manifest["submodules"].get(name, {})
            if entry.get("signature_sha256") != signature_hash(sigs[name]):
                continue
            current = {precision: {k: v for k, v in info.items() if k != "sha256"}
                       for precision, info in entry.items() if precision in (p.value for p in Precision)
                       and (out / info["file"]).is_file() and file_sha256(out / info["file"]) == info["sha256"]}
            if Precision.FP32.value in current:
                kept[name] = current
        return kept
    except (DiffsrError, KeyError, TypeError, AttributeError):
        return {}


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
