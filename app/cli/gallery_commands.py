"""`diffsr gallery`: a reference gallery built from a folder of photos with a checkpoint's gallery encoder, searched
with a photo (`runtime/gallery.py`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from diffsr.app.cli.common import app, bars, command, console

gallery = typer.Typer(no_args_is_help=True, help="Reference galleries: photos embedded once, searched by a photo.")
app.add_typer(gallery, name="gallery")


def _encoder(checkpoint: Path, batch: int):  # type: ignore[no-untyped-def]
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.runtime.gallery import torch_encoder

    return torch_encoder(open_checkpoint(checkpoint), batch)


@command("build", group=gallery)
def build(
    folder: Annotated[Path, typer.Argument(help="a folder of photos (searched recursively: PNG, JPEG, WebP, BMP, TIFF)")],
    checkpoint: Annotated[Path, typer.Option(help="a checkpoint with a gallery_encoder/ folder")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="the index folder: made, or brought up to date")],
    batch: Annotated[int, typer.Option(min=1, help="photos embedded at once")] = 16,
) -> None:
    """Embed a folder's photos into an index; again over the same folder, only new or changed photos are embedded."""
    from diffsr.runtime.gallery import build_gallery

    encoder = _encoder(checkpoint, batch)
    start = time.perf_counter()
    with bars() as draw:
        index, added, kept, dropped = build_gallery(folder, out_dir, encoder, draw)
    console.print(f"{out_dir}: {len(index)} photos ({added} embedded, {kept} kept, {dropped} dropped) in "
                  f"{time.perf_counter() - start:.1f} s", highlight=False, soft_wrap=True)


@command("search", group=gallery)
def search(
    photo: Annotated[Path, typer.Argument(help="the photo to find references for")],
    checkpoint: Annotated[Path, typer.Option(help="the checkpoint whose gallery encoder built the index")],
    index: Annotated[Path, typer.Option(help="an index folder made by `diffsr gallery build`")],
    top_k: Annotated[int, typer.Option(help="how many photos")] = 5,
) -> None:
    """The gallery's photos nearest a photo, nearest first: one `score<TAB>file` line each, on stdout."""
    from diffsr.runtime.gallery import Gallery, nearest
    from diffsr.runtime.image import load_image

    found = nearest(Gallery.load(index), _encoder(checkpoint, 1), load_image(photo), top_k)
    for match in found:  # plain lines for scripts (rich would expand the tab)
        typer.echo(f"{match.score:.4f}\t{match.name}")
