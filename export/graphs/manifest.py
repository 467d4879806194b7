"""The export manifest: what each ONNX file is, so a later step can refuse one that does not match.

It records each file's sha256 (external data included), the signature it was exported with (and
its hash), the opset, the library versions, and a digest of the checkpoint it came from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.core.precision import Precision
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.families import model_from_json, module_of
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.signatures import Signature

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Bumped whenever the export produces different graphs from the same inputs (2: fake-tensor tracing,
# folded weight transposes, no pattern rewriter; 3: each dim within its declared bound, no process-dependent
# metadata; 4: sisrm's label generator pools the class probabilities); graphs of another revision are never "up to
# date".
EXPORTER_REVISION = 4
FUSED = "ort_fused"  # key, in an FP32 entry, of the graph with ONNX Runtime's fused kernels (`ort_fusions`)
LIBRARIES = ("diffsr", "torch", "onnx", "onnxruntime", "onnxscript", "diffusers", "transformers")


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: SDXL's files are read once


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(_file_digest(path).encode())
    return h.hexdigest() if len(paths) > 1 else _file_digest(paths[0])


def _file_digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def file_sha256(path: Path) -> str:
    """sha256 of an ONNX file and, where present, its external data file."""
    data = path.with_name(path.name + ".data")
    return _sha256(path, data) if data.is_file() else _sha256(path)


def checkpoint_digest(path: Path) -> str:
    """One sha256 over every file of a checkpoint folder (names and contents)."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + b"\0" + _sha256(file).encode())
    return h.hexdigest()


def signature_json(sig: Signature) -> dict[str, Any]:
    return dataclasses.asdict(sig)


def signature_hash(sig: Signature) -> str:
    return hashlib.sha256(json.dumps(signature_json(sig), sort_keys=True).encode()).hexdigest()


def versions() -> dict[str, str]:
    found = {}
    for lib in LIBRARIES:
        try:
            found[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            found[lib] = "not installed"
    return found


def write_manifest(out: Path, ckpt: Checkpoint, opset: int, files: dict[str, dict[str, Any]],
                   **extra: Any) -> dict[str, Any]:
    """files: submodule -> precision -> {"file": name, ...extra}; hashes and signatures are added here,
    `extra` keys at the top level."""
    sigs = ckpt.model.signatures()
    submodules = {}
    for name, by_precision in files.items():
        entry: dict[str, Any] = {"signature": signature_json(sigs[name]), "signature_sha256": signature_hash(sigs[name])}
        for precision, info in by_precision.items():
            entry[precision] = info | {"sha256": file_sha256(out / info["file"])}
            if FUSED in info:  # the FP32 graph's ONNX Runtime-fused variant
                entry[precision][FUSED] = info[FUSED] | {"sha256": file_sha256(out / info[FUSED]["file"])}
        submodules[name] = entry
    manifest = {
        "format_version": FORMAT_VERSION,
        "checkpoint": {"path": str(ckpt.path.resolve()), "sha256": checkpoint_digest(ckpt.path)},
        "family": ckpt.model.name,
        "family_module": module_of(ckpt.model),  # imported where the family is not yet registered (one of one's own)
        "model": ckpt.model.to_json(),
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "exporter_revision": EXPORTER_REVISION,
        "versions": versions(),
        "submodules": submodules,
        **extra,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def manifest_model(manifest: dict[str, Any]) -> ModelFamily:
    """The model a manifest was exported from (a manifest written before families had names holds none)."""
    return model_from_json(manifest.get("family"), manifest["model"], manifest.get("family_module"))


def read_manifest(onnx_dir: Path) -> dict[str, Any]:
    if not (Path(onnx_dir) / MANIFEST).is_file():
        raise DiffsrError(f"no {MANIFEST} in {onnx_dir}: export it with `diffsr export --out {onnx_dir}`")
    return read_json(Path(onnx_dir) / MANIFEST, "export manifest")


def verified_files(
    onnx_dir: Path, ckpt: Checkpoint | None, precision: Precision, names: tuple[str, ...] | None = None,
    fused: bool = False,
) -> dict[str, Path]:
    """The ONNX file of each submodule (`names`, or all), after checking it is the one exported with today's signature
    from this checkpoint (or, with no checkpoint, from the model the manifest names). Any mismatch
    is an error that names it. `fused` (for ONNX Runtime): the FP32 graph's fused variant where the
    export made one (`diffsr export` does by default), the graph itself where not."""
    manifest = read_manifest(onnx_dir)
    if ckpt is not None and manifest["checkpoint"]["sha256"] != checkpoint_digest(ckpt.path):
        raise DiffsrError(
            f"{onnx_dir} was exported from another checkpoint ({manifest['checkpoint']['path']}), "
            f"not {ckpt.path}: re-export with `diffsr export --checkpoint {ckpt.path}`"
        )
    model = ckpt.model if ckpt is not None else manifest_model(manifest)
    sigs = model.signatures()
    paths = {}
    for name in model.submodules if names is None else names:
        entry = manifest["submodules"].get(name, {})
        info = entry.get(precision.value)
        quantized = (manifest.get("int8_calibration") or {}).get("submodules", ())
        if info is None and precision is Precision.INT8 and manifest.get("int8_calibration") and name not in quantized:
            info = entry.get(Precision.FP16.value)  # not quantized: it serves its FP16 graph
        if info is None:
            hint = {Precision.FP16: " (export with --fp16)", Precision.INT8: " (make it with `diffsr quantize`)"}.get(precision, "")
            raise DiffsrError(f"{onnx_dir} has no {precision.value} {name} in its manifest{hint}")
        if entry["signature_sha256"] != signature_hash(sigs[name]):
            raise DiffsrError(f"{name}: the ONNX file was exported with another signature: re-export {onnx_dir}")
        if fused and FUSED in info:
            info = info[FUSED]
        path = onnx_dir / info["file"]
        if not path.is_file():
            raise DiffsrError(f"{name}: {path} is listed in the manifest but missing")
        if file_sha256(path) != info["sha256"]:
            raise DiffsrError(f"{name}: {path} does not match its sha256 in the manifest (modified after export?)")
        paths[name] = path
    return paths
