"""FP16 safety check: which layers must stay FP32, decided from activation ranges on real data.

1. `record_feeds` runs the real pipeline (PyTorch reference) over real photos and prompts, every
   timestep, and records what each submodule was fed.
2. `activation_ranges` replays those feeds through the FP32 ONNX graph in ONNX Runtime with every
   float intermediate exposed, and keeps the largest |value| each node produced and consumed.
3. `fp32_layers` applies the rules (overflow headroom, periodic arguments) and names each node it
   keeps FP32 with its observed range. Everything else goes FP16.

`fp16_check` runs the three over a `Calibration` (photos, prompts, steps, size); the export layer's
`write_fp16` then converts the graphs with those keep-lists.

TensorRT 11 builds FP16 only from such a graph (strongly typed: precision comes from ONNX types).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from diffsr.calib.data import PHOTOS, PROMPTS, photos
from diffsr.export.checkpoint import SUBMODULES, Checkpoint
from diffsr.export.config import Precision
from diffsr.export.errors import DiffsrError
from diffsr.export.fp16 import FP16_MAX, KeptLayer
from diffsr.export.progress import OnProgress, Progress, ignore
from diffsr.runtime.backends import load_runners
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.pipeline import Pipeline

log = logging.getLogger(__name__)

HEADROOM = 4.0  # values above FP16_MAX / HEADROOM leave too little room for an unseen input
PERIODIC_ARG = 4.0  # FP16 spacing reaches 0.004 rad at 4; sin/cos of larger arguments lose digits


@dataclass(frozen=True)
class Calibration:
    """The real data the FP16 check runs: each photo (size x size LQ) with each prompt, every timestep
    of `steps`. The default spans every timestep the sampler visits at its default 20 steps."""

    photos: tuple[str, ...] = PHOTOS[:3]
    prompts: tuple[str, ...] = PROMPTS[:2]
    steps: int = 20
    size: int = 64

    def __post_init__(self) -> None:
        unknown = [p for p in self.photos if p not in PHOTOS]
        if not self.photos or unknown:
            raise DiffsrError(f"calibration photos {list(self.photos)} must be one or more of {list(PHOTOS)}")
        if not self.prompts:
            raise DiffsrError("the FP16 check needs at least one calibration prompt")
        if not 1 <= self.steps <= 1000 or not 8 <= self.size <= 1024:
            raise DiffsrError(f"calibration steps={self.steps} (1 to 1000) or size={self.size} (8 to 1024) is out of range")


class Recorder(Runner):
    """Passes calls through to a runner and keeps a CPU copy of every feed."""

    def __init__(self, inner: Runner):
        super().__init__(inner.signature)
        self.inner, self.feeds = inner, []

    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        self.feeds.append({k: v.detach().cpu().clone() for k, v in feed.items()})
        return self.inner.infer(feed)


def record_feeds(
    ckpt: Checkpoint, runners: Mapping[str, Runner], images: Iterable[np.ndarray], prompts: Iterable[str],
    steps: int = 20, on_run: Callable[[], None] | None = None,
) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Every submodule's inputs over full pipeline runs: each image with each prompt, all timesteps."""
    recorders = {name: Recorder(r) for name, r in runners.items()}
    pipe = Pipeline(recorders, ckpt)
    prompts = list(prompts)
    for i, image in enumerate(images):
        for j, prompt in enumerate(prompts):
            pipe(image, ckpt.defaults.replace(prompt=prompt, steps=steps, seed=100 * i + j))
            if on_run is not None:
                on_run()
    return {name: r.feeds for name, r in recorders.items()}


def activation_ranges(onnx_path: Path, feeds: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """value name -> largest |value| over all feeds, for every float input and intermediate of the
    FP32 graph, read from the graph itself."""
    import onnxruntime as ort

    model = onnx.load(str(onnx_path))  # exported with inferred shapes: value_info holds every type
    graph_outputs = [o.name for o in model.graph.output]
    watched = [v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in watched)

    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ranges.onnx"
        onnx.save(model, str(path), save_as_external_data=True, location="ranges.onnx.data")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = graph_outputs + watched
        for feed in feeds:
            arrays = {k: v.numpy() for k, v in feed.items()}
            values = dict(zip(names, session.run(names, arrays))) | arrays
            for name, value in values.items():
                if value.dtype == np.float32 and value.size:
                    peak[name] = max(peak.get(name, 0.0), float(np.abs(value).max()))
    return peak


def fp32_layers(onnx_path: Path, peak: Mapping[str, float]) -> list[KeptLayer]:
    """The nodes that must stay FP32, each with why:
    - outputs within HEADROOM of FP16's largest value (or not finite): they would overflow;
    - Sin/Cos of arguments beyond PERIODIC_ARG, with every float node feeding them: FP16's spacing
      there is a visible fraction of a radian (the timestep embedding: t up to 999 has spacing 0.5)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    limit = FP16_MAX / HEADROOM
    kept: dict[str, KeptLayer] = {}
    for node in graph.node:
        out_peak = max((peak.get(o, 0.0) for o in node.output), default=0.0)
        if not np.isfinite(out_peak) or out_peak > limit:
            reason = f"outputs up to {out_peak:.4g}, above FP16's {FP16_MAX:g} / {HEADROOM:g} headroom"
            kept[node.name] = KeptLayer(node.name, node.op_type, out_peak, reason)
        if node.op_type in ("Sin", "Cos") and peak.get(node.input[0], 0.0) > PERIODIC_ARG:
            arg = peak[node.input[0]]
            reason = f"periodic op on arguments up to {arg:.4g}: FP16 spacing there is {_fp16_spacing(arg):.3g}"
            stack = [node]
            while stack:
                n = stack.pop()
                if n.name not in kept:
                    kept[n.name] = KeptLayer(n.name, n.op_type, arg, reason if n is node else f"feeds {node.name}: {reason}")
                    stack.extend(producer[i] for i in n.input if i in producer and i in peak)
    return sorted(kept.values(), key=lambda k: k.node)


def _fp16_spacing(x: float) -> float:
    return float(np.spacing(np.float16(min(x, FP16_MAX))))


def fp16_check(
    ckpt: Checkpoint, onnx_dir: Path, calibration: Calibration = Calibration(), on_progress: OnProgress = ignore,
) -> dict[str, list[KeptLayer]]:
    """Run the reference pipeline over the calibration data, replay every submodule's recorded inputs
    through its FP32 graph in `onnx_dir`; return, per submodule, the layers to keep FP32."""
    cal = calibration
    runs = len(cal.photos) * len(cal.prompts)
    total, done = runs + len(SUBMODULES), 0

    def finished_run() -> None:
        nonlocal done
        done += 1
        on_progress(Progress("fp16 check", f"calibration run {done}/{runs}", done, total))

    on_progress(Progress("fp16 check", "calibration runs", 0, total))
    feeds = record_feeds(ckpt, load_runners("torch", ckpt), photos((cal.size, cal.size), cal.photos), cal.prompts,
                         cal.steps, on_run=finished_run)
    kept = {}
    for i, name in enumerate(SUBMODULES):
        path = onnx_dir / Precision.FP32.filename(name)
        kept[name] = fp32_layers(path, activation_ranges(path, feeds[name]))
        for layer in kept[name]:
            log.warning("%s: keeping %s (%s) in FP32: %s", name, layer.node, layer.op_type, layer.reason)
        on_progress(Progress("fp16 check", f"{name} ranges", runs + i + 1, total))
    return kept
