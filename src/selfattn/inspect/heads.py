"""Head detectors: score every layer × head for recognizable mechanisms, from exact weights, at any length.

For a probe input (repeated random tokens by default, so copying and induction have something to find), every
self-attention call of the model hands q, k and its kernel's LSE to a recorder; the weights are recomputed exactly
(``w_ij = exp(s_ij − lse_i)``, see ``weights.py``) one head and one block of query rows at a time, scored, and
dropped. Memory: one (B, block_q, Nk) block, never the (B, H, N, N) weights of a layer.

Each score lies in [0, 1] and is averaged over the batch and over the query rows where it is defined
(pos(i) = i + Nk − Nq is the query's key position; tok the probe tokens):

* previous_token   w[i, pos(i) − 1]                                    rows with pos(i) ≥ 1
* induction        Σ w[i, j] over keys j ≤ pos(i) with tok[j − 1] = tok[i]   (the token after an earlier copy of
                   the current one: what an induction head attends to)       rows with at least one such j
* duplicate_token  Σ w[i, j] over keys j < pos(i) with tok[j] = tok[i]  rows with at least one such j
* first_token      w[i, 0] (an attention sink; [CLS] / BOS)            every row
* local            Σ w[i, j] over |pos(i) − j| < window                rows with pos(i) ≥ window
* uniform          entropy / log(keys allowed by the mask): 1 = even       rows allowed ≥ 2 keys

TransformerLens' head detector scores previous-token, duplicate-token and induction heads the same way (mean
weight on the expected positions); Olsson et al. (2022) use the induction score on repeated random sequences.

Shape legend: B batch, Hq query heads, Nq queries, Nk keys, r rows in a block, K detectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .capture import _call  # model(**inputs) | model(*inputs) | model(inputs)
from .weights import ScoreTiles

__all__ = ["DETECTORS", "HeadScores", "score_heads", "detect_heads", "repeated_tokens", "DEFAULT_THRESHOLDS"]

DETECTORS = ("previous_token", "induction", "duplicate_token", "first_token", "local", "uniform")
# a head "is" a mechanism above these scores. The pointer scores (TransformerLens' examples flag heads from ~0.3-0.5)
# are low by chance (~1/keys); first-token, local and uniform are high by chance on short rows, so they ask more.
DEFAULT_THRESHOLDS = {"previous_token": 0.4, "induction": 0.4, "duplicate_token": 0.4, "first_token": 0.5,
                      "local": 0.6, "uniform": 0.9}
DEFAULT_BLOCK_Q = 128


def repeated_tokens(batch: int, length: int, reps: int = 2, *, low: int = 0, high: Optional[int] = None, seed: int = 0,
                    choices: Optional[Sequence[int]] = None, prefix: Sequence[int] = (),
                    suffix: Sequence[int] = ()) -> Tensor:
    """The induction probe: per batch row, ``length`` random tokens repeated ``reps`` times, between fixed
    ``prefix`` / ``suffix`` tokens (say [CLS] … [SEP]) -> (batch, len(prefix) + reps·length + len(suffix)) int64.
    Tokens are drawn uniformly from [low, high), or from ``choices`` (ordinary words, no special tokens)."""
    for name, v, least in (("batch", batch, 1), ("length", length, 1), ("reps", reps, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    g = torch.Generator().manual_seed(int(seed))
    if choices is not None:
        pool = torch.as_tensor(list(choices), dtype=torch.int64)
        if pool.numel() == 0:
            raise ValueError("choices: expected at least one token id, got none")
        r = pool[torch.randint(0, pool.numel(), (batch, length), generator=g)]
    else:
        if high is None or not (0 <= low < high):
            raise ValueError(f"low, high: expected 0 <= low < high, got low={low}, high={high}")
        r = torch.randint(low, high, (batch, length), generator=g)  # (B, L)
    pre = torch.as_tensor(list(prefix), dtype=torch.int64).expand(batch, len(prefix))
    suf = torch.as_tensor(list(suffix), dtype=torch.int64).expand(batch, len(suffix))
    return torch.cat([pre, r.repeat(1, reps), suf], 1)


@dataclass
class HeadScores:
    """Scores of every head of every self-attention call: ``scores[c]`` is (Hq, K) for call c (K = detectors)."""
    names: List[str]
    scores: List[Tensor]
    detectors: tuple = DETECTORS
    threshold: Optional[float] = None  # one threshold for every detector; None = DEFAULT_THRESHOLDS

    def _limits(self, threshold: Optional[float]) -> Dict[str, float]:
        t = self.threshold if threshold is None else threshold
        return {d: DEFAULT_THRESHOLDS.get(d, 0.5) if t is None else float(t) for d in self.detectors}

    def table(self) -> List[dict]:
        """One dict per (layer, head): layer, name, head and every detector's score as a float."""
        return [{"layer": c, "name": n, "head": h, **{d: float(s[h, i]) for i, d in enumerate(self.detectors)}}
                for c, (n, s) in enumerate(zip(self.names, self.scores)) for h in range(s.shape[0])]

    def found(self, threshold: Optional[float] = None) -> Dict[str, List[tuple]]:
        """detector -> [(layer, head, score)] of the heads scoring above ``threshold`` (None: the instance's,
        else DEFAULT_THRESHOLDS per detector), best first."""
        t = self._limits(threshold)
        out = {d: [] for d in self.detectors}
        for row in self.table():
            for d in self.detectors:
                if row[d] == row[d] and row[d] > t[d]:  # NaN (undefined for this probe) never counts
                    out[d].append((row["layer"], row["head"], row[d]))
        return {d: sorted(v, key=lambda x: -x[2]) for d, v in out.items()}

    def best(self, detector: str) -> tuple:
        """(layer, head, score) of the highest-scoring head for one detector."""
        if detector not in self.detectors:
            raise ValueError(f"detector: expected one of {self.detectors}, got {detector!r}")
        i = self.detectors.index(detector)
        c, h, v = max(((c, h, float(s[h, i])) for c, s in enumerate(self.scores) for h in range(s.shape[0])),
                      key=lambda x: -math.inf if x[2] != x[2] else x[2])
        return c, h, v

    def format(self, threshold: Optional[float] = None) -> str:
        """A text table (layer.head × detector) and, per detector, the heads found above the threshold."""
        t = self._limits(threshold)
        short = {"previous_token": "prev", "induction": "induct", "duplicate_token": "dup", "first_token": "first",
                 "local": "local", "uniform": "unif"}
        head = "head    " + " ".join(f"{short.get(d, d)[:7]:>7}" for d in self.detectors)
        lines = [head]
        for row in self.table():
            cells = " ".join("      -" if row[d] != row[d] else f"{row[d]:7.2f}" for d in self.detectors)
            lines.append(f"{row['layer']:>2}.{row['head']:<4} {cells}")
        lines.append("heads found (score above the threshold):")
        for d, hs in self.found(threshold).items():
            lines.append(f"  {d} (> {t[d]:g}): " + (", ".join(f"{c}.{h} ({v:.2f})" for c, h, v in hs) if hs else "none"))
        return "\n".join(lines)


