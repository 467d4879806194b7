"""The deployment's quality table: one checkpoint on an SR test set, every configuration a deployment user
chooses between, scored as the SR papers score (`diffsr eval`'s Y-channel PSNR/SSIM, 4 px border), each
row's difference to PyTorch FP32 in dB, in one run.

    python scripts/quality_table.py --checkpoint app/demo_model --set ../shared/data/sr-benchmarks/set14 \\
        --work .quality --json docs/quality-set14.json

Rows: bicubic; PyTorch FP32 (the checkpoint's settings); ONNX Runtime FP32, FP16 and INT8 graphs (`diffsr export
--fp16`, `diffsr quantize`, made in --work when absent); untiled; the other colour fixes; fewer steps of DDIM and
DPM-Solver++; the Triton endpoint (ONNX Runtime flavour, FP32). `--rows` picks among them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from diffsr.app.cli import tables
from diffsr.app.cli.common import bars
from diffsr.app.measure.quality import BICUBIC, evaluate, pair_images, reference_of, rows_for
from diffsr.calib.keep_fp32 import export_graphs
from diffsr.calib.quantize import Int8Calibration, quantize
from diffsr.calib.record import Calibration
from diffsr.export.core.precision import Precision
from diffsr.export.model.checkpoint import open_checkpoint
from diffsr.export.model.settings import COLOR_FIXES

UNTILED = 1024  # latent cells: a tile larger than any test image, so nothing is tiled
ROWS = ("onnxruntime-fp32", "onnxruntime-fp16", "onnxruntime-int8", "untiled", "colour", "schedulers", "endpoint")


def graphs(ckpt, onnx: Path, draw) -> None:
    """FP32, FP16 (`diffsr export --fp16`'s default calibration) and INT8 graphs of the checkpoint in `onnx`, each
    step kept when up to date."""
    manifest = export_graphs(ckpt, onnx, Calibration(), on_progress=draw)
    if "int8_calibration" not in manifest:
        quantize(ckpt, onnx, Int8Calibration.of_size(3), on_progress=draw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("app/demo_model"))
    ap.add_argument("--set", type=Path, default=Path("../shared/data/sr-benchmarks/set14"), help="HR (and LR) images")
    ap.add_argument("--work", type=Path, default=Path(".quality"), help="folder for the ONNX graphs")
    ap.add_argument("--images", default=None, help="only these images (comma-separated names, e.g. img_004_SRF_4)")
    ap.add_argument("--few-steps", type=int, default=10, help="the steps of the fewer-step scheduler rows")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {','.join(ROWS)} (bicubic and "
                    "torch fp32 always run)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    console = Console()
    ckpt = open_checkpoint(args.checkpoint)
    pairs = pair_images(args.set, None)
    if args.images is not None:
        names = args.images.split(",")
        pairs = [p for p in pairs if p.name in names]
        if len(pairs) != len(names):
            ap.error(f"--images {names}: not all in {args.set}")
    onnx = args.work / "onnx"
    with bars() as draw:
        graphs(ckpt, onnx, draw)
    base = ckpt.defaults
    wanted = {r for r in args.rows.split(",") if r}
    unknown = wanted - set(ROWS)
    if unknown:
        ap.error(f"--rows {sorted(unknown)}: choose of {list(ROWS)}")
    precisions = [p for p in (Precision.FP32, Precision.FP16, Precision.INT8) if f"onnxruntime-{p.value}" in wanted]
    rows = rows_for(ckpt, base, ["torch", *(["onnxruntime"] if precisions else [])], precisions, onnx, None)

    def variant(label: str, **overrides) -> None:
        (row,) = (r for name, r in rows_for(ckpt, base.replace(**overrides), ["torch"], [], None, None).items()
                  if name != BICUBIC)
        rows[label] = row

    if "untiled" in wanted:
        variant("torch fp32, untiled", tile=UNTILED)
    if "colour" in wanted:
        for fix in COLOR_FIXES:
            if fix != base.color_fix:
                variant(f"torch fp32, colour fix {fix}", color_fix=fix)
    if "schedulers" in wanted:
        variant(f"torch fp32, ddim {args.few_steps} steps", scheduler="ddim", steps=args.few_steps)
        variant(f"torch fp32, dpmpp-2m {args.few_steps} steps", scheduler="dpmpp-2m", steps=args.few_steps)
    if "endpoint" in wanted:
        endpoint = rows_for(ckpt, base, ["triton"], [], onnx, None)
        rows.update({k: v for k, v in endpoint.items() if k != BICUBIC})
    with bars() as draw:
        scores = evaluate(pairs, rows, base.upscale, on_progress=draw)
    title = (f"{ckpt.model.preset} ({args.checkpoint}) on {args.set.name}: {len(pairs)} images, x{base.upscale}; "
             f"{base.scheduler} {base.steps} steps, colour fix {base.color_fix}, guidance {base.guidance_scale}, "
             f"tiles of {base.tile} cells unless said; Y channel, {base.upscale} px border")
    console.print(tables.quality(scores, title))
    if args.json is not None:
        ref = reference_of(scores)
        args.json.write_text(json.dumps({"title": title, "reference": ref.label if ref else None,
                                         "configs": [s.to_json() for s in scores]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
