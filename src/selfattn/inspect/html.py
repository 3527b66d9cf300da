"""A self-contained interactive HTML page of a capture: every byte inline (CSS, JS, data), no CDN, no network.

Choose a layer and head (or the mean of heads); hover a token on the left to see what it attends to, on the right
to see what attends to it; a heatmap of the weights and a per-head statistics table (click a row to show it).
The page template is ``template.html`` beside this file; the data goes in as JSON inside a
``<script type="application/json">`` block (with ``<`` escaped, so no token text can close the script).

Shape legend: B batch, H heads kept, N query tokens, M key tokens.
"""
from __future__ import annotations

import html as _html
import json
from importlib import resources
from typing import List, Optional, Sequence

from .files import atomic_write
from .capture import Capture
from .render import display_tokens

__all__ = ["attention_html", "HTML_MAX_NUMBERS"]

# The page holds every kept weight of every layer as JSON (~7 bytes each): 2M numbers ≈ 14 MB is the most a
# browser handles comfortably. Longer inputs: capture fewer heads/rows, or use the PNG and the statistics.
HTML_MAX_NUMBERS = 2_000_000


def _template() -> str:
    return resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")


def attention_html(cap: Capture, tokens: Sequence[str], path=None, *, title: str = "Attention",
                   subtitle: str = "", layer: int = 0, head: int = 0, special: Optional[Sequence[bool]] = None,
                   batch: int = 0) -> str:
    """Build the page for the self-attention calls of ``cap`` whose every query row was kept (capture with
    rows=None); heads are the ones kept. tokens: the N input tokens. special: N bools (special tokens are shown
    in italics). layer, head: what is shown first (index into the calls shown, and into the kept heads).
    Returns the HTML text and, given ``path``, writes it atomically."""
    if not isinstance(cap, Capture):
        raise TypeError(f"cap: expected a selfattn.inspect.Capture, got {type(cap).__name__}")
    toks = display_tokens(tokens)
    N = len(toks)
    spec = [bool(s) for s in special] if special is not None else [False] * N
    if len(spec) != N:
        raise ValueError(f"special: expected {N} flags (one per token), got {len(spec)}")
    shown = [lc for lc in cap.layers if lc.Nq == N and lc.Nk == N and lc.rows.numel() == N and lc.heads.numel() > 0]
    if not shown:
        raise ValueError(f"cap: no self-attention call over these {N} tokens with every row kept (capture with "
                         f"rows=None and at least one head)")
    total = sum(lc.heads.numel() * N * N for lc in shown)
    if total > HTML_MAX_NUMBERS:
        raise ValueError(f"cap: the page would hold {total} weights, above HTML_MAX_NUMBERS={HTML_MAX_NUMBERS}; "
                         f"capture fewer heads or a shorter text")
    if not 0 <= batch < shown[0].weights.shape[0]:
        raise ValueError(f"batch: expected an index in [0, {shown[0].weights.shape[0]}), got {batch}")
    if not 0 <= layer < len(shown):
        raise ValueError(f"layer: expected an index in [0, {len(shown)}), got {layer}")
    if not 0 <= head < shown[layer].heads.numel():
        raise ValueError(f"head: expected an index in [0, {shown[layer].heads.numel()}), got {head}")
    layers: List[dict] = []
    for lc in shown:
        table = lc.stats.table()
        heads = [int(h) for h in lc.heads]
        w = lc.weights[batch].float()  # (h, N, N)
        layers.append({
            "index": lc.index, "name": lc.name, "heads": heads,
            "weights": [[[round(float(x), 4) for x in row] for row in wh.tolist()] for wh in w],
            "stats": [{k: round(v, 5) if isinstance(v, float) else v for k, v in table[h].items()} for h in heads],
        })
    data = {"title": title, "subtitle": subtitle, "tokens": toks, "key_tokens": toks, "special": spec,
            "key_special": spec, "layers": layers, "initial": {"layer": layer, "head": head}}
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # inert inside <script>
    page = _template().replace("__TITLE__", _html.escape(title)).replace("__DATA__", blob)
    if path is not None:
        atomic_write(path, page)
    return page
