"""The `diffsr` command: parse, build a config, call the library, print."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from export.errors import DiffsrError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Deploy a diffusion super-resolution model.")
console = Console(stderr=True)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)  # one line, never wrapped
    raise typer.Exit(code=2)


def _print_timings(timings: dict[str, float], title: str) -> None:
    table = Table()
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in timings.items():
        table.add_row(stage, f"{seconds:.3f}")
    console.print(title, soft_wrap=True, highlight=False)
    console.print(table)


def _upscale(input_rgb, checkpoint: Path, backend: str, overrides: dict, out: Path, onnx: Path | None = None,
             precision: str | None = None, device: str | None = None, engines: Path | None = None,
             cuda_graph: bool | None = None):
    from export.checkpoint import open_checkpoint
    from runtime.backends import load_pipeline
    from runtime.image import output_size, save_image

    ckpt = open_checkpoint(checkpoint)
    config = ckpt.defaults.replace(**overrides)
    output_size(input_rgb.shape[0], input_rgb.shape[1], config.upscale)  # fail before loading weights
    pipe = load_pipeline(backend, ckpt, device, onnx, _precision(precision), engines, cuda_graph)
    columns = (TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("denoise", total=config.steps)
        result = pipe(input_rgb, config, on_step=lambda done, total: progress.update(task, completed=done))
    save_image(result.image, out)
    return result


def _precision(value: str | None):
    from export.config import Precision

    if value is None:
        return None
    if value not in {p.value for p in Precision}:
        raise DiffsrError(f"precision {value!r} is not supported; choose one of {[p.value for p in Precision]}")
    return Precision(value)


@app.command()
def init(
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to create")],
    preset: Annotated[str, typer.Option(help="tiny, small or sd15")] = "tiny",
    seed: Annotated[int, typer.Option(help="weights seed: same seed, same bytes")] = 0,
) -> None:
    """Write a seeded random-weight checkpoint of a preset."""
    from export.checkpoint import init_checkpoint

    try:
        init_checkpoint(preset, seed, out)
    except DiffsrError as e:
        _fail(str(e))
    console.print(f"wrote {preset} checkpoint (seed {seed}) to {out}")


@app.command()
def upscale(
    image: Annotated[Path, typer.Argument(help="low-quality input image (any format PIL reads)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output PNG")],
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    prompt: Annotated[Optional[str], typer.Option()] = None,
    negative_prompt: Annotated[Optional[str], typer.Option()] = None,
    steps: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    guidance: Annotated[Optional[float], typer.Option(help="CFG scale; 1.0 turns CFG off")] = None,
    start: Annotated[Optional[str], typer.Option(help="noise or lq")] = None,
    color_fix: Annotated[Optional[str], typer.Option(help="adain or none")] = None,
    backend: Annotated[str, typer.Option(help="torch, torch-cuda, onnxruntime or tensorrt")] = "torch",
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder, for --backend onnxruntime (tensorrt: checked against)")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for --backend tensorrt")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 or fp16 (default: the backend's)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N] (default: the backend's)")] = None,
    cuda_graph: Annotated[Optional[bool], typer.Option("--cuda-graph/--no-cuda-graph",
                          help="replay each denoising step as a CUDA graph (default: on for torch-cuda, tensorrt)")] = None,
) -> None:
    """Upscale one image x4."""
    from runtime.image import load_image

    overrides = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, seed=seed,
                     guidance_scale=guidance, start=start, color_fix=color_fix)
    try:
        result = _upscale(load_image(image), checkpoint, backend, overrides, out, onnx, precision, device, engines,
                          cuda_graph)
    except DiffsrError as e:
        _fail(str(e))
    h, w = result.image.shape[:2]
    _print_timings(result.timings, f"{image} -> {out} ({w}x{h}, {backend})")


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="checkpoint preset to create if absent")] = "tiny",
    photo: Annotated[str, typer.Option(help="a skimage.data photo")] = "astronaut",
    serve: Annotated[bool, typer.Option(help="end by serving it from Triton and upscaling through the endpoint")] = True,
) -> None:
    """Upscale a real photo 128 -> 512 with PyTorch, ONNX Runtime and a Triton endpoint."""
    from runtime.demo import run_demo

    try:
        with console.status("demo") as status:
            result = run_demo(preset, photo, serve, say=lambda text: status.update(text))
    except DiffsrError as e:
        _fail(str(e))
    table = Table(title=f"{result.lq_path} (128x128) -> 512x512, {preset} preset, seconds")
    backends = list(result.timings)
    table.add_column("stage")
    for backend in backends:
        table.add_column(backend, justify="right")
    for stage in result.timings[backends[0]]:
        table.add_row(stage, *(f"{result.timings[b][stage]:.3f}" for b in backends))
    console.print(table)
    for backend, path in result.outputs.items():
        console.print(f"{backend:>12}: {path}", highlight=False)
    if result.endpoint_latency_s is not None:
        console.print(f"Triton endpoint: {result.endpoint_latency_s:.3f} s end to end (HTTP); "
                      f"max |endpoint - onnxruntime| = {result.endpoint_max_abs_diff} on uint8", highlight=False)


def _demo_png(name: str = "astronaut") -> bytes:
    """The demo photo at the benchmark size (128x128), PNG-encoded."""
    import io

    from PIL import Image

    from calib.data import photo

    buf = io.BytesIO()
    Image.fromarray(photo(name, (128, 128))).save(buf, format="PNG")
    return buf.getvalue()


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DiffsrError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 128x96") from None
    return w, h


@app.command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the ONNX files and manifest.json")],
    opset: Annotated[int, typer.Option(help="ONNX opset (TensorRT 10 reads 9 to 20)")] = 18,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write FP16 graphs, layers kept FP32 by the FP16 check")] = False,
) -> None:
    """Export every submodule to ONNX, checked, linted for TensorRT, with a manifest."""
    from collections import Counter

    from export.checkpoint import SUBMODULES
    from export.exporter import export_checkpoint

    total = len(SUBMODULES) * (2 if fp16 else 1)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("exporting", total=total)

        def done(what: str) -> None:
            if what.endswith(("fp32", "fp16")):
                progress.update(task, advance=1, description=f"exported {what}")
            else:
                progress.update(task, description=what)

        try:
            manifest = export_checkpoint(checkpoint, out, opset=opset, fp16=fp16, on_progress=done)
        except DiffsrError as e:
            _fail(str(e))
    table = Table()
    for col in ("submodule", "precision", "file", "MB", "layers kept FP32 (see manifest)"):
        table.add_column(col, justify="right" if col == "MB" else "left")
    for name, entry in manifest["submodules"].items():
        for precision in ("fp32", "fp16"):
            if precision in entry:
                info = entry[precision]
                files = [out / info["file"], out / (info["file"] + ".data")]
                mb = sum(f.stat().st_size for f in files if f.is_file()) / 1e6
                ops = Counter(k["op_type"] for k in info.get("kept_fp32", []))
                kept = ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) if precision == "fp16" else ""
                table.add_row(name, precision, info["file"], f"{mb:.1f}", kept)
    console.print(table)
    console.print(f"manifest: {out / 'manifest.json'}", soft_wrap=True, highlight=False)


@app.command()
def parity(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    onnx: Annotated[Path, typer.Option(help="folder made by `diffsr export`")],
    precision: Annotated[str, typer.Option(help="fp32 or fp16")] = "fp32",
    size: Annotated[str, typer.Option(help="LQ size of the end-to-end check, WIDTHxHEIGHT")] = "128x96",
    steps: Annotated[int, typer.Option(help="sampler steps of the end-to-end check")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
) -> None:
    """ONNX Runtime against PyTorch per submodule (min, opt, odd shapes) and end to end; exit 1 on a breach."""
    import json

    from export.checkpoint import open_checkpoint
    from export.config import Precision
    from export.parity import check_parity

    try:
        chosen = _precision(precision) or Precision.FP32
        ckpt = open_checkpoint(checkpoint)
        ckpt.defaults.replace(steps=steps)  # validates
        with console.status("running parity checks"):
            report = check_parity(ckpt, onnx, chosen, _size(size), steps)
    except DiffsrError as e:
        _fail(str(e))
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        tol = report.tolerance
        table = Table(title=f"{precision}: rel <= {tol.rel:g}, PSNR >= {tol.psnr_db:g} dB")
        for col in ("submodule", "shape", "output", "max abs", "rel", "ok"):
            table.add_column(col)
        for o in report.outputs:
            table.add_row(o.submodule, o.shape, o.output, f"{o.max_abs:.3g}", f"{o.rel:.3g}", "yes" if o.passed else "NO")
        for i in report.images:
            table.add_row("pipeline", i.size, "image", f"{i.max_abs}", f"{i.psnr_db:.2f} dB", "yes" if i.passed else "NO")
        Console().print(table)
    if not report.passed:
        raise typer.Exit(code=1)


@app.command("build-engines")
def build_engines_cmd(
    onnx: Annotated[Path, typer.Option(help="folder made by `diffsr export --fp16`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for <submodule>.plan and .json")],
    target: Annotated[str, typer.Option(help="shape ranges: server or edge")] = "server",
    timing_cache: Annotated[Optional[Path], typer.Option(help="tactic timing cache to read and extend")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="largest batch of images (default: the target's)")] = None,
    static: Annotated[bool, typer.Option("--static", help="one shape, the target's opt: fastest, CUDA-graph friendly")] = False,
    opt_level: Annotated[int, typer.Option(help="builder optimisation level 0..5")] = 3,
) -> None:
    """Build one TensorRT FP16 engine per submodule (strongly typed), with its metadata."""
    from export.checkpoint import SUBMODULES
    from export.tensorrt_build import build_engines

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("building", total=len(SUBMODULES))

        def done(what: str) -> None:
            finished = what.startswith("built") or what.endswith("up to date")
            progress.update(task, advance=1 if finished else 0, description=what)

        try:
            metas = build_engines(onnx, out, target, timing_cache, max_batch, static, opt_level, on_progress=done)
        except DiffsrError as e:
            _fail(str(e))
    env = next(iter(metas.values())).built_with
    table = Table(title=f"TensorRT {env.tensorrt}, {env.gpu}, target {target}")
    for col in ("submodule", "plan MB", "scratch MB", "build s", "profile (min .. max of the first input)"):
        table.add_column(col, justify="left" if col in ("submodule", "profile (min .. max of the first input)") else "right")
    for name, meta in metas.items():
        first = next(iter(meta.profile.values()))
        size = (out / f"{name}.plan").stat().st_size / 1e6
        table.add_row(name, f"{size:.1f}", f"{meta.device_memory_bytes / 1e6:.1f}", f"{meta.build_seconds:.1f}",
                      f"{first[0]} .. {first[2]}")
    console.print(table)


@app.command("triton-repo")
def triton_repo(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder (tokenizer, defaults, model widths)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model repository to create")],
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder, for the onnxruntime flavour")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for the tensorrt flavour")] = None,
    flavour: Annotated[str, typer.Option(help="onnxruntime or tensorrt")] = "onnxruntime",
    sampler_instances: Annotated[int, typer.Option(help="requests denoised at once")] = 2,
) -> None:
    """Generate the Triton model repository (ensemble, BLS sampler, per-submodule models)."""
    from export.checkpoint import open_checkpoint
    from triton_models.repository import ServingOptions, build_repository

    try:
        configs = build_repository(open_checkpoint(checkpoint), onnx, out, flavour, engines,
                                   ServingOptions(sampler_instances=sampler_instances))
    except DiffsrError as e:
        _fail(str(e))
    console.print(f"wrote {len(configs)} models ({flavour}) to {out}: {', '.join(configs)}", soft_wrap=True)


@app.command()
def serve(
    repo: Annotated[Path, typer.Option(help="model repository made by `diffsr triton-repo`")],
    http_port: Annotated[int, typer.Option()] = 8000,
    grpc_port: Annotated[int, typer.Option()] = 8001,
    metrics_port: Annotated[int, typer.Option()] = 8002,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    system: Annotated[bool, typer.Option("--system", help="use the tritonserver on PATH")] = False,
) -> None:
    """Run Triton on the repository until Ctrl-C, forwarding its log."""
    import signal

    from triton_models.server import Ports, TritonServer

    server = TritonServer(repo, Ports(http_port, grpc_port, metrics_port), host, system,
                          log_line=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    try:
        server.start()
    except DiffsrError as e:
        _fail(str(e))
    try:
        warm = server.warm_up(_demo_png())
    except DiffsrError as e:
        server.stop()
        _fail(f"warm-up request failed: {e}")
    console.print(f"warm-up at 128x128 -> 512x512: {warm:.2f} s", highlight=False)
    console.print(f"serving diffsr: http {server.http_url}, grpc {server.grpc_url}; Ctrl-C stops", soft_wrap=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        server.process.wait()
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    finally:
        server.stop()


@app.command()
def client(
    image: Annotated[Path, typer.Argument(help="input image")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output PNG")],
    url: Annotated[str, typer.Option(help="host:port of the HTTP or gRPC endpoint")] = "127.0.0.1:8000",
    protocol: Annotated[str, typer.Option(help="http or grpc")] = "http",
    prompt: Annotated[Optional[str], typer.Option()] = None,
    negative_prompt: Annotated[Optional[str], typer.Option()] = None,
    steps: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    guidance: Annotated[Optional[float], typer.Option()] = None,
) -> None:
    """Upscale one image through a running endpoint and print the latency."""
    from runtime.triton_client import TritonClient

    try:
        if not image.is_file():
            raise DiffsrError(f"input image not found: {image}")
        result = TritonClient(url, protocol).upscale(image.read_bytes(), prompt=prompt, negative_prompt=negative_prompt,
                                                    steps=steps, seed=seed, guidance_scale=guidance)
        out.write_bytes(result.png)
    except DiffsrError as e:
        _fail(str(e))
    console.print(f"{image} -> {out} via {protocol}://{url}: {result.latency_s:.3f} s", soft_wrap=True, highlight=False)


@app.command()
def bench(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder (onnxruntime, triton, FLOP counts)")] = None,
    backends: Annotated[str, typer.Option(help="comma-separated: torch,torch-cuda,onnxruntime,tensorrt,triton")] = "torch,onnxruntime,triton",
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
    import json
    import platform

    from export.checkpoint import open_checkpoint
    from runtime.bench import plot, run_bench, stage_flops, table_rows

    try:
        ckpt = open_checkpoint(checkpoint)
        wh = _size(size)
        levels = tuple(int(c) for c in concurrency.split(",") if c)
        with Progress(TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True) as progress:
            task = progress.add_task("bench")
            records = run_bench(ckpt, onnx, [b for b in backends.split(",") if b], wh, steps, runs, warmup, levels,
                                triton_url, on_progress=lambda text: progress.update(task, description=text),
                                device=device, engines_dir=engines)
        flops = stage_flops(ckpt, onnx, wh) if onnx is not None else None
    except (DiffsrError, ValueError) as e:
        _fail(str(e))
    title = (f"{ckpt.model.preset} {wh[0]}x{wh[1]} -> {4 * wh[0]}x{4 * wh[1]}, {steps} steps, CFG, {runs} runs; "
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    table = Table(title=f"{title}\nmedian s (p95) and speed-up vs torch")
    for col in ("stage", *(r.backend for r in records), "GFLOP"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for row in table_rows(records, flops):
        table.add_row(*row)
    Console().print(table)
    for rec in records:
        if rec.device_mb:
            Console().print(f"{rec.backend}: {rec.device_mb:.0f} MiB of GPU memory added by loading", highlight=False)
        for c in rec.concurrency:
            Console().print(f"{rec.backend} concurrency {c['concurrency']}: median {c['median_s']:.3f} s, "
                            f"p95 {c['p95_s']:.3f} s, {c['throughput_rps']:.3f} images/s", highlight=False)
    if json_file is not None:
        json_file.write_text(json.dumps({"title": title, "flops": flops, "records": [r.to_json() for r in records]}, indent=2))
    if plot_file is not None:
        plot(records, plot_file, title)


@app.command("gpu-check")
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
    import json

    from runtime.bench import table_rows
    from runtime.gpu_check import GRAPH_TOLERANCE, check_gpu

    try:
        with console.status("gpu-check") as status:
            report = check_gpu(workdir, parity_preset, bench_preset, runs, warmup, engines,
                               say=lambda text: status.update(text))
    except DiffsrError as e:
        _fail(str(e))
    out = Console()
    out.print(", ".join(f"{k}: {v}" for k, v in report.environment.items()), highlight=False, soft_wrap=True)
    table = Table(title=f"parity, {parity_preset}, 64x64 -> 256x256, 20 steps: GPU path vs CPU FP32 reference")
    for col in ("path", "PSNR dB", "max |diff|", ">= 30 dB"):
        table.add_column(col)
    for row in report.parity:
        table.add_row(row["path"], f"{row['psnr_db']:.2f}", str(row["max_abs"]), "yes" if row["passed"] else "NO")
    out.print(table)
    out.print(f"CUDA graph vs eager steps (same runners): max |diff| {report.graph_max_abs} on uint8 "
              f"(<= {GRAPH_TOLERANCE} passes), {report.graph_captures} capture(s) for 2 requests", highlight=False)
    bench = Table(title=f"{report.bench_title}\nmedian s (p95) and speed-up vs eager FP16 PyTorch")
    for col in ("stage", *(r.backend for r in report.bench)):
        bench.add_column(col, justify="left" if col == "stage" else "right")
    for row in table_rows(report.bench):
        bench.add_row(*row[:-1])
    out.print(bench)
    for rec in report.bench:
        out.print(f"{rec.backend}: {rec.device_mb:.0f} MiB of GPU memory added by loading", highlight=False)
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(), indent=2))
    if not report.passed:
        raise typer.Exit(code=1)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(app())


if __name__ == "__main__":
    main()