def score_heads(q: Tensor, k: Tensor, lse: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
                tokens: Optional[Tensor] = None, window: int = 4, block_q: int = DEFAULT_BLOCK_Q) -> Tensor:
    """Detector scores of every head of one attention call -> (Hq, K) float64, K = len(DETECTORS).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), lse: (B, Hq, Nq) from ``attention(..., return_lse=True)`` with the same
    mask, bias and scale. tokens: (B, Nk) or (Nk,) int token ids of the keys (the probe); None leaves the
    token-based scores (induction, duplicate_token) NaN. Streams one head and ``block_q`` rows at a time.
    """
    for name, v in (("window", window), ("block_q", block_q)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    off = Nk - Nq  # query i sits at key position i + off (bottom-right, as causal masks align)
    if tokens is not None:
        if not isinstance(tokens, Tensor) or tokens.dtype not in (torch.int64, torch.int32) \
                or tokens.shape[-1] != Nk or tokens.dim() not in (1, 2) \
                or (tokens.dim() == 2 and tokens.shape[0] not in (1, B)):
            raise ValueError(f"tokens: expected int token ids of shape (Nk,) or (B, Nk) = ({B}, {Nk}), got "
                             f"{(tuple(tokens.shape), tokens.dtype) if isinstance(tokens, Tensor) else tokens!r}")
        tokens = (tokens if tokens.dim() == 2 else tokens[None]).to(q.device, torch.int64).expand(B, Nk)
        prev_tok = torch.cat([tokens.new_full((B, 1), -1), tokens[:, :-1]], 1)  # (B, Nk): token before key j
    K = len(DETECTORS)
    num = torch.zeros(Hq, K, dtype=torch.float64)
    cnt = torch.zeros(Hq, K, dtype=torch.float64)
    kidx = torch.arange(Nk, device=q.device)  # (Nk,)
    for rs in range(0, Nq, block_q):
        re = min(Nq, rs + block_q)
        pos = torch.arange(rs, re, device=q.device) + off  # (r,) key position of each query
        valid = torch.isfinite(lse[:, :, rs:re])  # (B, Hq, r): rows that see at least one key
        local = ((pos[:, None] - kidx[None, :]).abs() < window)  # (r, Nk)
        has_prev = (pos >= 1) & (pos - 1 < Nk)  # (r,)
        prev_at = (pos - 1).clamp(0, Nk - 1)  # (r,)
        if tokens is not None:
            tq = tokens.gather(1, pos.clamp(0, Nk - 1)[None].expand(B, -1))  # (B, r) token of each query
            dup = (tokens[:, None, :] == tq[:, :, None]) & (kidx[None, None, :] < pos[None, :, None])  # (B, r, Nk)
            ind = (prev_tok[:, None, :] == tq[:, :, None]) & (kidx[None, None, :] <= pos[None, :, None])
            dup_rows, ind_rows = dup.any(-1), ind.any(-1)  # (B, r)
        for h in range(Hq):
            # log w = s − lse for head h, rows [rs, re), every key: (B, r, Nk), −inf where the mask forbids a key.
            # The only N-long block alive at a time (memory B·block_q·Nk, never the layer's (B, Hq, N, N)).
            st = ScoreTiles(q, k, mask, bias, scale, heads=[h], rows=slice(rs, re))
            logw = (st.tile(0, Nk) - st.lse_sel(lse))[:, 0].to(torch.float64)
            allowed = torch.isfinite(logw)
            w = torch.exp(logw)  # exact weights; 0 where masked
            v = valid[:, h]  # (B, r)

            def add(i: int, vals: Tensor, rows: Tensor) -> None:
                rows = rows & v
                num[h, i] += float(torch.where(rows, vals, torch.zeros_like(vals)).sum())
                cnt[h, i] += float(rows.sum())

            add(0, w.gather(2, prev_at[None, :, None].expand(B, -1, 1))[..., 0], has_prev[None].expand(B, -1))
            if tokens is not None:
                add(1, (w * ind).sum(-1), ind_rows)
                add(2, (w * dup).sum(-1), dup_rows)
            add(3, w[..., 0], torch.ones_like(v))
            add(4, (w * local).sum(-1), (pos >= window)[None].expand(B, -1))
            seen = allowed.sum(-1)  # (B, r) keys the row may attend (by the mask, not by the weights' size)
            ent = -torch.where(allowed & (w > 0), w * logw, torch.zeros_like(w)).sum(-1)
            add(5, ent / torch.log(seen.clamp_min(2).to(w.dtype)), seen >= 2)
    out = num / cnt
    return torch.where(cnt > 0, out, torch.full_like(out, float("nan")))




def detect_heads(model: nn.Module, inputs, tokens: Optional[Tensor] = None, *, window: int = 4,
                 block_q: int = DEFAULT_BLOCK_Q, threshold: Optional[float] = None) -> HeadScores:
    """Run ``model`` on ``inputs`` (a tensor, a tuple of positional arguments or a dict of keyword arguments)
    without gradients and score every head of every self-attention call (cross-attention calls, whose keys are
    another sequence, are skipped). tokens: (B, N) ids of the input sequence (default: ``inputs`` itself when it
    is an int tensor, else ``inputs["input_ids"]``); see the module docstring for the scores.
    Works for selfattn's models and for transformers models on the selfattn backend (anything whose attention
    goes through ``selfattn.nn`` recorders)."""
    from ..nn import AttentionRecord, record_attention  # inspect sits above nn in the stack

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module built on selfattn layers, got {type(model).__name__}")
    if tokens is None:
        if isinstance(inputs, Tensor) and not inputs.is_floating_point():
            tokens = inputs
        elif isinstance(inputs, dict) and isinstance(inputs.get("input_ids"), Tensor):
            tokens = inputs["input_ids"]
    names = {id(m): n for n, m in model.named_modules()}
    res = HeadScores([], [], DETECTORS, threshold)

    def on_record(rec: AttentionRecord) -> None:
        q, k, lse = rec.q.detach(), rec.k.detach(), rec.lse.detach()
        if q.shape[2] != k.shape[2]:
            return  # cross-attention or a decode step: not a self-attention pattern over the probe
        bias_t = rec.bias.detach() if rec.bias is not None else None
        bias = [b for b in (bias_t, rec.score_mod) if b is not None] or None
        toks = tokens if tokens is not None and tokens.shape[-1] == k.shape[2] else None
        res.names.append(names.get(id(rec.module), type(rec.module).__name__))
        res.scores.append(score_heads(q, k, lse, rec.mask, bias=bias, scale=rec.scale, tokens=toks, window=window,
                                      block_q=block_q))

    with torch.no_grad(), record_attention(on_record):
        _call(model, inputs)
    if not res.scores:
        raise ValueError("model: no selfattn self-attention call ran; detect_heads needs a model built on "
                         "selfattn.nn layers (or a transformers model on the selfattn backend)")
    return res
