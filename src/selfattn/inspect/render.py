"""PNG pictures of attention weights (matplotlib, Agg backend: no display, no global pyplot state).

* ``heatmap_png``   one head (or a head average): queries down, keys across, token labels on both axes.
* ``head_grid_png`` every head of one layer side by side, each titled with its entropy and mean distance.

Every function returns the PNG bytes and, given ``path``, writes them atomically.
"""
from __future__ import annotations

import io
import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..extras import need
from .files import atomic_write

__all__ = ["heatmap_png", "head_grid_png", "display_tokens", "figure_png"]

CMAP = "Blues"
DPI = 110


def display_tokens(tokens: Sequence[str]) -> List[str]:
    """WordPiece '##piece' shown as '·piece', GPT-2/Llama leading-space markers dropped: what a reader expects."""
    out = []
    for t in tokens:
        t = str(t)
        if t.startswith("##"):
            t = "·" + t[2:]
        t = t.replace("Ġ", "").replace("▁", "").replace("Ċ", "\\n")
        out.append(t if t else "␣")
    return out


def _figure(**kw):
    """A matplotlib Figure: the [viz] extra, imported on first drawing so that selfattn.inspect imports without it."""
    return need("matplotlib.figure", "viz", "drawing PNGs").Figure(**kw)


def figure_png(fig, path=None) -> bytes:
    """A matplotlib Figure (no pyplot state) -> PNG bytes at DPI; written atomically to ``path`` when given."""
    need("matplotlib.backends.backend_agg", "viz", "drawing PNGs").FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = buf.getvalue()
    if path is not None:
        atomic_write(path, data)
    return data


def _as_matrix(name: str, w, dims: int) -> Tensor:
    if not isinstance(w, Tensor):
        w = torch.as_tensor(w)
    if w.dim() != dims:
        raise ValueError(f"{name}: expected {dims} dims, got shape {tuple(w.shape)}")
    return w.detach().to(torch.float32).cpu()


def _plain(text: str) -> str:
    """Text as matplotlib shows it literally: '$' would start mathtext ("$5 and $10", "$\\frac$" fail or render
    as formulas)."""
    return text.replace("$", r"\$")


def _check_labels(name: str, labels, n: int) -> List[str]:
    if labels is None:
        return [str(i) for i in range(n)]
    labels = [_plain(t) for t in display_tokens(labels)]
    if len(labels) != n:
        raise ValueError(f"{name}: expected {n} labels, got {len(labels)}")
    return labels


def _draw(ax, w: Tensor, ql: List[str], kl: List[str], fontsize: float, show_q: bool = True, show_k: bool = True,
          annotate: bool = False, step: int = 1):
    """One heatmap; ``step`` > 1 labels every step-th token so that long inputs keep a readable font."""
    im = ax.imshow(w.numpy(), cmap=CMAP, vmin=0.0, vmax=max(float(w.max()), 1e-6), aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(0, len(kl), step))
    ax.set_yticks(range(0, len(ql), step))
    ax.set_xticklabels(kl[::step] if show_k else [], rotation=90, fontsize=fontsize)
    ax.set_yticklabels(ql[::step] if show_q else [], fontsize=fontsize)
    ax.tick_params(length=0)
    if annotate:
        vmax = max(float(w.max()), 1e-6)
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                v = float(w[i, j])
                if v >= 0.1:
                    ax.text(j, i, f"{v:.2f}"[1:] if v < 1 else "1.0", ha="center", va="center",
                            fontsize=fontsize * 0.8, color="white" if v > 0.6 * vmax else "#08306b")
    return im


def heatmap_png(weights, q_tokens: Optional[Sequence[str]] = None, k_tokens: Optional[Sequence[str]] = None,
                path=None, title: str = "") -> bytes:
    """weights: (Nq, Nk) one head's (or a head-average's) attention; row i = what query i attends to."""
    w = _as_matrix("weights", weights, 2)
    Nq, Nk = w.shape
    ql = _check_labels("q_tokens", q_tokens, Nq)
    kl = _check_labels("k_tokens", k_tokens if k_tokens is not None else (q_tokens if Nq == Nk else None), Nk)
    n = max(Nq, Nk)
    cell = 0.34 if n <= 40 else max(0.1, 13.0 / n)  # inches per token: the figure grows up to ~14 in
    fs = 10 if n <= 40 else 8
    step = max(1, math.ceil(fs * 1.3 / 72 / cell))  # a label needs ~1.3 font heights: skip tokens to make room
    fig = _figure(figsize=(max(4.5, 1.6 + cell * Nk), max(4.0, 1.6 + cell * Nq)), layout="constrained")
    ax = fig.add_subplot()
    im = _draw(ax, w, ql, kl, fs, annotate=n <= 24, step=step)
    ax.set_xlabel("attended key", fontsize=fs + 1)
    ax.set_ylabel("query", fontsize=fs + 1)
    if title:
        ax.set_title(_plain(title if len(title) <= 80 else title[:77] + "…"), fontsize=fs + 2)
    fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=fs)
    return figure_png(fig, path)


def head_grid_png(weights, tokens: Optional[Sequence[str]] = None, path=None, title: str = "",
                  head_titles: Optional[Sequence[str]] = None, heads: Optional[Sequence[int]] = None) -> bytes:
    """weights: (H, N, N) the heads of one layer (self-attention). A grid of heatmaps, ≤ 4 per row; query labels
    on the first column, key labels on the bottom row. head_titles: one caption per head."""
    w = _as_matrix("weights", weights, 3)
    H, Nq, Nk = w.shape
    ql = _check_labels("tokens", tokens, Nq)
    kl = ql if Nq == Nk else [str(i) for i in range(Nk)]
    heads = list(range(H)) if heads is None else list(heads)
    ncol = min(4, H)
    nrow = math.ceil(H / ncol)
    n = max(Nq, Nk)
    fs = 8 if n <= 20 else 7
    side = 2.9 if n <= 20 else (3.4 if n <= 40 else 4.0)  # inches per head
    step = max(1, math.ceil(n * fs * 1.3 / 72 / (side * 0.85)))  # label every step-th token at a readable size
    fig = _figure(figsize=(0.9 + side * ncol, 0.8 + side * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for idx in range(nrow * ncol):
        ax = axes[idx // ncol][idx % ncol]
        if idx >= H:
            ax.axis("off")
            continue
        _draw(ax, w[idx], ql, kl, fs, show_q=idx % ncol == 0, show_k=idx // ncol == nrow - 1 or idx + ncol >= H,
              step=step)
        cap = head_titles[idx] if head_titles is not None else f"head {heads[idx]}"
        ax.set_title(_plain(cap), fontsize=fs + 1.5)
    if title:
        fig.suptitle(_plain(title if len(title) <= 110 else title[:107] + "…"), fontsize=12)
    fig.supxlabel("attended key  (colour: white 0 → dark blue = the head's largest weight)", fontsize=fs + 2)
    fig.supylabel("query", fontsize=fs + 2)
    return figure_png(fig, path)
