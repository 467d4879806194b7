"""The `diffsr` command: parse, build a config, call the library, print.

Every command is registered through `command`, the one error boundary: a `DiffsrError` (anything
the user can cause and fix) or an `OSError` on a path becomes one line on stderr and exit code 2.
Output paths are checked before the work that ends in writing them. Commands import what they run
inside their bodies, so `diffsr --help` starts without loading torch. Long work reports `Progress`
events, drawn as bars by `Bars`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from diffsr.export.model.config import PRESETS, Precision
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import require_writable
from diffsr.export.core.progress import Progress
from diffsr.runtime.backends.names import BACKENDS, SERVED

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Deploy a diffusion super-resolution model.")
console = Console(stderr=True)  # messages, progress and errors; results that scripts read go to stdout
out = Console()
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)  # one line
    raise typer.Exit(code=2)


def command(name: str | None = None) -> Callable[[F], F]:
    """Register a command behind the one error boundary."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except DiffsrError as e:
                fail(str(e))
            except OSError as e:  # a path the user gave: missing, unwritable, full disk
                where = f": {e.filename}" if e.filename else ""
                fail(f"{e.strerror or e}{where}")

        app.command(name)(guarded)
        return fn

    return register


class Bars:
    """Draws `Progress` events: one bar per task, advanced by the events' counts."""

    def __init__(self, progress: RichProgress):
        self.progress, self.tasks = progress, {}

    def __call__(self, event: Progress) -> None:
        if event.task not in self.tasks:
            self.tasks[event.task] = self.progress.add_task(event.task, total=event.total)
        task: TaskID = self.tasks[event.task]
        self.progress.update(task, completed=event.done, total=event.total, description=f"{event.task}: {event.item}")


@contextmanager
def bars() -> Iterator[Bars]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with RichProgress(*columns, console=console, transient=True) as progress:
        yield Bars(progress)


def parse_size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height), both positive."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DiffsrError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 128x96") from None
    if w < 1 or h < 1:
        raise DiffsrError(f"size {text!r} must be at least 1x1 pixels")
    return w, h


def parse_precision(value: str | None) -> Precision | None:
    if value is None:
        return None
    if value not in {p.value for p in Precision}:
        raise DiffsrError(f"precision {value!r} is not supported; choose one of {[p.value for p in Precision]}")
    return Precision(value)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DiffsrError(f"{what} {text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None


def writable(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            require_writable(path)


@command()
def init(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder to create")],
    preset: Annotated[str, typer.Option(help=", ".join(PRESETS))] = "tiny",
    seed: Annotated[int, typer.Option(help="weights seed: same seed, same bytes")] = 0,
) -> None:
    """Write a seeded random-weight checkpoint of a preset."""
    from diffsr.export.model.random_init import init_checkpoint

    with bars() as draw:
        init_checkpoint(preset, seed, out_dir, on_progress=draw)
    console.print(f"wrote {preset} checkpoint (seed {seed}) to {out_dir}", highlight=False)


@command()
def upscale(
    image: Annotated[Path, typer.Argument(help="low-quality input image (any format PIL reads)")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="output PNG")],
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    prompt: Annotated[Optional[str], typer.Option()] = None,
    negative_prompt: Annotated[Optional[str], typer.Option()] = None,
    steps: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    guidance: Annotated[Optional[float], typer.Option(help="CFG scale; 1.0 turns CFG off")] = None,
    start: Annotated[Optional[str], typer.Option(help="noise or lq")] = None,
    color_fix: Annotated[Optional[str], typer.Option(help="adain or none")] = None,
    backend: Annotated[str, typer.Option(help=", ".join(BACKENDS))] = "torch",
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder, for --backend onnxruntime (tensorrt: checked against)")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for --backend tensorrt")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 or fp16 (default: the backend's)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N] (default: the backend's)")] = None,
    cuda_graph: Annotated[Optional[bool], typer.Option("--cuda-graph/--no-cuda-graph",
                          help="replay each denoising step as a CUDA graph (default: on for torch-cuda, tensorrt)")] = None,
    tile: Annotated[Optional[int], typer.Option(help="tile side in latent cells (x8 pixels; default: the model's native side)")] = None,
    tile_overlap: Annotated[Optional[int], typer.Option(help="latent cells shared by neighbouring tiles (default: a quarter tile)")] = None,
    tile_batch: Annotated[Optional[int], typer.Option(help="tiles per submodule call")] = None,
) -> None:
    """Upscale one image x4 (over overlapping tiles where it is larger than the model's native size)."""
    from diffsr.app.cli import tables
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.runtime.backends import load_pipeline
    from diffsr.runtime.image import load_image, output_size, save_image
    from diffsr.runtime.tiling import tiling_for

    rgb = load_image(image)
    writable(out_file)
    ckpt = open_checkpoint(checkpoint)
    config = ckpt.defaults.replace(prompt=prompt, negative_prompt=negative_prompt, steps=steps, seed=seed,
                                   guidance_scale=guidance, start=start, color_fix=color_fix, tile=tile,
                                   tile_overlap=tile_overlap, tile_batch=tile_batch)
    output_size(rgb.shape[0], rgb.shape[1], config.upscale)  # fail before loading weights
    tiling_for(ckpt.model, config)
    pipe = load_pipeline(backend, ckpt, device, onnx, parse_precision(precision), engines, cuda_graph)
    with bars() as draw:
        result = pipe(rgb, config, on_step=lambda done, total: draw(Progress("denoise", "tile-steps", done, total)))
    save_image(result.image, out_file)
    h, w = result.image.shape[:2]
    console.print(f"{image} -> {out_file} ({w}x{h}, {backend})", soft_wrap=True, highlight=False)
    console.print(tables.timings(result.timings))


