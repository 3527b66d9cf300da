"""Per-row and per-head attention statistics, streamed over tiles: every row, any length, no N×N memory.

For every query row of every head, from w_ij = exp(s_ij − lse_i) recomputed one (B, Hq, Tq, Tk) tile at a time:

* entropy      −Σ_j w_ij log w_ij (nats; log w = s − lse exactly, so no log of tiny numbers). 0 = one key.
* distance     Σ_j w_ij |pos(i) − j|, the mean attention distance in tokens. Query i sits at key position
               i + Nk − Nq (bottom-right, as causal masks and KV caches align; plain i when Nq == Nk).
* top-k        the k largest weights and their key indices (a running top-k merged tile by tile).
* special      Σ_j∈special w_ij, the weight on special tokens ([CLS], [SEP], BOS...) whose key positions are given.

Memory: one tile plus O(B·Hq·Nq·k) results. Time: one recomputation of the scores (the forward's QKᵀ) plus
~10 elementwise passes over each tile.

Shape legend: B batch, Hq query heads, Hkv key/value heads, Nq queries, Nk keys, D head dim, Tq/Tk tile sizes,
k top-k width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .. import masks
from ..kernels.common import compute_dtype
from .weights import ScoreTiles

__all__ = ["HeadStats", "head_stats", "special_mask"]

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


@dataclass
class HeadStats:
    """Statistics of one attention call. Per row: (B, Hq, Nq[, k]); per head: (Hq,), averaged over the rows
    that have at least one allowed key, over all batch rows (``valid`` marks them)."""
    entropy: Tensor  # (B, Hq, Nq) nats
    distance: Tensor  # (B, Hq, Nq) tokens
    special: Tensor  # (B, Hq, Nq) weight on special tokens, in [0, 1]
    top_weight: Tensor  # (B, Hq, Nq, k) largest weights, descending
    top_index: Tensor  # (B, Hq, Nq, k) their key positions (int64); −1 pads rows that see fewer than k keys
    valid: Tensor  # (B, Hq, Nq) bool: row has an allowed key (lse finite)

    def _mean(self, t: Tensor) -> Tensor:
        n = self.valid.sum((0, 2)).clamp(min=1)
        return torch.where(self.valid, t, torch.zeros_like(t)).sum((0, 2)) / n  # (Hq,)

    @property
    def head_entropy(self) -> Tensor:
        """(Hq,) mean entropy per head: low = focused."""
        return self._mean(self.entropy)

    @property
    def head_distance(self) -> Tensor:
        """(Hq,) mean attention distance per head, in tokens."""
        return self._mean(self.distance)

    @property
    def head_special(self) -> Tensor:
        """(Hq,) mean weight on special tokens per head."""
        return self._mean(self.special)

    @property
    def head_max_weight(self) -> Tensor:
        """(Hq,) mean over rows of the row's largest weight: high = strong single links."""
        return self._mean(self.top_weight[..., 0])

    def table(self) -> list:
        """One dict per head: the per-head aggregates as plain floats (for printing, HTML, JSON)."""
        cols = {"entropy": self.head_entropy, "distance": self.head_distance, "max_weight": self.head_max_weight,
                "special": self.head_special}
        return [{"head": h, **{name: float(c[h]) for name, c in cols.items()}} for h in range(self.entropy.shape[1])]


def special_mask(special, B: int, Nk: int, device=None) -> Optional[Tensor]:
    """special: None, a sequence of key positions, or a bool tensor (Nk,) or (B, Nk) -> (Bs, Nk) bool or None."""
    if special is None:
        return None
    if isinstance(special, Tensor):
        if special.dtype != torch.bool or special.dim() not in (1, 2) or special.shape[-1] != Nk \
                or (special.dim() == 2 and special.shape[0] not in (1, B)):
            raise ValueError(f"special: expected a bool tensor of shape (Nk,) or (B, Nk) = ({B}, {Nk}), got "
                             f"shape {tuple(special.shape)}, dtype {special.dtype}")
        return (special if special.dim() == 2 else special[None]).to(device)
    try:
        pos = [int(p) for p in special]
    except (TypeError, ValueError):
        raise TypeError(f"special: expected key positions (ints) or a bool tensor, got {special!r}") from None
    if any(p < 0 or p >= Nk for p in pos):
        raise ValueError(f"special: positions must lie in [0, {Nk}), got {pos}")
    m = torch.zeros(1, Nk, dtype=torch.bool, device=device)
    m[0, pos] = True
    return m


