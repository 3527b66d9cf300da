"""Attention across training as one self-contained HTML page: a step slider over the snapshots; the loss curve
with the current step marked; every detector's best head over time; the kept heads' patterns on the probe and
every head's detector scores at the chosen step. Every byte inline (no CDN, no network); the data goes in as JSON
inside ``<script type="application/json">`` with ``<`` escaped, so no string can close the script.

The page template is ``training_page.html`` beside this file.
"""
from __future__ import annotations

import html as _html
import json
from importlib import resources
from typing import List, Sequence

from .heads import DETECTORS

__all__ = ["training_html", "PAGE_MAX_NUMBERS"]

PAGE_MAX_NUMBERS = 2_000_000  # ~14 MB of JSON: beyond it keep fewer heads or snapshots


def smooth(xs: List[float], k: int = 0) -> List[float]:
    """Trailing mean over k steps (k = 0: about 1/50 of the run): what the eye reads as the loss curve."""
    k = k or max(1, len(xs) // 50)
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def training_html(snapshots: Sequence, losses: Sequence[float], evals: Sequence[tuple] = (), *,
                  title: str = "Attention across training", subtitle: str = "") -> str:
    """snapshots: ``selfattn.train.snapshots.Snapshot`` objects (or dicts with their fields) in step order, all
    keeping the same heads; losses: training loss per step; evals: (step, held-out loss). Returns the page."""
    snaps = [s if isinstance(s, dict) else vars(s) for s in snapshots]
    if not snaps:
        raise ValueError("snapshots: expected at least one snapshot, got none")
    heads = snaps[0]["heads"]
    if any(s["heads"] != heads for s in snaps):
        raise ValueError("snapshots: every snapshot must keep the same heads")
    n = sum(len(p) * len(p) for s in snaps for p in s["patterns"])
    if n > PAGE_MAX_NUMBERS:
        raise ValueError(f"snapshots: {n} pattern numbers, above PAGE_MAX_NUMBERS={PAGE_MAX_NUMBERS}; keep fewer "
                         f"heads or snapshots")
    losses = [float(x) for x in losses]
    k = max(1, len(losses) // 50)
    sm = [round(x, 4) for x in smooth(losses, k)]
    data = {"title": title, "subtitle": subtitle or f"{len(snaps)} snapshots, {len(losses)} steps",
            "detectors": list(DETECTORS), "smoothed": sm, "evals": [list(e) for e in evals],
            "snapshots": [{"step": s["step"], "loss": s["loss"], "scores": s["scores"], "heads": s["heads"],
                           "patterns": s["patterns"]} for s in snaps]}
    text = json.dumps(data, allow_nan=False).replace("<", "\\u003c")
    page = resources.files(__package__).joinpath("training_page.html").read_text(encoding="utf-8")
    return page.replace("__TITLE__", _html.escape(title)).replace("__DATA__", text)