@command()
def demo(
    preset: Annotated[str, typer.Option(help="checkpoint preset to create if absent")] = "tiny",
    photo: Annotated[str, typer.Option(help="a skimage.data photo")] = "astronaut",
    serve: Annotated[bool, typer.Option(help="end by serving it from Triton and upscaling through the endpoint")] = True,
) -> None:
    """Upscale a real photo 128 -> 512 with PyTorch, ONNX Runtime and a Triton endpoint."""
    from diffsr.app.cli import tables
    from diffsr.app.cli.demo import run_demo

    with console.status("demo") as status:
        result = run_demo(preset, photo, serve, say=lambda text: status.update(text))
    console.print(tables.demo(result.timings, f"{result.lq_path} (128x128) -> 512x512, {preset} preset, seconds"))
    for backend, path in result.outputs.items():
        console.print(f"{backend:>12}: {path}", highlight=False)
    if result.endpoint_latency_s is not None:
        console.print(f"Triton endpoint: {result.endpoint_latency_s:.3f} s end to end (HTTP); "
                      f"max |endpoint - onnxruntime| = {result.endpoint_max_abs_diff} on uint8", highlight=False)


@command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the ONNX files and manifest.json")],
    opset: Annotated[int, typer.Option(help="ONNX opset (TensorRT 10 reads 9 to 20)")] = 18,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write FP16 graphs, layers kept FP32 by the FP16 check")] = False,
    calib_photos: Annotated[str, typer.Option(help="FP16 check: skimage photos, comma-separated")] = "astronaut,coffee,chelsea",
    calib_steps: Annotated[int, typer.Option(help="FP16 check: sampler steps per run (its timesteps are checked)")] = 20,
    ort_fusions: Annotated[bool, typer.Option("--ort-fusions/--no-ort-fusions",
                           help="also write each FP32 graph with ONNX Runtime's fused attention (the onnxruntime backend's)")] = True,
) -> None:
    """Export every submodule to ONNX, checked, linted for TensorRT, with a manifest."""
    from dataclasses import asdict

    from diffsr.app.cli import tables
    from diffsr.calib.fp16 import Calibration, fp16_check
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.export.graphs.exporter import export_onnx, write_fp16

    ckpt = open_checkpoint(checkpoint)
    calibration = Calibration(photos=tuple(p for p in calib_photos.split(",") if p), steps=calib_steps) if fp16 else None
    with bars() as draw:
        manifest = export_onnx(ckpt, out_dir, opset, on_progress=draw, ort_fusions=ort_fusions)
        if calibration is not None:
            kept = fp16_check(ckpt, out_dir, calibration, on_progress=draw)
            manifest = write_fp16(out_dir, ckpt, kept, asdict(calibration), on_progress=draw)
    console.print(tables.export(manifest, out_dir))
    console.print(f"manifest: {out_dir / 'manifest.json'}", soft_wrap=True, highlight=False)


