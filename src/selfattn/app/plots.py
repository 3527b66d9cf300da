"""The benchmark's picture (``selfattn bench``): throughput and peak memory against sequence length, matplotlib
(Agg backend: no display, no global pyplot state). Returns the PNG bytes and, given ``path``, writes them
atomically."""
from __future__ import annotations

from typing import Dict, List, Sequence

from matplotlib.figure import Figure

from ..inspect.render import figure_png

__all__ = ["bench_png"]


def bench_png(rows: Sequence[Dict], path=None, title: str = "selfattn bench") -> bytes:
    """rows: ``selfattn.app.measure.run_core_bench`` dicts ('path' or 'impl', 'N', 'tokens_per_s', 'peak_mib' (None where
    not measured), optionally 'mask' and 'mode') -> two panels against sequence length, forward rows only:
    throughput (solid: no mask, dashed: causal) and peak extra memory; one colour per implementation."""
    fwd = [r for r in rows if r.get("mode", "fwd") == "fwd"]
    colours = {}
    fig = Figure(figsize=(10.5, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    groups: Dict[tuple, List[Dict]] = {}
    for r in fwd:
        groups.setdefault((str(r.get("path", r["impl"])), str(r.get("mask", "none"))), []).append(r)
    palette = ["#1f6fb2", "#e08a00", "#5a9e3a", "#b23a48", "#6b4fa0"]
    for (impl, mask), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["N"])
        c = colours.setdefault(impl, palette[len(colours) % len(palette)])
        ls = "--" if mask == "causal" else "-"
        ax1.plot([r["N"] for r in rs], [r["tokens_per_s"] for r in rs], ls, marker="o", color=c,
                 label=f"{impl} ({mask})" if mask != "none" else impl)
        mem = [r for r in rs if r.get("peak_mib") is not None]
        if mem:
            ax2.plot([r["N"] for r in mem], [max(r["peak_mib"], 0.01) for r in mem], ls, marker="o", color=c,
                     label=f"{impl} ({mask})" if mask != "none" else impl)
    for ax, lab in ((ax1, "forward throughput (tokens / s)"), (ax2, "peak extra memory of one call (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N", fontsize=10)
        ax.set_ylabel(lab, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
    fig.suptitle(title, fontsize=12)
    return figure_png(fig, path)
