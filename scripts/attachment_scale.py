"""A full-size attachment that writes prompts on this machine: a seeded checkpoint of a captioner preset
(blip2-opt-2.7b by default) or a prompter preset (llava-1.5-7b), each of its graphs exported to ONNX (checked,
linted), and a text's tokens per second on the PyTorch reference. Each step runs in a process of its own: its wall
time and peak resident memory are that process's.

    python scripts/attachment_scale.py --work /tmp/blip2 [--preset blip2-opt-2.7b] [--json blip2.json]
    python scripts/attachment_scale.py --work /tmp/llava --preset llava-1.5-7b --dtype bfloat16 [--json llava.json]

A graph's files are removed once measured (unless --keep): OPT-2.7b's two language-model graphs are 10.6 GB each in
FP32, LLaMA-7B's 27 GB. The text is written one graph's weights at a time (the image part, then the prefill, then the
decode steps), so the reference's peak is its largest graph's (`--dtype bfloat16`: half of FP32's, where FP32 does
not fit in memory); random weights rarely end a text, so it runs to `--tokens`.
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


EXPORT = """
import json, sys
from pathlib import Path
from diffsr.export.engines.budget import GIB, engine_budget
from diffsr.export.graphs.onnx_export import infer_and_check, lint_for_tensorrt, onnx_from_checkpoint
from diffsr.export.model.checkpoint import open_checkpoint
from diffsr.export.model.dims import target
ckpt, name = open_checkpoint(sys.argv[1]), sys.argv[2]
path = onnx_from_checkpoint(ckpt, name, Path(sys.argv[3]))
infer_and_check(path)
lint_for_tensorrt(path)
# its engine's device memory at the server target's largest shapes (what `diffsr budget` counts per engine)
ranges = target("server").dim_ranges(ckpt.model.dims())
shapes = {k: r.max for k, r in ckpt.model.signature(name).shape_ranges(ranges).items()}
b = engine_budget(path, name, shapes, {})
print(json.dumps({"engine_weights_fp16_gib": round(b.weights_fp16 / GIB, 3), "engine_scratch_gib": round(b.activations / GIB, 3)}))
"""

WRITE = """
import gc, json, sys, time
import torch
from diffsr.calib.data import photo
from diffsr.export.model.checkpoint import load_submodule, open_checkpoint
from diffsr.export.model.settings import PipelineConfig
from diffsr.runtime.prompts import PROMPTERS
ckpt = open_checkpoint(sys.argv[1])
spec, tokens, dtype = ckpt.model.prompter(), int(sys.argv[2]), getattr(torch, sys.argv[3])
held, spent = {}, {}
def run(name, **feed):
    if name not in held:  # one graph's weights at a time
        held.clear(); gc.collect()
        start = time.perf_counter(); held[name] = load_submodule(ckpt, name, dtype)
        spent["load " + name] = time.perf_counter() - start
    feed = {k: v.to(dtype) if v.is_floating_point() else v for k, v in feed.items()}
    start = time.perf_counter()
    with torch.no_grad():
        out = held[name](**feed)
    spent.setdefault(name, []).append(time.perf_counter() - start)
    out = out if isinstance(out, tuple) else (out,)
    return dict(zip([t.name for t in ckpt.model.signature(name).outputs], (t.float() for t in out)))
writer = PROMPTERS[type(spec)](spec, run, "cpu")
text = writer(photo("astronaut", None), PipelineConfig(caption_tokens=tokens))
image, prefill, decode = (spent[name] for name in spec.graphs)
r = lambda x: round(x, 4)
print(json.dumps({"tokens": writer.tokens, "image_s": r(image[0]), "prefill_s": r(prefill[0]),
                  "decode_step_s": r(sum(decode) / len(decode)), "tokens_per_s": r(len(decode) / sum(decode)),
                  "load_s": {k[5:]: r(v) for k, v in spent.items() if k.startswith("load ")},
                  "dtype": sys.argv[3], "threads": torch.get_num_threads()}))
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
    ap.add_argument("--preset", default="blip2-opt-2.7b", help="a captioner's or a prompter's preset")
    ap.add_argument("--tokens", type=int, default=30, help="new tokens of the text")
    ap.add_argument("--dtype", default="float32", help="the reference's weights: float32, or bfloat16")
    ap.add_argument("--keep", action="store_true", help="keep each graph's files")
    ap.add_argument("--steps", default="init,export,write", help="which steps (write alone: on --work's checkpoint)")
    ap.add_argument("--json", type=Path, default=None, help="the report (a step not run keeps its entry there)")
    args = ap.parse_args()
    steps = set(args.steps.split(","))
    ckpt = args.work / "checkpoint"
    report: dict = {"preset": args.preset, "cpu_threads": os.cpu_count()}
    if args.json is not None and args.json.is_file():
        report = json.loads(args.json.read_text()) | report
    from diffsr.export.model.attachments import captioner, prompter

    if args.preset in prompter.PRESETS:
        folder, graphs = prompter.FOLDER, ["prompter_image", "prompter_prefill", "prompter_decode"]
    else:
        captioner.captioner_preset(args.preset)  # a bad name fails now
        folder, graphs = captioner.FOLDER, ["caption_image", "caption_prefill", "caption_decode"]
    if "init" in steps:
        report["init"], _ = measured([sys.executable, "-m", "diffsr.app.cli", "init", "--preset", "tiny", f"--{folder}",
                                      args.preset, "--out", str(ckpt)], f"init ({args.preset})")
        report["init"]["disk_gib"] = size_gib(ckpt / folder)
    for name in graphs if "export" in steps else ():
        report.setdefault("export", {})
        path = args.work / "onnx" / f"{name}.onnx"
        report["export"][name], out = measured([sys.executable, "-c", EXPORT, str(ckpt), name, str(path)], f"export {name}")
        report["export"][name] |= json.loads(out.strip().splitlines()[-1])
        report["export"][name]["disk_gib"] = size_gib(path, path.with_name(path.name + ".data"))
        if not args.keep:
            shutil.rmtree(path.parent)
    if "write" in steps:
        report["write"], out = measured([sys.executable, "-c", WRITE, str(ckpt), str(args.tokens), args.dtype],
                                        f"a text (torch, {args.dtype})")
        report["write"] |= json.loads(out.strip().splitlines()[-1])
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