def head_stats(q: Tensor, k: Tensor, lse: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
               special=None, topk: int = 5, block_q: int = DEFAULT_BLOCK_Q,
               block_k: int = DEFAULT_BLOCK_K) -> HeadStats:
    """Streaming statistics of every row of every head (see the module docstring).

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), lse: (B, Hq, Nq) from ``attention(..., return_lse=True)`` with the same
    mask, bias and scale. special: key positions (or a bool (Nk,) / (B, Nk) tensor) of special tokens.
    """
    for name, val in (("topk", topk), ("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    kk = min(topk, Nk)
    spec = special_mask(special, B, Nk, q.device)
    cdt = compute_dtype(q.dtype)
    dev = q.device
    ent = torch.zeros(B, Hq, Nq, dtype=cdt, device=dev)
    dist = torch.zeros(B, Hq, Nq, dtype=cdt, device=dev)
    spw = torch.zeros(B, Hq, Nq, dtype=cdt, device=dev)
    top_w = torch.zeros(B, Hq, Nq, kk, dtype=cdt, device=dev)
    top_i = torch.zeros(B, Hq, Nq, kk, dtype=torch.int64, device=dev)
    offset = Nk - Nq  # query i sits at key position i + offset
    kinds = None
    if mask is not None:  # tile classes: EMPTY tiles add nothing to any statistic and are skipped, FULL ones unmasked
        mobj = masks.from_tensor(mask) if isinstance(mask, Tensor) else mask
        kinds = masks.summarize_classes(mobj.block_classes(B, Hq, Nq, Nk, block_q, block_k, q.device)).tolist()
    for qb, qs in enumerate(range(0, Nq, block_q)):
        qe = min(Nq, qs + block_q)
        st = ScoreTiles(q, k, mask, bias, scale, None, slice(qs, qe))
        l = st.lse_sel(lse)  # (B, Hq, Tq, 1), +inf on empty rows
        e_acc = torch.zeros(B, Hq, qe - qs, dtype=cdt, device=dev)
        d_acc = torch.zeros_like(e_acc)
        s_acc = torch.zeros_like(e_acc)
        tw = torch.zeros((B, Hq, qe - qs, 0), dtype=cdt, device=dev)  # top-k so far, empty before the 1st tile
        ti = torch.zeros((B, Hq, qe - qs, 0), dtype=torch.int64, device=dev)
        qpos = torch.arange(qs, qe, dtype=cdt, device=dev)[:, None] + offset  # (Tq, 1)
        for kb, ks in enumerate(range(0, Nk, block_k)):
            ke = min(Nk, ks + block_k)
            kind = masks.FULL if kinds is None else kinds[qb][kb]
            if kind == masks.EMPTY:
                continue
            logw = st.tile(ks, ke, kind != masks.FULL) - l  # (B, Hq, Tq, Tk): log w, −inf where masked/empty row
            w = torch.exp(logw)
            # −Σ w log w: where w == 0, log w may be −inf and 0·(−inf) is NaN, so those terms are dropped
            e_acc -= torch.where(w > 0, w * logw, torch.zeros((), dtype=cdt)).sum(-1)
            kpos = torch.arange(ks, ke, dtype=cdt, device=dev)[None, :]  # (1, Tk)
            d_acc += (w * (qpos - kpos).abs()).sum(-1)
            if spec is not None:
                s_acc += (w * spec[:, None, None, ks:ke].to(cdt)).sum(-1)
            # running top-k: merge this tile's best with the best so far, (B, Hq, Tq, ≤ 2k)
            tkw, tki = torch.topk(w, min(kk, ke - ks), dim=-1)
            tw, idx = torch.topk(torch.cat([tw, tkw], -1), min(kk, tw.shape[-1] + tkw.shape[-1]), dim=-1)
            ti = torch.gather(torch.cat([ti, tki + ks], -1), -1, idx)
        if tw.shape[-1] < kk:  # the visited tiles held fewer than k keys: pad with weight 0 at index −1
            pad = kk - tw.shape[-1]
            tw = torch.cat([tw, tw.new_zeros(*tw.shape[:-1], pad)], -1)
            ti = torch.cat([ti, ti.new_full((*ti.shape[:-1], pad), -1)], -1)
        ent[:, :, qs:qe], dist[:, :, qs:qe], spw[:, :, qs:qe] = e_acc, d_acc, s_acc
        top_w[:, :, qs:qe], top_i[:, :, qs:qe] = tw, ti
    valid = torch.isfinite(lse)
    return HeadStats(ent, dist, spw, top_w, top_i, valid)
