"""Pieces every kernel shares, so that the reference and the tiled kernels compute the same function.

Shape legend: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv queries per KV head), Nq queries,
Nk keys, D head dim, Dv value head dim, Tq/Tk tile sizes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .lowering import HASH_B, HASH_H, HASH_K, M32 as _M32, dropout_threshold


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types accumulate in float32; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mix32(x: Tensor) -> Tensor:
    # "lowbias32" integer hash on values in [0, 2**32) held in int64: products wrap in two's complement and the
    # mask keeps the low 32 bits, which is exactly 32-bit unsigned arithmetic.
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_keep(seed: int, p: float, b_idx: Tensor, h_idx: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Counter-based dropout pattern: keep[b, h, i, j] depends only on (seed, b, h, qp, kp) -- the batch row, the
    query head and the global query/key positions -- not on tiling, lengths or offsets, so every kernel (forward
    and backward), a slice of a longer call and a ring step regenerate the same bits. In uint32 arithmetic:

        hb = mix32(seed + b·0x9E3779B1 + h·0x85EBCA77);  hr = mix32(hb ^ qp);  hk = mix32((hr ^ kp) + 0x9E3779B9)
        keep = hk >= round(p · 2^32)

    b_idx (Bi,), h_idx (Hi,) int64; q_pos (Tq, 1), k_pos (1, Tk) int64 -> (Bi, Hi, Tq, Tk) bool.
    Cost: ~10 int64 ops per score element -- paid only when dropout_p > 0."""
    dev = q_pos.device
    b = b_idx.to(device=dev, dtype=torch.int64)[:, None, None, None]
    h = h_idx.to(device=dev, dtype=torch.int64)[None, :, None, None]
    hb = _mix32((seed + b * HASH_B + h * HASH_H) & _M32)  # (Bi, Hi, 1, 1)
    hr = _mix32(hb ^ (q_pos.to(torch.int64) & _M32))  # (Bi, Hi, Tq, 1)
    hk = _mix32(((hr ^ (k_pos.to(torch.int64) & _M32)) + HASH_K) & _M32)  # (Bi, Hi, Tq, Tk)
    return hk >= dropout_threshold(p)


def as_4d(t: Tensor) -> Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def bias_tile(bias4: Tensor, qs: int, qe: int, ks: int, ke: int) -> Tensor:
    """Slice of a broadcastable (Bb, Hb, Nq|1, Nk|1) bias for a tile: (Bb, Hb, Tq|1, Tk|1), a view."""
    rows = slice(qs, qe) if bias4.shape[2] != 1 else slice(None)
    cols = slice(ks, ke) if bias4.shape[3] != 1 else slice(None)
    return bias4[:, :, rows, cols]


def dead_keys(allowed: Tensor, B: int, Hkv: int, G: int) -> Optional[Tensor]:
    """Keys that no query of a tile may see, per (batch, KV head): (Bm, Hkv|1, Tk) bool. Their K and V rows are
    zeroed before the matmuls so that NaN/Inf stored in masked-out keys never reaches the output or gradients
    (0 · NaN is NaN inside a matmul)."""
    a = as_4d(allowed)  # (Bm, Hm, Tq, Tk)
    seen = a.any(2)  # (Bm, Hm, Tk)
    if seen.shape[1] != 1:
        seen = seen.view(seen.shape[0], Hkv, G, seen.shape[-1]).any(2)
    return ~seen


def zero_rows(x: Tensor, dead: Tensor) -> Tensor:
    """x: (B, Hkv, Tk, D); dead: (Bm, Hkv|1, Tk) -> x with dead rows set to 0 (new tensor)."""
    return torch.where(dead[..., None], torch.zeros((), dtype=x.dtype, device=x.device), x)


def safe_pv(p: Tensor, v: Tensor) -> Tensor:
    """p @ v (batched: (..., R, Tk) @ (..., Tk, Dv)) where a zero weight never multiplies a NaN/inf value: keys
    whose value rows are not finite are zeroed for the matmul and their terms added only where p > 0. A masked
    entry thus contributes exactly nothing, as the math says, while a row that does see such a value gets it.
    Cost: one isfinite pass over v, plus R·nb·Dv for the nb bad keys."""
    bad = (~torch.isfinite(v)).any(-1)  # (..., Tk)
    while bad.dim() > 1:
        bad = bad.any(0)
    if not bool(bad.any()):
        return p @ v
    idx = bad.nonzero()[:, 0]
    out = p @ v.index_fill(-2, idx, 0.0)
    pb = p.index_select(-1, idx)[..., None]  # (..., R, nb, 1)
    vb = v.index_select(-2, idx).unsqueeze(-3)  # (..., 1, nb, Dv)
    return out + torch.where(pb > 0, pb * vb, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-2)
