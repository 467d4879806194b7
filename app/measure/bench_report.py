"""Presenting benchmark records: table rows with ratios, and a bar chart. Nothing here measures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffsr.app.measure.bench import Record

MEMORY_HEADER = "host memory added by loading, MiB"  # the one meaning of Record.host_mib (see its comment)


def table_rows(records: list[Record], flops: dict[str, float] | None = None, base: str = "torch") -> list[list[str]]:
    """stage, then per backend 'median (p95) ratio' where ratio = the `base` backend's median over this
    one's (a speed-up), then the stage's GFLOP."""
    reference = next((r for r in records if r.backend == base), None)
    rows = []
    for stage in [*stages_of(records), "end_to_end"]:
        row = [stage]
        for rec in records:
            s = rec.end_to_end if stage == "end_to_end" else rec.stages.get(stage)
            if not s:
                row.append("-")
                continue
            ref = None
            if reference is not None and rec is not reference:
                ref = reference.end_to_end if stage == "end_to_end" else reference.stages.get(stage)
            ratio = f" {ref['median_s'] / s['median_s']:.2f}x" if ref and s["median_s"] > 0 else ""
            row.append(f"{s['median_s']:.3f} ({s['p95_s']:.3f}){ratio}")
        row.append(f"{flops[stage] / 1e9:.1f}" if flops and stage in flops else "")
        rows.append(row)
    return rows


def stages_of(records: list[Record]) -> list[str]:
    """Every stage any backend timed, in the order the pipelines timed them."""
    return list(dict.fromkeys(stage for rec in records for stage in rec.stages))


def memory_line(records: list[Record]) -> str:
    """Each backend's host memory; "-" where it was not measured (a server given by its URL)."""
    values = ", ".join(f"{r.backend} {'-' if r.host_mib is None else f'{r.host_mib:.0f}'}" for r in records)
    return f"{MEMORY_HEADER}: {values}"


def plot(records: list[Record], path: Path, title: str) -> None:
    """Grouped bars: median seconds per stage, one bar per backend, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in (*stages_of(records), "end_to_end") if s != "denoise"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(records)
    for i, rec in enumerate(records):
        values = [(rec.end_to_end if s == "end_to_end" else rec.stages.get(s, {})).get("median_s", 0.0) for s in stages]
        ax.bar(np.arange(len(stages)) + i * width, values, width, label=rec.backend)
    ax.set_xticks(np.arange(len(stages)) + width * (len(records) - 1) / 2, stages, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("median seconds (log)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