@command()
def quantize(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    onnx: Annotated[Path, typer.Option(help="folder made by `diffsr export --fp16`")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="folder for the INT8 graphs and a manifest "
                                                    "(default: beside the graphs in --onnx)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="int8 (explicit Q/DQ, for TensorRT)")] = "int8",
    calib_size: Annotated[int, typer.Option(help="calibration photos, each with two prompts, every timestep")] = 3,
    calib_steps: Annotated[int, typer.Option(help="sampler steps per calibration run")] = 20,
    method: Annotated[str, typer.Option(help="activation calibration: percentile or entropy")] = "percentile",
    percentile: Annotated[float, typer.Option(help="percentile of |activation| that sets its range")] = 99.999,
    submodules: Annotated[str, typer.Option(help="comma-separated submodules to quantize")] = "controlnet_unet",
) -> None:
    """INT8 post-training quantization (Q/DQ, FP16 elsewhere) calibrated on real photos over every timestep."""
    from diffsr.app.cli import tables
    from diffsr.calib.quantize import Int8Calibration
    from diffsr.calib.quantize import quantize as run_quantize
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.export.core.files import linked_copy
    from diffsr.export.graphs.to_int8 import Int8Settings

    if fmt != "int8":
        raise DiffsrError(f"--format {fmt!r} is not supported; the one format is int8")
    calibration = Int8Calibration.of_size(calib_size, calib_steps, Int8Settings(method, percentile),
                                          tuple(s for s in submodules.split(",") if s))
    ckpt = open_checkpoint(checkpoint)
    target = onnx
    if out_dir is not None and out_dir.resolve() != onnx.resolve():
        target = linked_copy(onnx, out_dir)  # a self-contained folder: the graphs linked, not duplicated
    with bars() as draw:
        manifest = run_quantize(ckpt, target, calibration, on_progress=draw)
    console.print(tables.quantized(manifest))
    console.print(f"manifest: {target / 'manifest.json'}", soft_wrap=True, highlight=False)


@command()
def parity(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    onnx: Annotated[Path, typer.Option(help="folder made by `diffsr export`")],
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8 (the graphs of `diffsr quantize`)")] = "fp32",
    size: Annotated[str, typer.Option(help="LQ size of the end-to-end check, WIDTHxHEIGHT")] = "128x96",
    steps: Annotated[int, typer.Option(help="sampler steps of the end-to-end check")] = 20,
    shapes: Annotated[str, typer.Option(help="submodule shapes, of min,opt,odd (SDXL's opt is 1024 px)")] = "min,opt,odd",
    json_out: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
) -> None:
    """ONNX Runtime against PyTorch per submodule (min, opt, odd shapes) and end to end; exit 1 on a breach."""
    from diffsr.app.cli import tables
    from diffsr.app.measure.parity import check_parity
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.runtime.image import output_size

    chosen = parse_precision(precision) or Precision.FP32
    wh = parse_size(size)
    ckpt = open_checkpoint(checkpoint)
    ckpt.defaults.replace(steps=steps)  # validates
    output_size(wh[1], wh[0], ckpt.defaults.upscale)  # an unusable size fails now, not after the submodules
    with console.status("running parity checks"):
        report = check_parity(ckpt, onnx, chosen, wh, steps, tuple(s for s in shapes.split(",") if s))
    if json_out:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        out.print(tables.parity(report))
    if not report.passed:
        raise typer.Exit(code=1)


@command("build-engines")
def build_engines_cmd(
    onnx: Annotated[Path, typer.Option(help="folder made by `diffsr export --fp16`")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for <submodule>.plan and .json")],
    target: Annotated[str, typer.Option(help="shape ranges: server or edge")] = "server",
    timing_cache: Annotated[Optional[Path], typer.Option(help="tactic timing cache to read and extend")] = None,
    max_batch: Annotated[Optional[int], typer.Option(help="largest batch of images (default: the target's)")] = None,
    static: Annotated[bool, typer.Option("--static", help="one shape, the target's opt: fastest, CUDA-graph friendly")] = False,
    opt_level: Annotated[int, typer.Option(help="builder optimisation level 0..5")] = 3,
    precision: Annotated[str, typer.Option(help="fp16, or int8 (the graphs of `diffsr quantize`, FP16 for the rest)")] = "fp16",
) -> None:
    """Build one TensorRT FP16 (or INT8) engine per submodule (strongly typed), with its metadata."""
    from diffsr.app.cli import tables
    from diffsr.export.engines.build import build_engines

    chosen = parse_precision(precision) or Precision.FP16
    with bars() as draw:
        metas = build_engines(onnx, out_dir, target, timing_cache, max_batch, static, opt_level, on_progress=draw,
                              precision=chosen)
    console.print(tables.engines(metas, out_dir, target))


@command()
def budget(
    onnx: Annotated[Path, typer.Option(help="folder made by `diffsr export` (the FP32 graphs are read, not their weights)")],
    target: Annotated[str, typer.Option(help="shape ranges: edge or server")] = "edge",
    max_batch: Annotated[Optional[int], typer.Option(help="largest batch of images (default: the target's)")] = None,
    static: Annotated[bool, typer.Option("--static", help="engines fixed at the target's opt shape (build-engines --static)")] = False,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write the budget as JSON")] = None,
) -> None:
    """Device memory of the engines at the target's largest shapes, FP16 and INT8, against Jetson Orin modules."""
    from dataclasses import asdict

    from diffsr.app.cli import tables
    from diffsr.export.engines.budget import budget as engine_budgets

    writable(json_file)
    with console.status("inferring shapes"):
        engines = engine_budgets(onnx, target, max_batch, static)
    out.print(tables.budget(engines, target + (" (static: its opt shape)" if static else "")))
    out.print(tables.budget_totals(engines))
    if json_file is not None:
        json_file.write_text(json.dumps([asdict(e) for e in engines], indent=2))


@command("triton-repo")
def triton_repo(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder (tokenizer, defaults, model widths)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="model repository to create")],
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder, for the onnxruntime flavour")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for the tensorrt flavour")] = None,
    flavour: Annotated[str, typer.Option(help="onnxruntime or tensorrt")] = "onnxruntime",
    sampler_instances: Annotated[int, typer.Option(help="requests denoised at once")] = 2,
    max_output: Annotated[str, typer.Option(help="largest output, WIDTHxHEIGHT: any shape of at most that many pixels")] = "4096x4096",
    tile: Annotated[Optional[int], typer.Option(help="tile side in latent cells (default: the model's native side)")] = None,
    tile_overlap: Annotated[Optional[int], typer.Option(help="latent cells shared by neighbouring tiles (default: a quarter tile)")] = None,
    tile_batch: Annotated[Optional[int], typer.Option(help="tiles per submodule call (default 4; tensorrt: at most the engines' batch)")] = None,
    entry: Annotated[str, typer.Option(help="the endpoint: bls (runs the loop; a cancel reaches it) or ensemble")] = "bls",
    step_batch: Annotated[int, typer.Option(help="onnxruntime flavour: most loops' step calls one fusion_transformer/controlnet_unet run takes (0 or 1: off)")] = 0,
    step_batch_delay_us: Annotated[int, typer.Option(help="how long a step call may wait for others to batch with")] = 0,
) -> None:
    """Generate the Triton model repository (BLS entry point, per-submodule models)."""
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.triton_models.repository import ServingOptions, build_repository

    w, h = parse_size(max_output)
    options = ServingOptions(sampler_instances=sampler_instances, max_output_pixels=w * h, tile=tile,
                             tile_overlap=tile_overlap, tile_batch=tile_batch, entry=entry, step_batch=step_batch,
                             step_batch_delay_us=step_batch_delay_us)
    configs = build_repository(open_checkpoint(checkpoint), onnx, out_dir, flavour, engines, options)
    console.print(f"wrote {len(configs)} models ({flavour}) to {out_dir}: {', '.join(configs)}", soft_wrap=True)


