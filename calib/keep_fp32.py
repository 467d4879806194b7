"""Deciding which layers must stay FP32 in the FP16 graphs, from activation ranges on real data.

1. `calib.record` runs the real pipeline (PyTorch reference) over real photos and prompts, every
   timestep, and records what each submodule was fed.
2. `activation_ranges` replays those feeds through the FP32 ONNX graph in ONNX Runtime with every
   float intermediate exposed, and keeps the largest |value| each node produced and consumed.
3. `fp32_layers` applies the rules (overflow headroom, periodic arguments) and names each node it
   keeps FP32 with its observed range. Everything else goes FP16.

4. The submodules the family names as overflow-prone (`ModelFamily.force_upcast`: SD's two made of a
   VAE whose config says `force_upcast`, diffusers' mark of a VAE that overflows in FP16, SDXL's) stay
   entirely FP32 unless calibration proves FP16 safe: the FP16 graph with the kept layers, run on the
   recorded inputs, finite and within PROOF_REL of the FP32 graph.

`fp16_check` runs them over a `Calibration` (photos, prompts, steps, size); the export layer's
`write_fp16` then converts the graphs with those keep-lists. `export_graphs` is the whole of `diffsr export`:
the FP32 graphs, and with a calibration the check and the FP16 graphs (each step kept where up to date).

TensorRT 11 builds FP16 only from such a graph (strongly typed: precision comes from ONNX types).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from diffsr.calib.record import Calibration, calibration_feeds
from diffsr.export.core.memory import return_freed_memory
from diffsr.export.core.precision import Precision
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.export.graphs.exporter import export_onnx, write_fp16
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.graphs.onnx_export import DEFAULT_OPSET
from diffsr.export.graphs.to_fp16 import FP16_MAX, KeptLayer, fp16_from_fp32
from diffsr.export.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)

HEADROOM = 4.0  # values above FP16_MAX / HEADROOM leave too little room for an unseen input
PERIODIC_ARG = 4.0  # FP16 spacing reaches 0.004 rad at 4; sin/cos of larger arguments lose digits
PROOF_REL = 1e-2  # an upcast submodule goes FP16 only if every recorded output is within this (parity's FP16 bound)


def activation_ranges(onnx_path: Path, feeds: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """value name -> largest |value| over all feeds, for every float input, intermediate and output of
    the FP32 graph. The graph computes each value's max |x| itself (Abs, ReduceMax: a scalar output
    per value), so ONNX Runtime frees every intermediate as usual and a replay holds the weights and one
    inference's activations, not every activation at once."""
    import onnxruntime as ort

    # exported with inferred shapes, value_info holds every type; the weights stay where they are
    model = onnx.load(str(onnx_path), load_external_data=False)
    is_float = {v.name for v in [*model.graph.value_info, *model.graph.output]
                if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    floats: list[str] = []
    nodes = []
    for node in model.graph.node:  # each reduction right after its producer: the value is freed as usual
        nodes.append(node)
        for name in node.output:
            if name in is_float:
                i = len(floats)
                floats.append(name)
                nodes += [onnx.helper.make_node("Abs", [name], [f"__abs_{i}"], name=f"__abs_{i}"),
                          onnx.helper.make_node("ReduceMax", [f"__abs_{i}"], [f"__absmax_{i}"], keepdims=0,
                                                name=f"__absmax_{i}")]
                model.graph.output.append(onnx.helper.make_tensor_value_info(f"__absmax_{i}", onnx.TensorProto.FLOAT, []))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    fetch = [f"__absmax_{i}" for i in range(len(floats))]

    peak: dict[str, float] = {}
    # beside the original, so that its external data (located relative to the model file) is found
    with tempfile.NamedTemporaryFile(dir=onnx_path.parent, prefix=".ranges-", suffix=".onnx") as tmp:
        onnx.save(model, tmp.name)
        session = ort.InferenceSession(tmp.name, _lean_options(), providers=["CPUExecutionProvider"])
        for feed in feeds:
            arrays = {k: v.numpy() for k, v in feed.items()}
            values = dict(zip(floats, (float(v) for v in session.run(fetch, arrays))))
            values |= {k: float(np.abs(v).max()) for k, v in arrays.items() if v.dtype == np.float32 and v.size}
            for name, value in values.items():
                peak[name] = max(peak.get(name, 0.0), value)
    return peak


def _lean_options() -> Any:
    """ONNX Runtime sessions for checking, not serving: the graph as exported (no optimisation: the
    layout transformer would hold reordered copies of every convolution's weights), no pre-packed
    copies, no memory arena holding freed blocks, and nodes run in priority order, which runs the range
    reductions as soon as their values exist (the default order keeps thousands of activations alive
    for them: SDXL's ControlNet + UNet replay peaked at 23 GiB, 15 with this order)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def fp32_layers(onnx_path: Path, peak: Mapping[str, float]) -> list[KeptLayer]:
    """The nodes that must stay FP32, each with why:
    - outputs within HEADROOM of FP16's largest value (or not finite): they would overflow;
    - inputs that large: an FP16 node would receive them cast to FP16, that is as infinities;
    - Sin/Cos of arguments beyond PERIODIC_ARG, with every float node feeding them: FP16's spacing
      there is a visible fraction of a radian (the timestep embedding: t up to 999 has spacing 0.5)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    limit = FP16_MAX / HEADROOM
    kept: dict[str, KeptLayer] = {}
    for node in graph.node:
        out_peak = max((peak.get(o, 0.0) for o in node.output), default=0.0)
        in_peak = max((peak.get(i, 0.0) for i in node.input), default=0.0)
        if not np.isfinite(out_peak) or out_peak > limit:
            reason = f"outputs up to {out_peak:.4g}, above FP16's {FP16_MAX:g} / {HEADROOM:g} headroom"
            kept[node.name] = KeptLayer(node.name, node.op_type, out_peak, reason)
        elif not np.isfinite(in_peak) or in_peak > limit:
            reason = f"takes inputs up to {in_peak:.4g}, above FP16's {FP16_MAX:g} / {HEADROOM:g} headroom"
            kept[node.name] = KeptLayer(node.name, node.op_type, in_peak, reason)
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
    names = ckpt.model.submodules
    total = runs + len(names)
    paths = verified_files(onnx_dir, ckpt, Precision.FP32)  # this checkpoint's graphs, unchanged
    feeds = calibration_feeds(ckpt, cal, "fp16 check", total, on_progress)
    kept = {}
    upcast = ckpt.model.force_upcast(ckpt.path)
    for i, name in enumerate(names):
        path = paths[name]
        kept[name] = fp32_layers(path, activation_ranges(path, feeds[name]))
        return_freed_memory()  # what the last session freed, before the next one loads
        if name in upcast:
            error = fp16_error(path, kept[name], feeds[name])
            return_freed_memory()
            if not error <= PROOF_REL:
                reason = (f"the model marks it as overflowing in FP16 (force_upcast) and FP16 is not proven safe: relative error "
                          f"{error:.3g} > {PROOF_REL:g} on the calibration data")
                log.warning("%s: keeping the whole graph in FP32: %s", name, reason)
                kept[name] = all_layers(path, reason)
                on_progress(Progress("fp16 check", f"{name} ranges", runs + i + 1, total))
                continue
        for layer in kept[name]:
            log.warning("%s: keeping %s (%s) in FP32: %s", name, layer.node, layer.op_type, layer.reason)
        on_progress(Progress("fp16 check", f"{name} ranges", runs + i + 1, total))
    return kept


def export_graphs(ckpt: Checkpoint, out: Path, calibration: Calibration | None = None, opset: int = DEFAULT_OPSET,
                  ort_fusions: bool = True, on_progress: OnProgress = ignore) -> dict[str, Any]:
    """`diffsr export`: every submodule's FP32 graph (`export_onnx`), and with a `calibration` the FP16 graphs of
    its check, unless the folder has them already, from these FP32 graphs and this calibration; returns the
    manifest."""
    manifest = export_onnx(ckpt, out, opset, on_progress=on_progress, ort_fusions=ort_fusions)
    if calibration is None:
        return manifest
    settings = json.loads(json.dumps(dataclasses.asdict(calibration)))  # as the manifest holds it
    if manifest.get("fp16_calibration") != settings or not all(
            Precision.FP16.value in m for m in manifest["submodules"].values()):
        kept = fp16_check(ckpt, out, calibration, on_progress=on_progress)
        manifest = write_fp16(out, ckpt, kept, settings, on_progress=on_progress)
    return manifest


def fp16_error(onnx_path: Path, keep: list[KeptLayer], feeds: list[dict[str, torch.Tensor]], limit: int = 8) -> float:
    """The largest relative error over the outputs of up to `limit` recorded feeds, of the FP16 graph with
    `keep` in FP32 against the FP32 graph; infinity where the FP16 graph gives a NaN or infinity."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        large = onnx_path.with_name(onnx_path.name + ".data").is_file()
        half = fp16_from_fp32(onnx_path, Path(tmp) / "half.onnx", {k.node for k in keep}, external_data=large)
        full_session = ort.InferenceSession(str(onnx_path), _lean_options(), providers=["CPUExecutionProvider"])
        half_session = ort.InferenceSession(str(half), _lean_options(), providers=["CPUExecutionProvider"])
        worst = 0.0
        for feed in feeds[:limit]:
            arrays = {k: v.numpy() for k, v in feed.items()}
            for want, got in zip(full_session.run(None, arrays), half_session.run(None, arrays)):
                if not np.isfinite(got).all():
                    return float("inf")
                diff = got.astype(np.float64) - want
                worst = max(worst, float(np.linalg.norm(diff) / max(np.linalg.norm(want.astype(np.float64)), 1e-30)))
    return worst


def all_layers(onnx_path: Path, reason: str) -> list[KeptLayer]:
    """Every node of a graph, kept FP32 for one reason."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [KeptLayer(n.name, n.op_type, 0.0, reason) for n in graph.node]
