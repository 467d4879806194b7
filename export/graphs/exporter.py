"""`diffsr export`: a checkpoint -> one checked ONNX file per submodule, FP16 variants, a manifest.

    export_onnx   for each submodule: module -> model.onnx -> dims named -> inferred + checked
                  -> TensorRT lint; manifest.json
    write_fp16    for each submodule: model.onnx + the layers to keep FP32 (decided on real data by
                  `diffsr.calib.keep_fp32`) -> model.fp16.onnx (IO as the signature says) -> checked -> lint;
                  the manifest gains the FP16 files, their kept layers and the calibration settings
    write_int8    for the chosen submodules: model.onnx + feeds recorded on real data (`diffsr.calib.quantize`)
                  -> model.int8.onnx (Q/DQ, FP16 elsewhere) -> checked -> lint; the manifest gains the INT8
                  files, the layers left out of INT8 and the calibration settings

Graphs derive from one another (FP32 -> FP16 -> INT8): replacing one removes those made from it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.memory import return_freed_memory
from diffsr.export.core.precision import Precision
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.export.graphs.manifest import (
    EXPORTER_REVISION,
    FUSED,
    MANIFEST,
    checkpoint_digest,
    file_sha256,
    read_manifest,
    signature_hash,
    verified_files,
    versions,
    write_manifest,
)
from diffsr.export.graphs.onnx_export import DEFAULT_OPSET, infer_and_check, lint_for_tensorrt, onnx_from_checkpoint
from diffsr.export.graphs.ort_fusions import fuse_for_onnxruntime, fused_filename
from diffsr.export.graphs.to_fp16 import KeptLayer, fp16_from_fp32
from diffsr.export.graphs.to_int8 import QDQ_OPSET, Int8Settings, int8_from_fp32
from diffsr.export.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def export_onnx(ckpt: Checkpoint, out: Path, opset: int = DEFAULT_OPSET, on_progress: OnProgress = ignore,
                ort_fusions: bool = True) -> dict[str, Any]:
    """Export every submodule in FP32 and, with `ort_fusions`, its ONNX Runtime-fused variant (what the
    onnxruntime backend and Triton flavour load); returns the manifest. A graph already in `out` from this
    checkpoint, signature, opset and exporter, its bytes unchanged, is kept: `diffsr export --fp16` after
    `diffsr export` only adds the FP16 graphs, in a fresh process (for SDXL its peak is then the FP16
    check's own)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current = up_to_date(out, ckpt, opset)
    names = ckpt.model.submodules
    files: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        if name in current:  # kept, with its FP16 graph when it has one (made from this very FP32 graph)
            files[name] = current[name]
            on_progress(Progress("export", f"{name} fp32 up to date", i + 1, len(names)))
            continue
        _remove(out, name, Precision.FP16, Precision.INT8)  # graphs made from the FP32 graph about to be replaced
        on_progress(Progress("export", f"{name} fp32", i, len(names)))
        start = time.perf_counter()
        path = out / Precision.FP32.filename(name)
        onnx_from_checkpoint(ckpt, name, path, opset)
        infer_and_check(path)
        lint_for_tensorrt(path)
        files[name] = {Precision.FP32.value: {"file": path.name, "seconds": round(time.perf_counter() - start, 2)}}
        return_freed_memory(collect=True)  # what tracing left behind, before the next submodule (or the FP16 check)
    for i, name in enumerate(names):
        fp32, fused = files[name][Precision.FP32.value], out / fused_filename(name)
        if not ort_fusions:
            fp32.pop(FUSED, None)
            for stale in (fused, fused.with_name(fused.name + ".data")):
                stale.unlink(missing_ok=True)
        elif FUSED not in fp32:
            on_progress(Progress("onnxruntime fusions", name, i, len(names)))
            start = time.perf_counter()
            fusions = fuse_for_onnxruntime(out / fp32["file"], fused)
            fp32[FUSED] = {"file": fused.name, "fusions": fusions, "seconds": round(time.perf_counter() - start, 2)}
            return_freed_memory(collect=True)
    on_progress(Progress("export", "fp32 graphs", len(names), len(names)))
    fp16 = all(Precision.FP16.value in files[name] for name in names)
    extra = {"fp16_calibration": read_manifest(out).get("fp16_calibration")} if fp16 else {}
    int8 = read_manifest(out).get("int8_calibration") if fp16 and (out / MANIFEST).is_file() else None
    if int8 is not None and all(Precision.INT8.value in files[name] for name in int8["submodules"]):
        extra["int8_calibration"] = int8
    for name in names:
        # FP16 graphs are all or nothing (a partial set is removed, `--fp16` makes them anew), and so are
        # the INT8 graphs of a quantization (`diffsr quantize` makes them anew)
        stale = [p for p, kept in ((Precision.FP16, fp16), (Precision.INT8, "int8_calibration" in extra)) if not kept]
        _remove(out, name, *stale)
        for precision in stale:
            files[name].pop(precision.value, None)
    return write_manifest(out, ckpt, opset, files, **extra)


def _remove(out: Path, name: str, *precisions: Precision) -> None:
    for precision in precisions:
        for stale in (out / precision.filename(name), out / (precision.filename(name) + ".data")):
            stale.unlink(missing_ok=True)


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
        sigs, kept = ckpt.model.signatures(), {}
        for name in ckpt.model.submodules:
            entry = manifest["submodules"].get(name, {})
            if entry.get("signature_sha256") != signature_hash(sigs[name]):
                continue
            current = {precision: _unhashed(info) for precision, info in entry.items()
                       if precision in (p.value for p in Precision) and _unchanged(out, info)}
            fp32 = current.get(Precision.FP32.value, {})
            if FUSED in fp32 and not _unchanged(out, entry[Precision.FP32.value][FUSED]):
                del fp32[FUSED]
            if Precision.FP32.value in current:
                kept[name] = current
        return kept
    except (DiffsrError, KeyError, TypeError, AttributeError):
        return {}


def _unchanged(out: Path, info: dict[str, Any]) -> bool:
    return (out / info["file"]).is_file() and file_sha256(out / info["file"]) == info["sha256"]


def _unhashed(info: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry without its hashes (write_manifest adds them anew), nested entries too."""
    return {k: _unhashed(v) if isinstance(v, dict) and "sha256" in v else v for k, v in info.items() if k != "sha256"}


def write_fp16(
    out: Path, ckpt: Checkpoint, kept: Mapping[str, Sequence[KeptLayer]], calibration: Mapping[str, Any],
    on_progress: OnProgress = ignore,
) -> dict[str, Any]:
    """FP16 graphs beside the verified FP32 ones of `out`, `kept[name]` staying FP32 in each; returns
    the manifest, which records the kept layers (and why) and the calibration that chose them."""
    out, names = Path(out), ckpt.model.submodules
    fp32 = verified_files(out, ckpt, Precision.FP32)
    missing = [name for name in names if name not in kept]
    if missing:
        raise DiffsrError(f"no FP16 keep-list for {missing}: run the FP16 check on every submodule")
    manifest = read_manifest(out)
    files = {name: {Precision.FP32.value: manifest["submodules"][name][Precision.FP32.value]} for name in names}
    for name in names:
        _remove(out, name, Precision.INT8)  # made from the FP16 keep-lists about to be replaced
    for i, name in enumerate(names):
        on_progress(Progress("fp16", f"{name} fp16", i, len(names)))
        src, path = fp32[name], out / Precision.FP16.filename(name)
        large = src.with_name(src.name + ".data").is_file()
        fp16_from_fp32(src, path, {k.node for k in kept[name]}, external_data=large)
        infer_and_check(path)
        lint_for_tensorrt(path)
        files[name][Precision.FP16.value] = {"file": path.name, "kept_fp32": [asdict(k) for k in kept[name]]}
    on_progress(Progress("fp16", "fp16 graphs", len(names), len(names)))
    return write_manifest(out, ckpt, manifest["opset"], files, fp16_calibration=dict(calibration))


def write_int8(
    out: Path, ckpt: Checkpoint, feeds: Mapping[str, Sequence[dict[str, np.ndarray]]], settings: Int8Settings,
    calibration: Mapping[str, Any], on_progress: OnProgress = ignore,
) -> dict[str, Any]:
    """INT8 graphs of the submodules in `feeds` (each calibrated on its recorded inputs), beside the verified
    FP32 and FP16 graphs of `out`; the others serve FP16. Returns the manifest, which records the layers
    left out of INT8 (and why) and the calibration."""
    out, every = Path(out), ckpt.model.submodules
    names = tuple(feeds)
    ckpt.model.check_submodules(names, "submodules to quantize")
    fp32 = verified_files(out, ckpt, Precision.FP32, names)
    verified_files(out, ckpt, Precision.FP16)  # INT8 graphs are FP16 elsewhere, and serve beside them
    manifest = read_manifest(out)
    files = {name: {p: info for p, info in manifest["submodules"][name].items() if p in (Precision.FP32.value, Precision.FP16.value)}
             for name in every}
    for name in every:
        _remove(out, name, Precision.INT8)
    for i, name in enumerate(names):
        on_progress(Progress("int8", f"{name} int8", i, len(names)))
        start = time.perf_counter()
        path = out / Precision.INT8.filename(name)
        keep = {k["node"] for k in files[name][Precision.FP16.value]["kept_fp32"]}
        quantized, excluded = int8_from_fp32(fp32[name], path, feeds[name], keep, settings, ckpt.model.int8_kept)
        infer_and_check(path)
        lint_for_tensorrt(path)
        files[name][Precision.INT8.value] = {
            "file": path.name, "opset": QDQ_OPSET, "quantized_layers": len(quantized),
            "excluded": [asdict(e) for e in excluded], "seconds": round(time.perf_counter() - start, 2)}
        return_freed_memory(collect=True)
    on_progress(Progress("int8", "int8 graphs", len(names), len(names)))
    extra = {"fp16_calibration": manifest.get("fp16_calibration"),
             "int8_calibration": dict(calibration) | {"submodules": list(names), **asdict(settings)}}
    return write_manifest(out, ckpt, manifest["opset"], files, **extra)
