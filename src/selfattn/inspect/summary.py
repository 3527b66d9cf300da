"""A terminal summary of a capture over a text: per layer, the most focused head, the head with the strongest
links, and what each token attends to most.

Special tokens ([CLS], [SEP], BOS...) are set aside: many heads park most of their weight on them (a "no-op"
sink), which says little about how words relate. Their share is reported instead.

Shape legend: H heads, N tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from .capture import Capture
from .render import display_tokens

__all__ = ["LayerSummary", "summarize", "format_summary"]


@dataclass
class LayerSummary:
    index: int
    name: str
    focused_head: int  # lowest mean entropy over ordinary-token rows
    focused_entropy: float
    strong_head: int  # highest mean over word rows of the row's strongest link to another word
    strong_link: Tuple[int, int, float]  # (query, key, weight): that head's strongest word → other-word link
    strong_score: float  # that head's mean over word rows of the row's strongest link to another word
    special_share: float  # mean weight on special tokens over word rows and all heads
    top_key: List[Tuple[int, int, float]]  # per word: (query, key, head-mean weight), the other word it attends to most


def summarize(cap: Capture, special: Sequence[bool], batch: int = 0) -> List[LayerSummary]:
    """One summary per self-attention call of ``cap`` whose weights cover every head and row."""
    out = []
    spec = torch.tensor([bool(s) for s in special])
    N = spec.numel()
    ordinary = ~spec
    if not bool(ordinary.any()):
        ordinary = torch.ones_like(spec)  # nothing but special tokens: use them all rather than nothing
    for lc in cap.layers:
        if lc.Nq != N or lc.Nk != N or lc.heads.numel() != lc.Hq or lc.rows.numel() != N:
            continue
        st = lc.stats
        rows = ordinary  # (N,)
        ent = st.entropy[batch][:, rows].mean(-1)  # (H,)
        sp = st.special[batch][:, rows].mean()
        qi_ord = torch.nonzero(rows).flatten()  # ordinary query rows
        keep = ordinary[None, :] & (torch.arange(N)[None, :] != qi_ord[:, None])  # (n_ord, N): other words only
        w = lc.weights[batch].float()  # (H, N, N)
        links = torch.where(keep, w[:, qi_ord], torch.zeros(()))  # (H, n_ord, N) word → other word
        best = links.amax(-1)  # (H, n_ord) each row's strongest link to another word
        focused = int(torch.argmin(ent))
        strong = int(torch.argmax(best.mean(-1)))  # the head whose rows link most strongly, on average
        flat = int(torch.argmax(links[strong]))
        qi, ki = int(qi_ord[flat // N]), flat % N
        mean = torch.where(keep, w.mean(0)[qi_ord], torch.full((), -1.0))  # (n_ord, N) head average
        tops = []
        for r, i in enumerate(qi_ord.tolist()):
            j = int(torch.argmax(mean[r]))
            if mean[r, j] >= 0:  # −1 everywhere: a row with no other word to attend to
                tops.append((i, j, float(mean[r, j])))
        out.append(LayerSummary(lc.index, lc.name, focused, float(ent[focused]), strong,
                                (qi, ki, float(links[strong].flatten()[flat])), float(best[strong].mean()),
                                float(sp), tops))
    return out


def _short(w: float) -> str:
    return f"{w:.2f}"[1:] if w < 0.995 else "1.0"  # ".42": two digits, no leading zero, for dense lines


def format_summary(summaries: Sequence[LayerSummary], tokens: Sequence[str], width: int = 100) -> List[str]:
    """Plain-text lines, at most ``width`` columns."""
    toks = display_tokens(tokens)
    lines = []
    for s in summaries:
        q, k, w = s.strong_link
        lines.append(f"layer {s.index}: most focused head {s.focused_head} (entropy {s.focused_entropy:.2f} nats); "
                     f"strongest links head {s.strong_head} ({toks[q]} → {toks[k]} {w:.2f}); "
                     f"{100 * s.special_share:.0f}% of weight on special tokens")
        line = "  each word attends most to (head mean, other words):"
        for i, j, wt in s.top_key:
            item = f" {toks[i]}→{toks[j]} {_short(wt)}"
            if len(line) + len(item) + 1 > width:
                lines.append(line)
                line = "   "
            line += item + ","
        lines.append(line.rstrip(","))
    return lines
