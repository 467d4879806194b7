"""Commands that measure: bench, scaling, gpu-check, eval."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffsr.app.cli.common import bars, command, console, out, parse_ints, parse_precision, parse_size, writable
from diffsr.export.core.precision import Precision
from diffsr.runtime.backends.names import BACKENDS, SERVED


@command()
def bench(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder (onnxruntime, triton, FLOP counts)")] = None,
    backends: Annotated[str, typer.Option(help=f"comma-separated, of {','.join((*BACKENDS, SERVED))} "
                        f"({SERVED}-ensemble: the endpoint with the ensemble entry point)")] = f"torch,onnxruntime,{SERVED}",
    device: Annotated[str, typer.Option(help="where torch and onnxruntime run; on cuda, torch is eager FP16")] = "cpu",
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for the tensorrt backend")] = None,
    size: Annotated[str, typer.Option(help="LQ input size WIDTHxHEIGHT (x4 out)")] = "128x128",
    steps: Annotated[int, typer.Option()] = 20,
    runs: Annotated[int, typer.Option(help="timed runs per backend")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 1,
    concurrency: Annotated[str, typer.Option(help="triton: requests in flight, comma-separated")] = "1,2,4",
    triton_url: Annotated[Optional[str], typer.Option(help="a running server's HTTP host:port; else one is started")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write the records as JSON")] = None,
    plot_file: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG bar chart")] = None,
) -> None:
    """Per-stage latency (median, p95) of each backend, interleaved, with ratios against PyTorch."""
    from diffsr.app.cli import tables
    from diffsr.app.measure.bench import check_backends, run_bench, stage_flops
    from diffsr.app.measure.bench_report import plot
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.runtime.image import output_size

    wh, levels = parse_size(size), parse_ints(concurrency, "--concurrency")
    chosen = [b for b in backends.split(",") if b]
    check_backends(chosen)
    writable(json_file, plot_file)
    ckpt = open_checkpoint(checkpoint)
    output_size(wh[1], wh[0], ckpt.defaults.upscale)  # an unusable size fails now, not after loading every backend
    with console.status("bench") as status:
        records = run_bench(ckpt, onnx, chosen, wh, steps, runs, warmup, levels, triton_url,
                            say=lambda text: status.update(text), device=device, engines_dir=engines)
        flops = stage_flops(ckpt, onnx, wh) if onnx is not None else None
    title = (f"{ckpt.model.preset} {wh[0]}x{wh[1]} -> {4 * wh[0]}x{4 * wh[1]}, {steps} steps, CFG, {runs} runs; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    out.print(tables.bench(records, title, flops))
    for line in tables.bench_notes(records):
        out.print(line, highlight=False)
    if json_file is not None:
        json_file.write_text(json.dumps({"title": title, "flops": flops, "records": [r.to_json() for r in records]}, indent=2))
    if plot_file is not None:
        plot(records, plot_file, title)


@command()
def scaling(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder, for onnxruntime")] = None,
    backends: Annotated[str, typer.Option(help="comma-separated, of torch,onnxruntime")] = "torch,onnxruntime",
    cases: Annotated[str, typer.Option(help="LQ sizes WIDTHxHEIGHT or scikit-image photos at their own size")] = "128x128,256x256,512x512,coffee",
    steps: Annotated[int, typer.Option()] = 20,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write the records as JSON")] = None,
) -> None:
    """Seconds per output megapixel and peak RSS against image size, each run in a fresh process."""
    from diffsr.app.cli import tables
    from diffsr.app.measure.scaling import run_scaling

    writable(json_file)
    with console.status("scaling") as status:
        records = run_scaling(checkpoint, onnx, [b for b in backends.split(",") if b], [c for c in cases.split(",") if c],
                              steps, say=lambda text: status.update(text))
    title = f"{steps} steps, CFG; {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    out.print(tables.scaling(records, title))
    if json_file is not None:
        json_file.write_text(json.dumps([r.to_json() for r in records], indent=2))


@command("gpu-check")
def gpu_check(
    workdir: Annotated[Path, typer.Option(help="where checkpoints are made and kept")] = Path(".demo/gpu"),
    parity_preset: Annotated[str, typer.Option(help="preset of the parity checks (a CPU reference runs too)")] = "small",
    bench_preset: Annotated[str, typer.Option(help="preset of the benchmark")] = "sd15",
    runs: Annotated[int, typer.Option(help="timed runs per backend")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 1,
    engines: Annotated[Optional[Path], typer.Option(help="engines of `diffsr build-engines`, to include TensorRT")] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write the report as JSON")] = None,
) -> None:
    """On a GPU machine: parity of every GPU path against the CPU reference, the CUDA graph against eager
    steps, and the benchmark (eager FP16 PyTorch vs torch-cuda vs tensorrt) in one run; exit 1 on a breach."""
    from diffsr.app.cli import tables
    from diffsr.app.measure.gpu_check import check_gpu

    writable(json_file)
    with console.status("gpu-check") as status:
        report = check_gpu(workdir, parity_preset, bench_preset, runs, warmup, engines, say=lambda t: status.update(t))
    out.print(", ".join(f"{k}: {v}" for k, v in report.environment.items()), highlight=False, soft_wrap=True)
    out.print(tables.gpu_parity(report, parity_preset))
    out.print(tables.gpu_graph_line(report), highlight=False)
    out.print(tables.bench(report.bench, report.bench_title, None, base="torch"))
    for line in tables.bench_notes(report.bench):
        out.print(line, highlight=False)
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(), indent=2))
    if not report.passed:
        raise typer.Exit(code=1)


@command("eval")
def eval_cmd(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    hr: Annotated[Path, typer.Option(help="folder of ground-truth HR images")],
    lr: Annotated[Optional[Path], typer.Option(help="folder of their LR images (default: bicubic downscales of the HR)")] = None,
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder: the onnxruntime backend, the endpoint")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for the tensorrt backend")] = None,
    backends: Annotated[str, typer.Option(help=f"comma-separated, of {','.join((*BACKENDS, SERVED))} "
                        f"({SERVED}: the endpoint, a tritonserver started on --onnx)")] = "torch",
    precision: Annotated[str, typer.Option(help="comma-separated, of fp32,fp16,int8: the onnxruntime and tensorrt "
                                                "backends' (torch runs FP32, torch-cuda FP16, the endpoint FP32)")] = "fp32",
    scheduler: Annotated[Optional[str], typer.Option(help="default: the checkpoint's")] = None,
    steps: Annotated[Optional[int], typer.Option(help="default: the checkpoint's")] = None,
    tile: Annotated[Optional[int], typer.Option(help="tile side in latent cells (default: the checkpoint's)")] = None,
    color_fix: Annotated[Optional[str], typer.Option(help="adain, wavelet or none (default: the checkpoint's)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="default: the checkpoint's")] = None,
    limit: Annotated[Optional[int], typer.Option(help="only the first N images", min=1)] = None,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write every score as JSON")] = None,
    plot_file: Annotated[Optional[Path], typer.Option("--plot", help="write a PNG: bicubic | diffsr | HR crops")] = None,
    triton_url: Annotated[Optional[str], typer.Option(help=f"{SERVED}: a running server's HTTP host:port, serving "
                                                      "its own colour fix and tiling; else one is started")] = None,
) -> None:
    """PSNR and SSIM (Y channel, border cropped) against ground truth: bicubic first, then each backend."""
    from diffsr.app.cli import tables
    from diffsr.app.measure.quality import evaluate, load_pair, pair_images, picture, reference_of, rows_for
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.runtime.requests import check

    chosen = [b for b in backends.split(",") if b]
    precisions = [parse_precision(p) or Precision.FP32 for p in precision.split(",") if p]
    writable(json_file, plot_file)
    pairs = pair_images(hr, lr)[:limit]
    ckpt = open_checkpoint(checkpoint)
    config = ckpt.defaults.replace(scheduler=scheduler, steps=steps, tile=tile, color_fix=color_fix, seed=seed)
    check(ckpt.model, config, ckpt.scheduler_config, (1, 1))  # the settings, before any image or model loads
    scale = config.upscale
    rows = rows_for(ckpt, config, chosen, precisions, onnx, engines, triton_url)
    # the picture: bicubic and the first diffsr row, on the first four images
    shown, pictured, kept = list(rows)[:2], [p.name for p in pairs[:4]], {}

    def keep(label: str, name: str, image: Any) -> None:
        if plot_file is not None and label in shown and name in pictured:
            kept[(label, name)] = image

    with bars() as draw:
        scores = evaluate(pairs, rows, scale, on_progress=draw, keep=keep)
    title = (f"{ckpt.model.preset} on {hr} ({len(pairs)} images, x{scale}), {config.scheduler} {config.steps} steps; "
             f"Y channel, {scale} px border cropped")
    out.print(tables.quality(scores, title))
    if json_file is not None:
        ref = reference_of(scores)
        json_file.write_text(json.dumps({"title": title, "reference": ref.label if ref else None,
                                         "configs": [s.to_json() for s in scores]}, indent=2))
    if plot_file is not None:
        picture([(pair.name, [*((label, kept[(label, pair.name)]) for label in shown), ("HR", load_pair(pair, scale)[1])])
                 for pair in pairs[:4]], plot_file)
