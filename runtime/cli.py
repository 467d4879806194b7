"""The `diffsr` command: parse, build a config, call the library, print."""

from __future__ import annotations

import logging
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
DEMO_DIR = Path(".demo")


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


def _upscale(input_rgb, checkpoint: Path, backend: str, overrides: dict, out: Path):
    from export.checkpoint import open_checkpoint
    from runtime.backends import load_runners
    from runtime.image import output_size, save_image
    from runtime.pipeline import Pipeline

    ckpt = open_checkpoint(checkpoint)
    config = ckpt.defaults.replace(**overrides)
    output_size(input_rgb.shape[0], input_rgb.shape[1], config.upscale)  # fail before loading weights
    pipe = Pipeline(load_runners(backend, ckpt), ckpt)
    columns = (TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("denoise", total=config.steps)
        result = pipe(input_rgb, config, on_step=lambda done, total: progress.update(task, completed=done))
    save_image(result.image, out)
    return result


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
    backend: Annotated[str, typer.Option()] = "torch",
) -> None:
    """Upscale one image x4."""
    from runtime.image import load_image

    overrides = dict(prompt=prompt, negative_prompt=negative_prompt, steps=steps, seed=seed,
                     guidance_scale=guidance, start=start, color_fix=color_fix)
    try:
        result = _upscale(load_image(image), checkpoint, backend, overrides, out)
    except DiffsrError as e:
        _fail(str(e))
    h, w = result.image.shape[:2]
    _print_timings(result.timings, f"{image} -> {out} ({w}x{h}, {backend})")


@app.command()
def demo(
    preset: Annotated[str, typer.Option(help="checkpoint preset to create if absent")] = "tiny",
    photo: Annotated[str, typer.Option(help="a skimage.data photo")] = "astronaut",
    backend: Annotated[str, typer.Option()] = "torch",
) -> None:
    """Upscale a real photo from scikit-image with a local checkpoint, creating it if absent."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from export.checkpoint import init_checkpoint

    ckpt_dir = DEMO_DIR / f"checkpoint-{preset}"
    try:
        if not (ckpt_dir / "diffsr.json").is_file():
            console.print(f"creating {preset} checkpoint in {ckpt_dir}")
            init_checkpoint(preset, 0, ckpt_dir)
        if not hasattr(data, photo):
            raise DiffsrError(f"skimage.data has no photo {photo!r}; try astronaut, coffee or chelsea")
        hq = Image.fromarray(np.asarray(getattr(data, photo)())).convert("RGB")
        lq = hq.resize((128, 128), Image.BICUBIC)  # the benchmark size: 128 in, 512 out
        lq_path, out_path = DEMO_DIR / f"{photo}_lq.png", DEMO_DIR / f"{photo}_x4_{preset}.png"
        lq.save(lq_path)
        result = _upscale(np.asarray(lq), ckpt_dir, backend, {}, out_path)
    except DiffsrError as e:
        _fail(str(e))
    h, w = result.image.shape[:2]
    _print_timings(result.timings, f"{lq_path} (128x128) -> {out_path} ({w}x{h}, {preset}, {backend})")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(app())


if __name__ == "__main__":
    main()