@command()
def serve(
    repo: Annotated[Path, typer.Option(help="model repository made by `diffsr triton-repo`")],
    http_port: Annotated[int, typer.Option()] = 8000,
    grpc_port: Annotated[int, typer.Option()] = 8001,
    metrics_port: Annotated[int, typer.Option()] = 8002,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    system: Annotated[bool, typer.Option("--system", help="use the tritonserver on PATH")] = False,
) -> None:
    """Run Triton on the repository until Ctrl-C, forwarding its log."""
    from diffsr.app.serving.triton_server import Ports, TritonServer
    from diffsr.calib.data import photo
    from diffsr.runtime.image import encode_png

    server = TritonServer(repo, Ports(http_port, grpc_port, metrics_port), host, system,
                          log_line=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    with server:
        try:
            warm = server.warm_up(encode_png(photo("astronaut", (128, 128))))
        except DiffsrError as e:
            raise DiffsrError(f"warm-up request failed: {e}") from None
        console.print(f"warm-up at 128x128 -> 512x512: {warm:.2f} s", highlight=False)
        console.print(f"serving diffsr: http {server.http_url}, grpc {server.grpc_url}; Ctrl-C stops", soft_wrap=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            assert server.process is not None
            code = server.process.wait()
        except KeyboardInterrupt:
            console.print("stopping tritonserver")
            return
        raise DiffsrError(f"tritonserver exited with code {code}: {server.last_error()}")


@command()
def client(
    image: Annotated[Path, typer.Argument(help="input image")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="output PNG")],
    url: Annotated[str, typer.Option(help="host:port of the HTTP or gRPC endpoint")] = "127.0.0.1:8000",
    protocol: Annotated[str, typer.Option(help="http or grpc")] = "http",
    prompt: Annotated[Optional[str], typer.Option()] = None,
    negative_prompt: Annotated[Optional[str], typer.Option()] = None,
    steps: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    guidance: Annotated[Optional[float], typer.Option()] = None,
) -> None:
    """Upscale one image through a running endpoint and print the latency."""
    from diffsr.app.serving.triton_client import TritonClient

    if not image.is_file():
        raise DiffsrError(f"input image not found: {image}")
    writable(out_file)
    with TritonClient(url, protocol) as remote:
        result = remote.upscale(image.read_bytes(), prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                                seed=seed, guidance_scale=guidance)
    out_file.write_bytes(result.png)
    console.print(f"{image} -> {out_file} via {protocol}://{url}: {result.latency_s:.3f} s", soft_wrap=True,
                  highlight=False)


@command()
def soak(
    url: Annotated[str, typer.Option(help="host:port of the running endpoint (HTTP or gRPC port)")],
    protocol: Annotated[str, typer.Option(help="http or grpc")] = "grpc",
    requests: Annotated[int, typer.Option(help="requests in all")] = 200,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 4,
    bad_fraction: Annotated[float, typer.Option(help="share of bad requests (corrupt image, bad parameters, too large)")] = 0.1,
    steps: Annotated[int, typer.Option()] = 4,
    size: Annotated[str, typer.Option(help="LQ input size WIDTHxHEIGHT (x4 out)")] = "64x64",
    inputs: Annotated[int, typer.Option(help="distinct good inputs (photo, seed), each first sent alone")] = 4,
    server_pid: Annotated[Optional[int], typer.Option(help="the local tritonserver's pid: its memory (with its stubs) is checked")] = None,
    settle: Annotated[int, typer.Option(help="requests after which the memory baseline is read")] = 20,
    memory_tolerance: Annotated[float, typer.Option(help="largest memory growth after the baseline")] = 0.05,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write the report as JSON")] = None,
) -> None:
    """Many requests at a fixed concurrency with bad ones mixed in: every good answer must equal its solo
    image, every bad one be refused as the client's fault, memory stay flat; exit 1 otherwise."""
    from diffsr.app.serving.soak import SoakSettings, run_soak, summary

    settings = SoakSettings(requests, concurrency, bad_fraction, steps, parse_size(size), inputs, settle, memory_tolerance)
    writable(json_file)
    with bars() as draw:
        report = run_soak(url, settings, protocol, server_pid, on_progress=draw)
    for line in summary(report):
        out.print(line, highlight=False, soft_wrap=True)
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(), indent=2))
    if not report.ok:
        raise typer.Exit(code=1)


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


