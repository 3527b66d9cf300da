"""What a planned attention call costs, estimated from shapes alone: forward FLOPs, bytes moved through memory and
peak extra memory, for the two ways of computing it — materialized (the reference kernel: every score held) and
tiled (the online-softmax kernels -- native, tiled, triton, decode: one score tile at a time, masked-out tiles
skipped), the tiled estimate taken at the tiles of the kernel that runs (the plan's).

    pl = selfattn.plan(1, 32, 32768, 32768, 128, Hkv=8, mask=masks.causal())
    est = pl.costs(torch.bfloat16)          # {"reference": Cost(...), "native": Cost(...)}: the kernel that runs
    est[pl.kernel].flops, est[pl.kernel].bytes_moved, est[pl.kernel].peak_bytes

Arithmetic on the plan's counts: O(1) at any length (the tile counts come from the mask in closed form).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

__all__ = ["Cost", "estimate", "score_bytes"]


@dataclass(frozen=True)
class Cost:
    """One forward pass: floating-point operations, bytes read and written, peak memory beyond inputs/output."""
    flops: float
    bytes_moved: float
    peak_bytes: float


def estimate(plan, dtype: torch.dtype = torch.float32) -> Dict[str, Cost]:
    """plan: a ``selfattn.Plan`` (its shapes, tile sizes and computed-tile count) -> {"reference": materialized,
    plan.kernel: the tiled estimate at the plan's tiles} (one entry when the reference is the kernel that runs).

    Materialized: QKᵀ and PV on every entry, masked or not; the scores pass ~8 times through memory (write s,
    mask, max, exp, sum, divide, read for PV) and s, p and w are alive together. Tiled: only computed tiles; q
    and out once, K and V re-read by every q tile that visits them, a score tile stays in cache; peak is one
    score tile over all heads, the running output/max/sum of one q tile, and the LSE."""
    B, Hq, Hkv, Nq, Nk, D, Dv = plan.B, plan.Hq, plan.Hkv, plan.Nq, plan.Nk, plan.D, plan.Dv
    bq, bk = plan.block_q, plan.block_k
    es = torch.empty((), dtype=dtype).element_size()
    cs = 8 if dtype == torch.float64 else 4  # compute dtype: fp32 statistics for half types
    # score entries the tiled kernel computes: the computed tiles' area (ragged edge tiles make this an upper
    # bound by less than one tile row and column)
    nqb = -(-Nq // bq)
    tiled_scores = min(float(plan.tiles_computed) * min(bq, Nq) * min(bk, Nk), float(Nq) * Nk)
    kv_reads = min(float(plan.tiles_computed) * min(bk, Nk), float(nqb) * Nk)  # K/V rows read over all q tiles
    all_scores = float(Nq) * Nk
    io_bytes = es * B * (Hq * Nq * D + Hkv * Nk * (D + Dv) + Hq * Nq * Dv)  # read q, k, v once, write out
    reference = Cost(flops=2.0 * B * Hq * all_scores * (D + Dv),
                     bytes_moved=io_bytes + 8.0 * cs * B * Hq * all_scores,
                     peak_bytes=3.0 * cs * B * Hq * all_scores)  # autograd keeps more
    tiled = Cost(flops=2.0 * B * Hq * tiled_scores * (D + Dv),
                 bytes_moved=es * B * Hq * Nq * (D + Dv) + es * B * Hkv * kv_reads * (D + Dv),
                 peak_bytes=cs * B * Hq * (min(bq, Nq) * min(bk, Nk) + min(bq, Nq) * (Dv + 2)) + cs * B * Hq * Nq)
    if plan.kernel == "native":  # its arena holds K and V packed into fp32 tiles (kernels/native.py): ~one K, V copy
        tiled = Cost(tiled.flops, tiled.bytes_moved, tiled.peak_bytes + cs * B * Hkv * Nk * (D + Dv))
    est = {"reference": reference}
    if plan.kernel != "reference":
        est[plan.kernel] = tiled
    return est


def score_bytes(plan, dtype: torch.dtype = torch.float32) -> float:
    """Bytes of the materialized scores of all heads (what SELFATTN_REFERENCE_MAX_BYTES bounds)."""
    cs = 8 if dtype == torch.float64 else 4
    return float(cs) * plan.B * plan.Hq * plan.Nq * plan.Nk
