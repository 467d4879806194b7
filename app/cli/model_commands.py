"""Commands on a model: init, upscale, demo, export, quantize, parity, build-engines, budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffsr.app.cli.common import bars, command, console, out, output_path, parse_precision, parse_size, writable
from diffsr.app.cli.request_options import request_options
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import require_image_name
from diffsr.export.core.precision import Precision
from diffsr.export.core.progress import Progress
from diffsr.runtime.backends.names import BACKENDS


@command()
def init(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder to create")],
    preset: Annotated[str, typer.Option(help="a family's preset (`diffsr families` lists them)")] = "tiny",
    seed: Annotated[int, typer.Option(help="weights seed: same seed, same bytes")] = 0,
    captioner: Annotated[Optional[str], typer.Option(help="also a seeded BLIP-2 captioner in captioner/: "
                                                          "blip2-tiny or blip2-opt-2.7b")] = None,
    prompter: Annotated[Optional[str], typer.Option(help="also a seeded LLaVA-1.5 prompter in prompter/, which writes "
                                                         "the family's prompts: llava-tiny or llava-1.5-7b")] = None,
    gallery_encoder: Annotated[Optional[str], typer.Option(help="also a seeded CLIP image encoder in gallery_encoder/, "
                                                                "for reference galleries: clip-tiny or "
                                                                "clip-vit-base-patch32")] = None,
) -> None:
    """Write a seeded random-weight checkpoint of a preset."""
    from diffsr.export.model.attachments.captioner import captioner_preset, init_captioner
    from diffsr.export.model.attachments.gallery_encoder import gallery_encoder_preset, init_gallery_encoder
    from diffsr.export.model.attachments.prompter import init_prompter, prompter_preset
    from diffsr.export.model.random_init import init_checkpoint

    if captioner is not None and prompter is not None:
        raise DiffsrError("a checkpoint has one attachment that writes its prompts: give --captioner or --prompter")
    if captioner is not None:
        captioner_preset(captioner)  # a bad name fails before anything is written
    if prompter is not None:
        prompter_preset(prompter)
    if gallery_encoder is not None:
        gallery_encoder_preset(gallery_encoder)
    with bars() as draw:
        init_checkpoint(preset, seed, out_dir, on_progress=draw)
        if captioner is not None:
            draw(Progress("init", f"captioner ({captioner})", 0, 1))
            init_captioner(captioner, seed, out_dir)
        if prompter is not None:
            draw(Progress("init", f"prompter ({prompter})", 0, 1))
            init_prompter(prompter, seed, out_dir)
        if gallery_encoder is not None:
            draw(Progress("init", f"gallery encoder ({gallery_encoder})", 0, 1))
            init_gallery_encoder(gallery_encoder, seed, out_dir)
    parts = [f"a {captioner} captioner" if captioner else "", f"a {prompter} prompter" if prompter else "",
             f"a {gallery_encoder} gallery encoder" if gallery_encoder else ""]
    attached = " with " + " and ".join(p for p in parts if p) if any(parts) else ""
    console.print(f"wrote {preset} checkpoint{attached} (seed {seed}) to {out_dir}", highlight=False)


@command()
def families() -> None:
    """The model families: each one's presets, submodules and which plays each part of the pipeline."""
    from diffsr.app.cli import tables
    from diffsr.export.model.families import families as registered

    out.print(tables.families(registered()))


