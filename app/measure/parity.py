"""Parity of exported graphs against the PyTorch reference: run, then judge.

Running produces data (outputs of both sides on the same inputs); judging applies per-precision
tolerances and returns a report that serialises to JSON. Each submodule is checked at three shapes
inside the server profile (min, opt, and an odd non-square one); then the whole pipeline, same
seed, as PSNR of the final images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffsr.calib.data import photo, sample_request
from diffsr.calib.quantize import HELD_OUT
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import read_manifest
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.dims import TARGETS, odd_sizes
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.samples import sample_inputs
from diffsr.export.model.settings import PipelineConfig, Request
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline


@dataclass(frozen=True)
class Tolerance:
    rel: float  # ||out - ref|| / ||ref|| per output
    psnr_db: float  # end-to-end image against the reference image


# INT8: the quantized submodules' error on random inputs is reported, held only to a sanity bound (INT8's
# error is what calibration on real data keeps small, not random data); the end-to-end image is the test
TOLERANCES = {Precision.FP32: Tolerance(rel=1e-4, psnr_db=45.0), Precision.FP16: Tolerance(rel=1e-2, psnr_db=30.0),
              Precision.INT8: Tolerance(rel=0.25, psnr_db=30.0)}
PSNR_CAP = 100.0  # identical images: reported as this rather than infinity (JSON has no inf)


@dataclass
class OutputParity:
    submodule: str
    shape: str  # min, opt or odd
    dims: dict[str, int]
    output: str
    max_abs: float
    rel: float
    finite: bool
    passed: bool = False


@dataclass
class ImageParity:
    photo: str
    size: str
    psnr_db: float
    max_abs: int
    passed: bool = False


@dataclass
class ParityReport:
    precision: str
    tolerance: Tolerance
    outputs: list[OutputParity] = field(default_factory=list)
    images: list[ImageParity] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs) and all(i.passed for i in self.images)

    def to_json(self) -> dict:
        return {"precision": self.precision, "passed": self.passed, "tolerance": asdict(self.tolerance),
                "outputs": [asdict(o) for o in self.outputs], "images": [asdict(i) for i in self.images]}


SHAPES = ("min", "opt", "odd")


def parity_shapes(model: ModelFamily, labels: tuple[str, ...] = SHAPES) -> dict[str, dict[str, int]]:
    """min and opt of the server profile, and an odd non-square shape with a batch of two (those of
    `labels`: SDXL's opt is 1024 x 1024, minutes per submodule on a CPU)."""
    unknown = [label for label in labels if label not in SHAPES]
    if not labels or unknown:
        raise DiffsrError(f"parity shapes {list(labels)} must be one or more of {list(SHAPES)}")
    ranges = TARGETS["server"].dim_ranges(model.dims())
    shapes = {
        "min": {name: r.min for name, r in ranges.items()},
        "opt": {name: r.opt for name, r in ranges.items()},
        "odd": odd_sizes(model.dims()),
    }
    return {label: shapes[label] for label in labels}


# --- running -----------------------------------------------------------------------------------


def run_submodules(
    ckpt: Checkpoint, reference: Mapping[str, Runner], candidate: Mapping[str, Runner], seed: int = 0,
    labels: tuple[str, ...] = SHAPES, names: tuple[str, ...] | None = None,
) -> list[tuple[str, str, dict[str, int], str, np.ndarray, np.ndarray]]:
    """(submodule, shape label, dims, output name, reference, candidate) on fresh random inputs. Each
    side runs every shape, then is released before the other loads: one copy of a submodule's weights in
    memory at a time (SDXL's ControlNet + UNet is 14 GiB in FP32, on either side)."""
    sigs, shapes, results = ckpt.model.signatures(), parity_shapes(ckpt.model, labels), []
    for name in ckpt.model.submodules if names is None else names:
        feeds = {label: sample_inputs(ckpt.model, name, dims, seed=seed) for label, dims in shapes.items()}
        outputs = []
        for runner in (reference[name], candidate[name]):
            outputs.append({label: {k: _np(v) for k, v in runner.infer(feed).items()} for label, feed in feeds.items()})
            runner.release()
        for label, dims in shapes.items():
            for spec in sigs[name].outputs:
                results.append((name, label, dims, spec.name, outputs[0][label][spec.name], outputs[1][label][spec.name]))
    return results


def pipeline_requests(model: ModelFamily, size: tuple[int, int], config: PipelineConfig,
                      photos: tuple[str, ...]) -> list[tuple[str, Request]]:
    """(label, request) of each real photo (size = width, height) with every photo input of the family filled
    (`sample_request`), and again with its optional lists empty (refsr's references: the path without them)."""
    optional = [spec.name for spec in model.photo_lists() if not spec.low]
    requests = []
    for i, name in enumerate(photos):
        request = sample_request(model, photo(name, size), config, i)
        requests.append((name, request))
        if optional:
            kept = {k: v for k, v in request.photos.items() if k not in optional}
            requests.append((f"{name}, no {', '.join(optional)}", dataclasses.replace(request, photos=kept)))
    return requests


def run_pipelines(reference: Mapping[str, Runner], candidate: Mapping[str, Runner], ckpt: Checkpoint,
                  size: tuple[int, int], steps: int, photos: tuple[str, ...] = ("astronaut",),
                  ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The final uint8 images of both pipelines on real photos (`pipeline_requests`), same seed, as
    (label, reference, candidate); one pipeline's weights in memory at a time."""
    requests = pipeline_requests(ckpt.model, size, ckpt.defaults.replace(steps=steps), photos)
    outputs = []
    for runners in (reference, candidate):
        pipe = Pipeline(runners, ckpt)
        outputs.append([pipe(request).image for _, request in requests])
        for runner in runners.values():
            runner.release()
    return [(label, ref, out) for (label, _), ref, out in zip(requests, *outputs)]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


# --- judging -----------------------------------------------------------------------------------


def judge_output(submodule: str, label: str, dims: dict, output: str, ref: np.ndarray, out: np.ndarray, tol: Tolerance) -> OutputParity:
    finite = bool(np.isfinite(out).all())
    diff = (out.astype(np.float64) - ref) if finite else np.full(1, np.inf)
    rel = float(np.linalg.norm(diff) / max(np.linalg.norm(ref.astype(np.float64)), 1e-30))
    row = OutputParity(submodule, label, dims, output, float(np.abs(diff).max()), rel, finite)
    row.passed = finite and rel <= tol.rel
    return row


def psnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """PSNR in dB of two images on a 0-255 scale (uint8, or float as `eval`'s Y channel), capped at
    `PSNR_CAP` (identical images)."""
    mse = float(np.mean((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def judge_image(size: tuple[int, int], ref: np.ndarray, out: np.ndarray, tol: Tolerance, name: str = "astronaut") -> ImageParity:
    psnr = psnr_db(ref, out)
    row = ImageParity(name, f"{size[0]}x{size[1]}", psnr, int(np.abs(out.astype(int) - ref.astype(int)).max()))
    row.passed = psnr >= tol.psnr_db
    return row


def check_parity(
    ckpt: Checkpoint, onnx_dir, precision: Precision = Precision.FP32, size: tuple[int, int] = (128, 96), steps: int = 20,
    shapes: tuple[str, ...] = SHAPES, submodules: tuple[str, ...] | None = None, end_to_end: bool = True,
) -> ParityReport:
    """ONNX Runtime against PyTorch (FP32): every submodule (or those of `submodules`) at three shapes, then
    the whole pipeline (unless not `end_to_end`: a full-size model's 20 steps are hours on a CPU). Runners are
    lean (loaded on use, released after), so SDXL's FP32 reference and graphs are never both in memory.
    INT8: the submodules `diffsr quantize` quantized (the rest serve FP16, checked by `--precision fp16`),
    and the pipeline on the photos calibration never saw."""
    tol = TOLERANCES[precision]
    names = _chosen(ckpt.model, submodules)
    photos: tuple[str, ...] = ("astronaut",)
    if precision is Precision.INT8:
        calibration = read_manifest(Path(onnx_dir)).get("int8_calibration")
        if not calibration:  # the prerequisite step was not run
            raise DiffsrError(f"{onnx_dir} holds no INT8 graphs: make them first with `diffsr quantize --checkpoint ... "
                              f"--onnx {onnx_dir}` (after `diffsr export --fp16`)")
        quantized = tuple(calibration["submodules"])
        if names is not None and set(names) - set(quantized):
            raise DiffsrError(f"{sorted(set(names) - set(quantized))} not quantized in {onnx_dir} (INT8 graphs: {list(quantized)})")
        names, photos = names or quantized, HELD_OUT
    reference = load_runners("torch", ckpt, lean=True)
    candidate = load_runners("onnxruntime", ckpt, onnx_dir=onnx_dir, precision=precision, lean=True)
    report = ParityReport(precision.value, tol)
    rows = run_submodules(ckpt, reference, candidate, labels=shapes, names=names)
    report.outputs = [judge_output(*row, tol) for row in rows]
    if end_to_end:
        for name, ref_img, out_img in run_pipelines(reference, candidate, ckpt, size, steps, photos):
            report.images.append(judge_image(size, ref_img, out_img, tol, name))
    return report


def _chosen(model: ModelFamily, submodules: tuple[str, ...] | None) -> tuple[str, ...] | None:
    unknown = [name for name in submodules or () if name not in model.submodules]
    if unknown or submodules == ():
        raise DiffsrError(f"no submodule {unknown or ['']} in this {model.name} checkpoint: its submodules are {list(model.submodules)}")
    return submodules
