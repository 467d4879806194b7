"""The full-size captioner on this machine: a seeded checkpoint of a captioner preset (blip2-opt-2.7b by default),
each of its graphs exported to ONNX (checked, linted), and a caption's tokens per second on the PyTorch reference.
Each step runs in a process of its own: its wall time and peak resident memory are that process's.

    python scripts/captioner_scale.py --work /tmp/blip2 [--preset blip2-opt-2.7b] [--json docs/captioner-scale.json]

A graph's files are removed once measured (unless --keep): OPT-2.7b's two language-model graphs are 10.6 GB each in
FP32. The caption runs one graph's weights at a time (the image part, then the prefill, then the decode steps), so
the reference's peak is its largest graph's; random weights rarely end a caption, so it runs to `--tokens`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GRAPHS = ("caption_image", "caption_prefill", "caption_decode")

EXPORT = """
import sys
from pathlib import Path
from diffsr.export.graphs.onnx_export import infer_and_check, lint_for_tensorrt, onnx_from_checkpoint
from diffsr.export.model.checkpoint import open_checkpoint
path = onnx_from_checkpoint(open_checkpoint(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
infer_and_check(path)
lint_for_tensorrt(path)
"""

CAPTION = """
import gc, json, sys, time
import torch
from diffsr.calib.data import photo
from diffsr.export.model.checkpoint import load_submodule, open_checkpoint
from diffsr.export.model.attachments.captioner import BOS
from diffsr.runtime.caption import CaptionLoop, CaptionSettings, captioner_graphs, pixel_values
ckpt = open_checkpoint(sys.argv[1])
spec, tokens = ckpt.model.attachment("captioner"), int(sys.argv[2])
held, spent = {}, {}
def run(name, **feed):
    if name not in held:  # one graph's weights at a time
        held.clear(); gc.collect()
        start = time.perf_counter(); held[name] = load_submodule(ckpt, name)
        spent["load " + name] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        out = held[name](**feed)
    spent.setdefault(name, []).append(time.perf_counter() - start)
    return {"prefix": out} if name == "caption_image" else dict(zip(("logits", "keys", "values"), out))
loop = CaptionLoop(run, captioner_graphs(spec))
ids = loop(pixel_values(photo("astronaut", None), spec.image_size), [BOS], CaptionSettings(max_new_tokens=tokens))[0]
steps = spent["caption_decode"]
r = lambda x: round(x, 4)
print(json.dumps({"tokens": len(ids), "image_s": r(spent["caption_image"][0]), "prefill_s": r(spent["caption_prefill"][0]),
                  "decode_step_s": r(sum(steps) / len(steps)), "tokens_per_s": r(len(steps) / sum(steps)),
                  "load_s": {k[5:]: r(v) for k, v in spent.items() if k.startswith("load ")},
                  "threads": torch.get_num_threads()}))
"""


def measured(command: list[str], what: str) -> tuple[dict, str]:
    """Run a child process; its wall seconds and peak RSS (GiB), and what it printed."""
    print(f"{what} ...", flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    out = child.stdout.read() if child.stdout else ""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{what} failed:\n{out[-2000:]}")
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    print(f"{what}: {wall:.0f} s, peak RSS {peak:.2f} GiB", flush=True)
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2)}, out


def size_gib(*paths: Path) -> float:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 2**30, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="a new folder for the checkpoint and the graphs")
    ap.add_argument("--preset", default="blip2-opt-2.7b")
    ap.add_argument("--tokens", type=int, default=30, help="new tokens of the caption")
    ap.add_argument("--keep", action="store_true", help="keep each graph's files")
    ap.add_argument("--steps", default="init,export,caption", help="which steps (caption alone: on --work's checkpoint)")
    ap.add_argument("--json", type=Path, default=None, help="the report (a step not run keeps its entry there)")
    args = ap.parse_args()
    steps = set(args.steps.split(","))
    ckpt = args.work / "checkpoint"
    report: dict = {"preset": args.preset, "cpu_threads": os.cpu_count()}
    if args.json is not None and args.json.is_file():
        report = json.loads(args.json.read_text()) | report
    if "init" in steps:
        report["init"], _ = measured([sys.executable, "-m", "diffsr.app.cli", "init", "--preset", "tiny", "--captioner",
                                      args.preset, "--out", str(ckpt)], f"init ({args.preset})")
        report["init"]["disk_gib"] = size_gib(ckpt / "captioner")
    for name in GRAPHS if "export" in steps else ():
        report.setdefault("export", {})
        path = args.work / "onnx" / f"{name}.onnx"
        report["export"][name], _ = measured([sys.executable, "-c", EXPORT, str(ckpt), name, str(path)], f"export {name}")
        report["export"][name]["disk_gib"] = size_gib(path, path.with_name(path.name + ".data"))
        if not args.keep:
            shutil.rmtree(path.parent)
    if "caption" in steps:
        report["caption"], out = measured([sys.executable, "-c", CAPTION, str(ckpt), str(args.tokens)],
                                          "caption (torch FP32)")
        report["caption"] |= json.loads(out.strip().splitlines()[-1])
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