@command()
@request_options
def upscale(
    values: dict[str, Any],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="output PNG")],
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="let --out be the input photo itself")] = False,
    start: Annotated[Optional[str], typer.Option(help="noise or lq")] = None,
    color_fix: Annotated[Optional[str], typer.Option(help="adain, wavelet or none")] = None,
    backend: Annotated[str, typer.Option(help=", ".join(BACKENDS))] = "torch",
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder, for --backend onnxruntime (tensorrt: checked against)")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for --backend tensorrt")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 or fp16 (default: the backend's)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda[:N] (default: the backend's)")] = None,
    cuda_graph: Annotated[Optional[bool], typer.Option("--cuda-graph/--no-cuda-graph",
                          help="replay each denoising step as a CUDA graph (default: on for torch-cuda, tensorrt)")] = None,
    tile: Annotated[Optional[int], typer.Option(help="tile side in latent cells (default: the model's native side)")] = None,
    tile_overlap: Annotated[Optional[int], typer.Option(help="latent cells shared by neighbouring tiles (default: a quarter tile)")] = None,
    tile_batch: Annotated[Optional[int], typer.Option(help="tiles per submodule call")] = None,
    gallery: Annotated[Optional[Path], typer.Option(help="a gallery index (`diffsr gallery build`): its photos nearest "
                                                          "the input join the references")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="how many photos --gallery picks (default 4)")] = None,
) -> None:
    """Upscale one image x4 (over overlapping tiles where it is larger than the model's native size)."""
    from diffsr.app.cli import tables
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.runtime.image import load_image, save_image
    from diffsr.runtime.loading import load_pipeline
    from diffsr.runtime.requests import check, parse_request

    image = Path(values["image"])
    photos = [Path(p) for v in values.values() if isinstance(v, (Path, list)) for p in (v if isinstance(v, list) else [v])]
    missing = [str(p) for p in photos if not p.is_file()]
    if missing:  # before the checkpoint is read
        raise DiffsrError(f"input image not found: {', '.join(missing)}")
    output_path(out_file, overwrite, photos)
    require_image_name(out_file)
    if top_k is not None and gallery is None:
        raise DiffsrError("--top-k says how many photos --gallery picks: give --gallery INDEX too")
    ckpt = open_checkpoint(checkpoint)
    if gallery is not None:  # the gallery's picks after any given with the request, as if given by name
        listed = next(iter(ckpt.model.photo_lists()), None)
        if listed is None:
            raise DiffsrError(f"--gallery picks reference photos; this {ckpt.model.name} checkpoint takes none (refsr's "
                              "family does)")
        from diffsr.runtime.gallery import TOP_K, picked_references, torch_encoder

        files, matches = picked_references(gallery, torch_encoder(ckpt, 1), load_image(image),
                                           TOP_K if top_k is None else top_k)
        values[listed.name] = [*(values.get(listed.name) or []), *files]
        console.print(f"{listed.name} from {gallery}: " + ", ".join(f"{m.name} ({m.score:.3f})" for m in matches),
                      soft_wrap=True, highlight=False, markup=False)
    local = ckpt.defaults.replace(start=start, color_fix=color_fix, tile=tile, tile_overlap=tile_overlap,
                                  tile_batch=tile_batch)
    request = parse_request(ckpt.model, local, values)
    settings = request.settings
    plan = check(ckpt.model, settings, ckpt.scheduler_config, request.photo.shape[:2])  # every mistake before weights load
    pipe = load_pipeline(backend, ckpt, device, onnx, parse_precision(precision), engines, cuda_graph)
    with bars() as draw:
        result = pipe(request, on_step=lambda done, total: draw(Progress("denoise", "tile-steps", done, total)), plan=plan)
    save_image(result.image, out_file)
    h, w = result.image.shape[:2]
    console.print(f"{image} -> {out_file} ({w}x{h}, {backend}, {settings.scheduler} {settings.steps} steps)",
                  soft_wrap=True, highlight=False)
    for slot, text in result.prompts.items() if ckpt.model.tokenizer_folders() else ():  # each prompt it ran with
        console.print(f"{slot}: {text}", soft_wrap=True, highlight=False, markup=False)
    console.print(tables.timings(result.timings))


