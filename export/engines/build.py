"""`diffsr build-engines`: FP16 (or INT8) ONNX -> one TensorRT plan per submodule, with its metadata.

    FP16 ONNX (INT8: the Q/DQ graphs of `diffsr quantize`, FP16 for the others), verified against its manifest
      -> strongly typed network            polygraphy NetworkFromOnnxPath(strongly_typed=True)
      -> builder config                    CreateConfig: the signature's profile for the target, timing cache
      -> serialized plan                   EngineBytesFromNetwork (the timing cache saved back)
      -> checked against the signature     IO names, dtypes and profile of the deserialized engine
      -> <submodule>.plan + <submodule>.json (EngineMeta)

Strongly typed: precision follows the ONNX types, so the layers the FP16 check kept in FP32 stay FP32 and
the Q/DQ layers run INT8 (TensorRT 11 builds nothing else, and 10.x builds the same). No precision builder
flag is set.
A plan whose inputs, flags and environment match its metadata is kept, not rebuilt.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.export.engines.metadata import (
    EngineMeta,
    check_engine_io,
    current_environment,
    read_meta,
    tensorrt_module,
    write_meta,
)
from diffsr.export.graphs.manifest import file_sha256, manifest_model, read_manifest, signature_hash, verified_files
from diffsr.export.model.dims import ShapeRange, Target, target
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.signatures import Signature

try:
    import tensorrt as trt
except ImportError:  # no TensorRT here: every entry point calls tensorrt_module() first, for a clear error
    pass

log = logging.getLogger(__name__)
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's default: 0 builds fastest, 5 searches longest


def engine_profiles(model: ModelFamily, deployment: Target) -> dict[str, dict[str, ShapeRange]]:
    """submodule -> input -> (min, opt, max) shape: the optimisation profile of each engine."""
    ranges = deployment.dim_ranges(model.dims())
    return {name: sig.shape_ranges(ranges) for name, sig in model.signatures().items()}


def profile_json(shapes: dict[str, ShapeRange]) -> dict[str, list[list[int]]]:
    return {name: [list(r.min), list(r.opt), list(r.max)] for name, r in shapes.items()}


@contextmanager
def _builder_errors() -> Iterator[list[str]]:
    """Collect the errors TensorRT and its ONNX parser report through polygraphy while building, so
    the exception names them (they are logged as they come too)."""
    from polygraphy.logger import G_LOGGER

    G_LOGGER.use_python_logging_system = True  # polygraphy's messages, TensorRT's among them, via `logging`
    errors: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage().strip().splitlines()[-1].removeprefix("[E] "))

    handler = Collect(level=logging.ERROR)
    logger = logging.getLogger("Polygraphy")
    logger.addHandler(handler)
    try:
        yield errors
    finally:
        logger.removeHandler(handler)


def plan_from_onnx(onnx: Path, shapes: dict[str, ShapeRange], timing_cache: Path | None, opt_level: int) -> bytes:
    """One strongly typed engine, serialized; builder errors raise with TensorRT's own messages."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    profile = Profile()
    for name, r in shapes.items():
        profile.add(name, min=r.min, opt=r.opt, max=r.max)
    cache = str(timing_cache) if timing_cache is not None else None
    build = EngineBytesFromNetwork(
        NetworkFromOnnxPath(str(onnx), strongly_typed=True),
        CreateConfig(profiles=[profile], load_timing_cache=cache, builder_optimization_level=opt_level),
        save_timing_cache=cache,
    )
    with _builder_errors() as errors:
        try:
            return bytes(build())
        except PolygraphyException as e:
            reason = "; ".join(dict.fromkeys(errors)) or str(e)
            raise DiffsrError(f"TensorRT could not build {onnx.name}: {reason}") from None


def inspect_plan(plan: bytes, sig: Signature, shapes: dict[str, ShapeRange]) -> int:
    """Deserialize a fresh plan and hold it to the signature and the profile asked for; returns the
    device memory one execution context needs."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise DiffsrError(f"{sig.name}: TensorRT cannot deserialize the plan it just built")
    got = check_engine_io(engine, sig)
    if got != shapes:
        raise DiffsrError(f"{sig.name}: the engine's profile {got} is not the one asked for {shapes}")
    return int(engine.device_memory_size_v2)


def build_engines(
    onnx_dir: Path, out: Path, target_name: str = "server", timing_cache: Path | None = None,
    max_batch: int | None = None, static: bool = False, opt_level: int = DEFAULT_OPTIMIZATION_LEVEL,
    on_progress: OnProgress = ignore, precision: Precision = Precision.FP16,
) -> dict[str, EngineMeta]:
    """Build (or keep, when up to date) every submodule's plan; returns their metadata."""
    deployment = target(target_name).resized(max_batch, static)  # bad arguments fail before anything is read
    if not 0 <= opt_level <= 5:
        raise DiffsrError(f"builder optimisation level {opt_level} is out of range: use 0 to 5")
    if precision not in (Precision.FP16, Precision.INT8):
        raise DiffsrError(f"engines are built from the fp16 or int8 graphs, not {precision.value}")
    manifest = read_manifest(onnx_dir)
    paths = verified_files(onnx_dir, None, precision)  # refuses files that do not match
    model = manifest_model(manifest)
    tensorrt_module()
    env = current_environment()
    sigs, profiles = model.signatures(), engine_profiles(model, deployment)
    flags = {"strongly_typed": True, "precision": precision.value, "static": deployment.static,
             "max_batch": deployment.batch.max, "builder_optimization_level": opt_level, "tf32": False}
    out.mkdir(parents=True, exist_ok=True)
    built = {}
    for i, name in enumerate(model.submodules):
        plan_path = out / f"{name}.plan"
        meta = EngineMeta(
            submodule=name, plan_sha256="", built_with=env, onnx_file=paths[name].name,
            onnx_sha256=file_sha256(paths[name]),  # verified: the manifest's
            signature_sha256=signature_hash(sigs[name]), checkpoint_sha256=manifest["checkpoint"]["sha256"],
            target=deployment.name, profile=profile_json(profiles[name]), flags=flags,
        )
        kept = _up_to_date(plan_path, meta)
        if kept is not None:
            built[name] = kept
            on_progress(Progress("build", f"{name} up to date", i + 1, len(model.submodules)))
            continue
        on_progress(Progress("build", f"building {name}", i, len(model.submodules)))
        start = time.perf_counter()
        plan = plan_from_onnx(paths[name], profiles[name], timing_cache, opt_level)
        memory = inspect_plan(plan, sigs[name], profiles[name])
        partial = plan_path.with_suffix(".plan.partial")  # a crash never leaves half a plan under the real name
        partial.write_bytes(plan)
        partial.replace(plan_path)
        meta = dataclasses.replace(meta, plan_sha256=file_sha256(plan_path), device_memory_bytes=memory,
                        build_seconds=round(time.perf_counter() - start, 1))
        write_meta(meta, plan_path)
        built[name] = meta
        on_progress(Progress("build", f"built {name}", i + 1, len(model.submodules)))
    return built


def _up_to_date(plan: Path, wanted: EngineMeta) -> EngineMeta | None:
    """The existing plan's metadata when it was built from the same inputs, the same way, here."""
    if not plan.is_file():
        return None
    try:
        have = read_meta(plan)
    except DiffsrError:
        return None
    same = ("onnx_sha256", "signature_sha256", "checkpoint_sha256", "target", "profile", "flags", "built_with")
    if all(getattr(have, k) == getattr(wanted, k) for k in same) and file_sha256(plan) == have.plan_sha256:
        return have
    return None

