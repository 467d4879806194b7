"""The command line's tables: reports (data) in, rich tables out. Nothing here computes a result."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from rich.table import Table

from diffsr.app.measure.bench import Record
from diffsr.app.measure.bench_report import memory_line, table_rows
from diffsr.app.measure.gpu_check import GRAPH_TOLERANCE, GpuReport
from diffsr.app.measure.parity import ParityReport
from diffsr.app.measure.quality import ConfigScore, reference_of
from diffsr.app.measure.scaling import ScalingRecord
from diffsr.export.core.precision import Precision
from diffsr.export.engines.budget import GIB, ORIN_MODULES_GIB, RUNTIME_RESERVE, EngineBudget, device_total
from diffsr.export.engines.metadata import EngineMeta

MIB = 1 << 20


def timings(timings: dict[str, float]) -> Table:
    table = Table()
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.3f}")
    return table


def demo(timings: dict[str, dict[str, float]], title: str) -> Table:
    table = Table(title=title)
    backends = list(timings)
    table.add_column("stage")
    for backend in backends:
        table.add_column(backend, justify="right")
    for stage in timings[backends[0]]:
        table.add_row(stage, *(f"{timings[b][stage]:.3f}" for b in backends))
    return table


def export(manifest: dict[str, Any], out: Path) -> Table:
    table = Table()
    for col in ("submodule", "precision", "file", "MB", "layers kept FP32 (see manifest)"):
        table.add_column(col, justify="right" if col == "MB" else "left")
    for name, entry in manifest["submodules"].items():
        for precision in ("fp32", "ort_fused", "fp16", "int8"):
            info = entry["fp32"].get(precision) if precision == "ort_fused" else entry.get(precision)
            if info is not None:
                files = [out / info["file"], out / (info["file"] + ".data")]
                mb = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
                ops = Counter(k["op_type"] for k in info.get("kept_fp32", []))
                kept = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) if precision == "fp16" else ""
                label = "fp32, fused for onnxruntime" if precision == "ort_fused" else precision
                table.add_row(name, label, info["file"], f"{mb:.1f}", kept)
    return table


def quantized(manifest: dict[str, Any]) -> Table:
    cal = manifest["int8_calibration"]
    table = Table(title=f"INT8 ({cal['method']}, {cal['percentile']:g}th percentile; {len(cal['photos'])} photos x "
                        f"{len(cal['prompts'])} prompts x {cal['steps']} steps at {cal['size']} px)")
    for col in ("submodule", "file", "INT8 layers", "kept higher precision"):
        table.add_column(col)
    for name in cal["submodules"]:
        info = manifest["submodules"][name]["int8"]
        reasons = Counter(e["reason"] for e in info["excluded"])
        table.add_row(name, info["file"], str(info["quantized_layers"]),
                      "; ".join(f"{reason} x{n}" for reason, n in reasons.most_common()))
    return table


def parity(report: ParityReport) -> Table:
    tol = report.tolerance
    table = Table(title=f"{report.precision}: rel <= {tol.rel:g}, PSNR >= {tol.psnr_db:g} dB")
    for col in ("submodule", "shape", "output", "max abs", "rel", "ok"):
        table.add_column(col)
    for o in report.outputs:
        table.add_row(o.submodule, o.shape, o.output, f"{o.max_abs:.3g}", f"{o.rel:.3g}", "yes" if o.passed else "NO")
    for i in report.images:
        table.add_row("pipeline", i.size, f"{i.photo} image", f"{i.max_abs}", f"{i.psnr_db:.2f} dB", "yes" if i.passed else "NO")
    return table


def engines(metas: dict[str, EngineMeta], out: Path, target: str) -> Table:
    env = next(iter(metas.values())).built_with
    table = Table(title=f"TensorRT {env.tensorrt}, {env.gpu}, target {target}")
    profile_col = "profile (min .. max of the first input)"
    for col in ("submodule", "plan MB", "scratch MB", "build s", profile_col):
        table.add_column(col, justify="left" if col in ("submodule", profile_col) else "right")
    for name, meta in metas.items():
        first = next(iter(meta.profile.values()))
        size = (out / f"{name}.plan").stat().st_size / 1e6
        table.add_row(name, f"{size:.1f}", f"{meta.device_memory_bytes / 1e6:.1f}", f"{meta.build_seconds:.1f}",
                      f"{first[0]} .. {first[2]}")
    return table


def bench(records: list[Record], title: str, flops: dict[str, float] | None, base: str = "torch") -> Table:
    table = Table(title=f"{title}\nmedian s (p95) and speed-up vs {base}")
    for col in ("stage", *(r.backend for r in records), "GFLOP"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in table_rows(records, flops, base):
        table.add_row(*row)
    return table


def bench_notes(records: list[Record]) -> list[str]:
    lines = [memory_line(records)]
    for rec in records:
        if rec.device_mib:
            lines.append(f"{rec.backend}: {rec.device_mib:.0f} MiB of GPU memory added by loading")
        for c in rec.concurrency:
            lines.append(f"{rec.backend} concurrency {c['concurrency']}: median {c['median_s']:.3f} s, "
                         f"p95 {c['p95_s']:.3f} s, {c['throughput_rps']:.3f} images/s")
    return lines


def gpu_parity(report: GpuReport, preset: str) -> Table:
    table = Table(title=f"parity, {preset}, 64x64 -> 256x256, 20 steps: GPU path vs CPU FP32 reference")
    for col in ("path", "PSNR dB", "max |diff|", ">= 30 dB"):
        table.add_column(col)
    for row in report.parity:
        table.add_row(row["path"], f"{row['psnr_db']:.2f}", str(row["max_abs"]), "yes" if row["passed"] else "NO")
    return table


def gpu_graph_line(report: GpuReport) -> str:
    return (f"CUDA graph vs eager steps (same runners): max |diff| {report.graph_max_abs} on uint8 "
            f"(<= {GRAPH_TOLERANCE} passes), {report.graph_captures} capture(s) for 2 requests")


def scaling(records: list[ScalingRecord], title: str) -> Table:
    """Seconds per output megapixel and peak RSS per case; the ratio is against the backend's first case."""
    table = Table(title=title)
    for col in ("backend", "input", "output", "tiles", "seconds", "s / MP", "x first", "peak RSS MiB"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    first: dict[str, float] = {}
    for r in records:
        base = first.setdefault(r.backend, r.seconds_per_mp)
        table.add_row(r.backend, "x".join(map(str, r.input)), "x".join(map(str, r.output)), str(r.tiles),
                      f"{r.seconds:.1f}", f"{r.seconds_per_mp:.2f}", f"{r.seconds_per_mp / base:.2f}", f"{r.peak_rss_mib:.0f}")
    return table


def budget(engines: list[EngineBudget], target: str) -> Table:
    table = Table(title=f"engines at the {target} target's largest shapes, MiB")
    for col in ("engine", "largest input", "weights FP16", "weights INT8", "scratch (bound)"):
        table.add_column(col, justify="left" if col in ("engine", "largest input") else "right")
    for e in engines:
        first = next(iter(e.shapes.values()))
        int8 = f"{e.weights_int8 / MIB:.1f}" if e.quantized else "(FP16)"
        table.add_row(e.submodule, "x".join(map(str, first)), f"{e.weights_fp16 / MIB:.1f}", int8, f"{e.activations / MIB:.1f}")
    return table


def budget_totals(engines: list[EngineBudget]) -> Table:
    table = Table(title=f"device total, GiB: all weights + the largest scratch + {RUNTIME_RESERVE / GIB:g} GiB runtime "
                        "(assumed), against Jetson Orin modules (GiB)")
    for col in ("precision", "engines", "total", *(f"Orin {gib}" for gib in ORIN_MODULES_GIB)):
        table.add_column(col, justify="right" if col == "total" else "center" if col.startswith("Orin") else "left")
    dropped = [e.submodule for e in engines if e.droppable]
    for precision in (Precision.FP16, Precision.INT8):
        for drop in (False, True) if dropped else (False,):
            total = device_total(engines, precision, drop)
            table.add_row(precision.value, "no " + ", ".join(dropped) if drop else "all", f"{total / GIB:.2f}",
                          *("fits" if total <= gib * GIB else "no" for gib in ORIN_MODULES_GIB))
    if dropped:  # the engines one stand-in replaces, together (the captioner's three)
        stand_ins: dict[str, list[str]] = {}
        for e in engines:
            if e.droppable:
                stand_ins.setdefault(e.droppable, []).append(e.submodule)
        table.caption = "; ".join(f"no {', '.join(names)}: {text}" for text, names in stand_ins.items())
    return table


def families(registered: dict[str, Any]) -> Table:
    """Each family's presets, its own request inputs, and which submodules run once per request, every step, last."""
    table = Table(title="model families (diffsr.json names one)")
    for col in ("family", "presets", "request inputs (besides the base ones)", "once per request (tiled*)",
                "every step", "decode", "schedulers"):
        table.add_column(col)
    from diffsr.runtime.schedulers import schedulers_for

    for name, family in registered.items():
        model = family(next(iter(family.presets.values())))
        s = model.stages
        inputs = ", ".join(f"{i.name} ({i.kind})" for i in model.family_inputs()) or "-"
        once = ", ".join(f"{o.submodule}{'*' if o.tiled else ''}" for o in s.once)
        table.add_row(name, ", ".join(family.presets), inputs, once, ", ".join(s.step), s.decode,
                      ", ".join(schedulers_for(dict(model.scheduler_config))))
    return table


def quality(scores: list[ConfigScore], title: str) -> Table:
    """Mean Y-PSNR and Y-SSIM per configuration, the difference to the reference row in dB."""
    ref = reference_of(scores)
    table = Table(title=title)
    for col in ("configuration", "PSNR-Y dB", "SSIM-Y", f"dB vs {ref.label if ref else '-'}", "s / image"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for s in scores:
        delta = f"{s.psnr_y - ref.psnr_y:+.3f}" if ref is not None and s is not ref else ""
        table.add_row(s.label, f"{s.psnr_y:.2f}", f"{s.ssim_y:.4f}", delta, f"{s.seconds / max(len(s.images), 1):.2f}")
    return table