@command()
def demo(
    preset: Annotated[Optional[str], typer.Option(help="a seeded random-weight checkpoint of this preset (created "
                                                       "once) instead of the trained demo model")] = None,
    photo: Annotated[str, typer.Option(help="a skimage.data photo")] = "astronaut",
    serve: Annotated[bool, typer.Option(help="end by serving it from Triton and upscaling through the endpoint")] = True,
    steps: Annotated[Optional[int], typer.Option(help="sampler steps (default: the checkpoint's, 20)")] = None,
) -> None:
    """Upscale a real photo 128 -> 512 with PyTorch, ONNX Runtime and a Triton endpoint."""
    from diffsr.app.cli import tables
    from diffsr.app.cli.demo import run_demo

    with console.status("demo") as status:
        result = run_demo(preset, photo, serve, say=lambda text: status.update(text), steps=steps)
    model = f"{preset} preset, random weights" if preset else "the trained demo model"
    console.print(tables.demo(result.timings, f"{result.lq_path} (128x128) -> 512x512, {model}, seconds"))
    for backend, path in result.outputs.items():
        console.print(f"{backend:>12}: {path}", highlight=False)
    if result.endpoint_latency_s is not None:
        console.print(f"Triton endpoint: {result.endpoint_latency_s:.3f} s end to end (HTTP); "
                      f"max |endpoint - onnxruntime| = {result.endpoint_max_abs_diff} on uint8", highlight=False)
    console.print("against the 512x512 photo (Y channel, 4 px border): " + ", ".join(
        f"{label} {p:.2f} dB / SSIM {s:.4f}" for label, (p, s) in result.scores.items()), highlight=False)


@command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="folder for the ONNX files and manifest.json")],
    opset: Annotated[int, typer.Option(min=18, max=20, help="ONNX opset: 18 to 20 (what PyTorch's exporter writes and TensorRT 10 reads)")] = 18,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write FP16 graphs, layers kept FP32 by the FP16 check")] = False,
    calib_photos: Annotated[str, typer.Option(help="FP16 check: skimage photos, comma-separated")] = "astronaut,coffee,chelsea",
    calib_steps: Annotated[int, typer.Option(help="FP16 check: sampler steps per run (its timesteps are checked)")] = 20,
    ort_fusions: Annotated[bool, typer.Option("--ort-fusions/--no-ort-fusions",
                           help="also write each FP32 graph with ONNX Runtime's fused attention (the onnxruntime backend's)")] = True,
) -> None:
    """Export every submodule to ONNX, checked, linted for TensorRT, with a manifest."""
    from diffsr.app.cli import tables
    from diffsr.calib.keep_fp32 import export_graphs
    from diffsr.calib.record import Calibration
    from diffsr.export.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    calibration = Calibration(photos=tuple(p for p in calib_photos.split(",") if p), steps=calib_steps) if fp16 else None
    with bars() as draw:
        manifest = export_graphs(ckpt, out_dir, calibration, opset, ort_fusions, on_progress=draw)
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
    submodules: Annotated[Optional[str], typer.Option(help="comma-separated submodules to quantize "
                          "(default: the family's: `diffsr families` lists them)")] = None,
) -> None:
    """INT8 post-training quantization (Q/DQ, FP16 elsewhere) calibrated on real photos over every timestep."""
    from diffsr.app.cli import tables
    from diffsr.calib.quantize import Int8Calibration
    from diffsr.calib.quantize import quantize as run_quantize
    from diffsr.export.core.files import linked_copy
    from diffsr.export.graphs.to_int8 import Int8Settings
    from diffsr.export.model.checkpoint import open_checkpoint

    if fmt != "int8":
        raise DiffsrError(f"--format {fmt!r} is not supported; the one format is int8")
    chosen = tuple(s for s in submodules.split(",") if s) if submodules is not None else None
    calibration = Int8Calibration.of_size(calib_size, calib_steps, Int8Settings(method, percentile), chosen)
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
    submodules: Annotated[Optional[str], typer.Option(help="only these submodules, comma-separated (default: all; int8: the quantized ones)")] = None,
    end_to_end: Annotated[bool, typer.Option(help="also compare the whole pipeline's images")] = True,
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
        report = check_parity(ckpt, onnx, chosen, wh, steps, tuple(s for s in shapes.split(",") if s),
                              None if submodules is None else tuple(s for s in submodules.split(",") if s), end_to_end)
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
