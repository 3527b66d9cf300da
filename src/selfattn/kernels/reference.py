"""The reference kernel: explicit math that materializes the (B, H, Nq, Nk) scores. It is the oracle every fast
kernel is tested against (in float64), and the path that returns exact attention weights.

    s = q kᵀ · scale (+ bias) → score_mod → mask → softmax (max-subtracted) → dropout → · v

Memory: B·Hq·Nq·Nk scores (several copies under autograd), so it refuses problems larger than
SELFATTN_REFERENCE_MAX_BYTES (default 4 GiB of scores) instead of swapping the machine to death.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ._common import as_4d, compute_dtype, dead_keys, dropout_keep, zero_rows

DEFAULT_MAX_BYTES = 4 << 30


def max_bytes() -> int:
    return int(os.environ.get("SELFATTN_REFERENCE_MAX_BYTES", DEFAULT_MAX_BYTES))


def score_bytes(B: int, Hq: int, Nq: int, Nk: int, dtype: torch.dtype) -> int:
    return B * Hq * Nq * Nk * torch.empty((), dtype=compute_dtype(dtype)).element_size()


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask=None, bias: Optional[Tensor] = None,
                        score_mod=None, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                        return_lse: bool = False, return_weights: bool = False):
    """q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) in q's dtype
    [, lse (B, Hq, Nq)] [, weights (B, Hq, Nq, Nk)]. Differentiable through torch autograd."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    need = score_bytes(B, Hq, Nq, Nk, q.dtype)
    if need > max_bytes():
        raise ValueError(f"kernel='reference' materializes the scores: {need / 2**30:.1f} GiB for (B, H, Nq, Nk) = "
                         f"{(B, Hq, Nq, Nk)}, above SELFATTN_REFERENCE_MAX_BYTES={max_bytes()}; use kernel='tiled'")
    cdt = compute_dtype(q.dtype)
    kf, vf = k.to(cdt), v.to(cdt)
    allowed = mask.dense(B, Hq, Nq, Nk, device=q.device) if mask is not None else None
    if allowed is not None:
        dead = dead_keys(allowed, B, Hkv, G)  # (Bm, Hkv|1, Nk)
        kf, vf = zero_rows(kf, dead), zero_rows(vf, dead)
    qf = q.to(cdt).reshape(B, Hkv, G * Nq, D)  # (B, Hkv, G·Nq, D): GQA by grouping, K/V never repeated
    s = (qf @ kf.transpose(-1, -2)).view(B, Hq, Nq, Nk) * scale  # (B, Hq, Nq, Nk)
    if bias is not None:
        s = s + as_4d(bias).to(cdt)
    if score_mod is not None:
        q_idx = torch.arange(Nq, device=q.device)[:, None]
        k_idx = torch.arange(Nk, device=q.device)[None, :]
        s = score_mod(s, q_idx, k_idx).expand(B, Hq, Nq, Nk)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if Nk == 0:  # no keys: every row is empty (amax refuses an empty dim)
        m = s.new_full((B, Hq, Nq, 1), float("-inf"))
    else:
        m = s.amax(-1, keepdim=True).detach()  # (B, Hq, Nq, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # empty rows: exp(-inf - 0) = 0, not NaN
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    w = p / torch.where(l == 0, torch.ones_like(l), l)  # empty rows: weights 0, output 0
    wd = w
    if dropout_p > 0.0:
        keep = dropout_keep(seed, dropout_p, B, Hq, Nq, Nk, torch.arange(Nq, device=q.device)[:, None],
                            torch.arange(Nk, device=q.device)[None, :], device=q.device)
        wd = w * keep.to(cdt) / (1.0 - dropout_p)
    out = (wd.reshape(B, Hkv, G * Nq, Nk) @ vf).view(B, Hq, Nq, Dv).to(q.dtype)  # (B, Hq, Nq, Dv)
    res = [out]
    if return_lse:
        res.append((m + torch.log(l)).squeeze(-1).detach())
    if return_weights:
        res.append(w.to(q.dtype))
    return res[0] if len(res) == 1 else tuple(res)
