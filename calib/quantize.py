"""INT8 post-training quantization (`diffsr quantize`): activation ranges from the real pipeline.

Activation ranges drift with the timestep, so calibration runs the PyTorch reference pipeline over real
photos and prompts at every sampling step (as the FP16 check does) and records what each chosen
submodule was fed; the export layer's `write_int8` then quantizes each graph with onnxruntime's
`quantize_static` over all of those feeds at once (one merged histogram per tensor).

INT8 is for TensorRT (edge GPUs: Jetson Orin's INT8 tensor cores; datacenter GPUs): on a CPU, ONNX
Runtime runs the Q/DQ graph slower than FP32. The default quantizes the ControlNet + UNet, which is the
denoising step's cost; the rest serve FP16.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffsr.calib.data import PHOTOS, PROMPTS
from diffsr.calib.fp16 import Calibration, calibration_feeds
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.config import Precision
from diffsr.export.core.errors import DiffsrError
from diffsr.export.graphs.exporter import write_int8
from diffsr.export.graphs.to_int8 import DEFAULT_SUBMODULES, Int8Settings, check_submodules
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.core.progress import OnProgress, ignore
from diffsr.export.model.signatures import SUBMODULES

# photos kept out of calibration: parity's end-to-end INT8 check runs on them
HELD_OUT = tuple(p for p in PHOTOS if p not in Calibration().photos)


@dataclass(frozen=True)
class Int8Calibration:
    data: Calibration = field(default_factory=Calibration)
    settings: Int8Settings = field(default_factory=Int8Settings)
    submodules: tuple[str, ...] = DEFAULT_SUBMODULES

    def __post_init__(self) -> None:
        check_submodules(self.submodules)  # before the calibration runs, not after

    @classmethod
    def of_size(cls, images: int, steps: int = 20, settings: Int8Settings | None = None,
                submodules: tuple[str, ...] = DEFAULT_SUBMODULES) -> Int8Calibration:
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
    cal = calibration.data
    verified_files(onnx_dir, ckpt, SUBMODULES, Precision.FP16)  # fail before the calibration runs
    recorded = calibration_feeds(ckpt, cal, "int8 calibration", len(cal.photos) * len(cal.prompts), on_progress)
    feeds = {name: [{k: v.numpy() for k, v in feed.items()} for feed in recorded[name]] for name in calibration.submodules}
    del recorded
    return write_int8(onnx_dir, ckpt, feeds, calibration.settings, asdict(cal), on_progress=on_progress)
