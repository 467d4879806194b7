"""INT8 post-training quantization (`diffsr quantize`): activation ranges from the real pipeline.

Activation ranges drift with the timestep, so calibration runs the PyTorch reference pipeline over real
photos and prompts at every sampling step (as the FP16 check does) and records what each chosen
submodule was fed; the export layer's `write_int8` then quantizes each graph with onnxruntime's
`quantize_static` over all of those feeds at once (one merged histogram per tensor).

INT8 is for TensorRT (edge GPUs: Jetson Orin's INT8 tensor cores; datacenter GPUs): on a CPU, ONNX
Runtime runs the Q/DQ graph slower than FP32. The default quantizes what the family names
(`int8_default`: SD's ControlNet + UNet, the denoising step's cost); the rest serve FP16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffsr.calib.data import PHOTOS, PROMPTS
from diffsr.calib.record import Calibration, calibration_feeds
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.core.progress import OnProgress, ignore
from diffsr.export.graphs.exporter import write_int8
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.graphs.to_int8 import Int8Settings
from diffsr.export.model.checkpoint import Checkpoint

# photos kept out of calibration: parity's end-to-end INT8 check runs on them
HELD_OUT = tuple(p for p in PHOTOS if p not in Calibration().photos)


@dataclass(frozen=True)
class Int8Calibration:
    data: Calibration = field(default_factory=Calibration)
    settings: Int8Settings = field(default_factory=Int8Settings)
    submodules: tuple[str, ...] | None = None  # None: the family's default (`int8_default`)

    @classmethod
    def of_size(cls, images: int, steps: int = 20, settings: Int8Settings | None = None,
                submodules: tuple[str, ...] | None = None) -> Int8Calibration:
        """`images` calibration photos (each with two prompts, every timestep of `steps`)."""
        usable = len(PHOTOS) - len(HELD_OUT)
        if not 1 <= images <= usable:
            raise DiffsrError(f"--calib-size {images}: calibration takes 1 to {usable} photos "
                              f"({', '.join(HELD_OUT)} are kept for parity's end-to-end check)")
        data = Calibration(photos=tuple(p for p in PHOTOS if p not in HELD_OUT)[:images], prompts=PROMPTS[:2], steps=steps)
        return cls(data, settings or Int8Settings(), submodules)


def quantize(ckpt: Checkpoint, onnx_dir: Path, calibration: Int8Calibration | None = None,
             on_progress: OnProgress = ignore) -> dict[str, Any]:
    """Record the chosen submodules' inputs over the calibration runs, then write their INT8 graphs into
    `onnx_dir` (beside its FP32 and FP16 graphs); returns the manifest."""
    calibration = calibration or Int8Calibration()
    cal, names = calibration.data, calibration.submodules or ckpt.model.int8_default
    ckpt.model.check_submodules(names, "submodules to quantize")  # before the calibration runs, not after
    verified_files(onnx_dir, ckpt, Precision.FP16)
    recorded = calibration_feeds(ckpt, cal, "int8 calibration", len(cal.photos) * len(cal.prompts), on_progress)
    feeds = {name: [{k: v.numpy() for k, v in feed.items()} for feed in recorded[name]] for name in names}
    del recorded
    return write_int8(onnx_dir, ckpt, feeds, calibration.settings, asdict(cal), on_progress=on_progress)
