"""Attention across training: at chosen steps, every head's detector scores and chosen heads' patterns on a fixed
probe (repeated random tokens), then a loss-curve PNG, a PNG grid (steps × heads) and a self-contained HTML page
with a step slider.

The probe never changes during a run (its own seeded generator), so two snapshots differ only by what training
did. Patterns are the probe's first sequence (P×P, P ≤ 64 tokens) rounded to 1e-3: ~16 heads × 4096 numbers per
snapshot, small enough for a page with dozens of snapshots.

Shape legend: P probe tokens, L layers, H heads, K detectors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..inspect.files import atomic_write
from ..inspect.heads import DETECTORS, detect_heads, repeated_tokens
from ..inspect.render import figure_png
from ..inspect.training_page import smooth

__all__ = ["Snapshot", "Snapshotter", "load_snapshots", "write_outputs", "loss_png", "grid_png", "PATTERN_MAX_HEADS"]

PATTERN_MAX_HEADS = 16  # patterns kept per snapshot when the run does not choose heads
PROBE_BATCH = 8
SNAPSHOTS = "snapshots.json"


@dataclass
class Snapshot:
    step: int
    loss: Optional[float]  # training loss at this step (None at initialization)
    scores: List[List[List[Optional[float]]]]  # (L, H, K) detector scores, K in DETECTORS order; None = undefined
    heads: List[List[int]]  # [[layer, head], ...] whose patterns are kept
    patterns: List[List[List[float]]]  # per kept head: (P, P) weights of the probe's first sequence


class Snapshotter:
    def __init__(self, model, task, config):
        self.model, self.config = model, config
        V = task.vocab_size
        period = getattr(task, "period", None) or max(2, min(task.seq_len // 2, 32))
        period = min(period, task.seq_len // 2, 32)
        high = getattr(task, "n", V)  # generated tasks: the symbols, not the separator
        self.probe = repeated_tokens(PROBE_BATCH, max(period, 1), 2, high=high,
                                     seed=config.seed + 7_000_003)  # (PROBE_BATCH, P), P = 2·period
        c = model.config
        if config.snapshot_heads is not None:
            for l, h in config.snapshot_heads:
                if not (0 <= l < c.n_layer and 0 <= h < c.n_head):
                    raise ValueError(f"snapshot_heads: ({l}, {h}) is not a head of a {c.n_layer}-layer, "
                                     f"{c.n_head}-head model")
            self.heads = [list(lh) for lh in config.snapshot_heads]
        else:
            self.heads = [[l, h] for l in range(c.n_layer) for h in range(c.n_head)][:PATTERN_MAX_HEADS]

    @torch.no_grad()
    def take(self, step: int, loss: Optional[float]) -> Snapshot:
        from ..inspect.capture import capture
        was = self.model.training
        self.model.eval()
        res = detect_heads(self.model, self.probe)
        cap = capture(self.model, self.probe[:1], heads=sorted({h for _, h in self.heads}))
        self.model.train(was)
        kept = [int(h) for h in cap.layers[0].heads]
        patterns = [[[round(float(v), 3) for v in row] for row in cap.layers[l].weights[0, kept.index(h)]]
                    for l, h in self.heads]
        scores = [[[None if v != v else round(float(v), 4) for v in row.tolist()] for row in s] for s in res.scores]
        return Snapshot(step, loss, scores, [list(x) for x in self.heads], patterns)


def load_snapshots(out) -> List[Snapshot]:
    f = Path(out) / SNAPSHOTS
    if not f.is_file():
        return []
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
        return [Snapshot(**s) for s in doc["snapshots"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{str(f)!r}: not readable snapshots ({e})") from None


def _write(path: Path, data) -> None:
    atomic_write(path, data)


def _fig_png(fig) -> bytes:
    return figure_png(fig)


def loss_png(losses: List[float], evals: List[tuple], title: str = "", marks: List[int] = ()) -> bytes:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#9bb7d4", lw=0.6, label="training loss")
    ax.plot(steps, smooth(losses), color="#1f4e79", lw=1.6, label="smoothed")
    if evals:
        ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="#c0504d", ms=3, lw=1, label="held-out")
    for m in marks:
        ax.axvline(m, color="#888", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _fig_png(fig)


def grid_png(snaps: List[Snapshot], max_rows: int = 6, title: str = "") -> bytes:
    """Rows: up to ``max_rows`` snapshots spread over the run; columns: the kept heads, each titled with its
    induction and previous-token scores at that step."""
    from matplotlib.figure import Figure
    if not snaps:
        raise ValueError("snaps: no snapshots to draw")
    idx = sorted({round(i * (len(snaps) - 1) / max(1, max_rows - 1)) for i in range(min(max_rows, len(snaps)))})
    rows = [snaps[i] for i in idx]
    heads = rows[0].heads
    fig = Figure(figsize=(1.6 * len(heads) + 0.8, 1.7 * len(rows) + 0.6))
    ip, ii = DETECTORS.index("previous_token"), DETECTORS.index("induction")
    for r, s in enumerate(rows):
        for c, (l, h) in enumerate(heads):
            ax = fig.add_subplot(len(rows), len(heads), r * len(heads) + c + 1)
            ax.imshow(torch.tensor(s.patterns[c]).numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            sc = [float("nan") if v is None else v for v in s.scores[l][h]]
            ax.set_title(f"L{l}H{h} ind {sc[ii]:.2f} prev {sc[ip]:.2f}", fontsize=6)
            if c == 0:
                ax.set_ylabel(f"step {s.step}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _fig_png(fig)


def write_outputs(out: Path, config, losses: List[float], evals: List[tuple], snaps: List[Snapshot],
                  step: int) -> Dict[str, Path]:
    """loss.png always; with snapshots also snapshots.json, attention.png and training.html. Each atomically."""
    written = {}
    title = f"{config.task}: {config.n_layer} layers × {config.n_head} heads, d={config.d_model}, step {step}"
    try:
        import matplotlib  # noqa: F401  (the viz extra)
        have_mpl = True
    except ImportError:
        have_mpl = False
    if have_mpl:
        _write(out / "loss.png", loss_png(losses, evals, title, [s.step for s in snaps]))
        written["loss"] = out / "loss.png"
    if snaps:
        _write(out / SNAPSHOTS, json.dumps({"detectors": list(DETECTORS),
                                            "snapshots": [asdict(s) for s in snaps]}))
        written["snapshots"] = out / SNAPSHOTS
        if have_mpl:
            _write(out / "attention.png", grid_png(snaps, title=title))
            written["grid"] = out / "attention.png"
        from ..inspect.training_page import training_html
        _write(out / "training.html", training_html(snaps, losses, evals, title=title))
        written["page"] = out / "training.html"
    return written
