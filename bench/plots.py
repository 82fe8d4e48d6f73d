"""The run's PNG files: speedup bars per op and workload, GB/s against tensor size and count."""

from __future__ import annotations

import math
from pathlib import Path

from .harness import Probes

COLORS = ["#1f77b4", "#2ca02c", "#7f7f7f", "#9467bd", "#ff7f0e", "#8c564b"]


def pyplot():
    """matplotlib's pyplot on the file-only backend, or None (then the run says it drew nothing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def speedup_bars(plt, rows: list[dict], device: str, path: Path) -> Path | None:
    """One panel per table: for each (op, workload), ours' speedup over each other path (log scale)."""
    tables = dict.fromkeys(r["table"] for r in rows if r["kind"] == "measurement" and not r["sweep"])
    if not tables:
        return None
    fig, axes = plt.subplots(len(tables), 1, figsize=(12, 3.0 * len(tables)), squeeze=False)
    for ax, title in zip(axes[:, 0], tables):
        group = [r for r in rows if r["kind"] == "measurement" and r["table"] == title]
        others = list(dict.fromkeys(r["impl"] for r in group if r["impl"] != r["ours"]))
        cells = list(dict.fromkeys((r["op"], r["workload"]) for r in group))
        index = {(r["op"], r["workload"], r["impl"]): r.get("ours_speedup") for r in group}
        width = 0.8 / max(1, len(others))
        for j, impl in enumerate(others):
            values = [index.get((*c, impl)) or math.nan for c in cells]
            ax.bar([i + (j - (len(others) - 1) / 2) * width for i in range(len(cells))], values, width,
                   color=COLORS[j % len(COLORS)], label=f"over {impl}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(cells)), [f"{op}\n{w}" for op, w in cells], fontsize=7)
        ax.set_ylabel(f"{group[0]['ours']} speedup")
        ax.set_title(f"{device}: {title}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def gbps_sweep(plt, rows: list[dict], probes: Probes, device: str, sweep: str, path: Path) -> Path | None:
    """One panel per swept (family, op): GB/s of every path against x, the probes as lines."""
    points = [r for r in rows if r["kind"] == "measurement" and r["sweep"] == sweep and r["status"] == "ok"]
    series = list(dict.fromkeys((r["family"], r["op"]) for r in points))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4), squeeze=False)
    for ax, (family, op) in zip(axes[0], series):
        mine = [r for r in points if (r["family"], r["op"]) == (family, op)]
        for j, impl in enumerate(dict.fromkeys(r["impl"] for r in mine)):
            line = sorted((r["x"], r["gbps"]) for r in mine if r["impl"] == impl)
            ax.plot([x for x, _ in line], [y for _, y in line], "o-", color=["#d62728", *COLORS][j % 7], label=impl)
        for kind, style in (("copy", "--"), ("read", ":")):
            ax.axhline(probes.gbps(kind), color="k", ls=style, lw=1, label=f"{kind} bandwidth (probe)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements per tensor" if sweep == "size" else "tensors (same total elements)")
        ax.set_ylabel("GB/s (bytes counted / median time)")
        ax.set_title(f"{device}: {mine[0]['table']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw(rows: list[dict], probes: Probes, device: str, out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    paths = [speedup_bars(plt, rows, device, out / "speedup.png"),
             gbps_sweep(plt, rows, probes, device, "size", out / "gbps_vs_size.png"),
             gbps_sweep(plt, rows, probes, device, "count", out / "gbps_vs_count.png")]
    return [p for p in paths if p is not None]