@command()
def kubernetes(
    image: Annotated[str, typer.Option(help="the container built from this repository's Dockerfile, as the cluster pulls it")],
    repository: Annotated[str, typer.Option(help="the triton-repo model repository: s3://, gs://, as:// or pvc:CLAIM")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="YAML file to write")],
    name: Annotated[str, typer.Option()] = "diffsr",
    replicas: Annotated[int, typer.Option(help="pods at least")] = 1,
    max_replicas: Annotated[int, typer.Option(help="pods at most (the autoscaler's bound)")] = 4,
    gpus: Annotated[int, typer.Option(help="GPUs per pod")] = 1,
    queue_target_us: Annotated[int, typer.Option(help="scale out above this average queue time per request")] = 500_000,
    credentials_secret: Annotated[Optional[str], typer.Option(help="Secret whose keys become the pods' environment (object storage keys)")] = None,
) -> None:
    """Kubernetes manifests (Deployment, Service, autoscaler, disruption budget) for the Triton endpoint."""
    from diffsr.app.serving.kubernetes import ClusterOptions, write_manifests

    options = ClusterOptions(image, repository, name, replicas, max_replicas, gpus, queue_target_us, credentials_secret)
    writable(out_file)
    docs = write_manifests(options, out_file)
    console.print(f"wrote {', '.join(d['kind'] for d in docs)} to {out_file}", soft_wrap=True, highlight=False)


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


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(app())


if __name__ == "__main__":
    main()
