"""The reference gallery's build and query times: N photos (crops of skimage's photos, 96 px PNGs) embedded by a seeded
gallery encoder (clip-tiny by default) and indexed; queries against them; 100 photos added (only they are embedded);
and a query against 100,000 vectors of CLIP ViT-B/32's width (512), the index alone. Prints one JSON report.

    python scripts/gallery_bench.py --work /tmp/gallery [--photos 10000] [--preset clip-tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffsr.calib.data import PHOTOS, photo
from diffsr.export.model.attachments.gallery_encoder import GalleryEmbed, init_gallery_encoder
from diffsr.runtime.gallery import Encoder, Gallery, build_gallery, nearest


def write_photos(folder: Path, start: int, count: int, rng: np.random.Generator) -> None:
    sources = [photo(name, None) for name in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        src = sources[i % len(sources)]
        y, x = rng.integers(0, src.shape[0] - 96), rng.integers(0, src.shape[1] - 96)
        Image.fromarray(src[y: y + 96, x: x + 96]).save(folder / f"{i:06d}.png")


def median_ms(fn, runs: int = 20) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a new folder for the photos, the encoder and the index")
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--preset", default="clip-tiny")
    args = ap.parse_args()
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work} is not empty: give a new folder")
    rng = np.random.default_rng(0)
    write_photos(args.work / "photos", 0, args.photos, rng)
    spec = init_gallery_encoder(args.preset, 0, args.work / "checkpoint")
    from transformers import CLIPVisionModelWithProjection

    graph = GalleryEmbed(CLIPVisionModelWithProjection.from_pretrained(str(spec.path), dtype=torch.float32).eval())
    encoder = Encoder(spec, lambda pixels: graph(pixels), batch=64)
    report: dict = {"preset": args.preset, "photos": args.photos, "threads": torch.get_num_threads()}

    start = time.perf_counter()
    gallery, added, _, _ = build_gallery(args.work / "photos", args.work / "index", encoder)
    report["build_s"] = round(time.perf_counter() - start, 2)
    query = photo("astronaut", (96, 96))
    report["query_ms"] = median_ms(lambda: nearest(gallery, encoder, query, 10))  # the photo embedded, then searched
    vector = encoder([query])
    report["search_only_ms"] = median_ms(lambda: gallery.search(vector, 10))

    write_photos(args.work / "photos", args.photos, 100, rng)
    calls, start = encoder.calls, time.perf_counter()
    gallery, added, kept, _ = build_gallery(args.work / "photos", args.work / "index", encoder)
    report["add_100"] = {"s": round(time.perf_counter() - start, 2), "embedded": encoder.calls - calls, "kept": kept}

    big = Gallery(512, "synthetic")
    vectors = np.random.default_rng(1).standard_normal((100_000, 512)).astype(np.float32)
    big.add([str(i) for i in range(len(vectors))], [""] * len(vectors), vectors)
    report["search_100k_x512_ms"] = median_ms(lambda: big.search(vectors[:1], 10))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
