"""Split-KV decode (flash-decoding) in Triton: a generation step, at most 16 query rows per KV head against a long
cache.

Why a kernel of its own: with G·Nq ≤ 16 rows, the forward's grid (q blocks x heads) has B·Hq programs, too few to
fill a GPU's ~132 SMs while each streams the whole cache. Here one program per (key split, batch row, KV head)
takes all R = G·Nq rows of that KV head at once -- the G query heads read each K/V block once -- over a chunk of
the cache, and writes its partial output and LSE; the chunks merge by LSE (out = Σ exp(lse_s − lse) out_s), a
pass over nsplit·R·Dv floats. The split count makes B·Hkv·nsplit ≈ 2 programs per SM.

Masks and modifiers are evaluated per row (each row carries its own query head and position), on every tile:
decode tiles are nearly all visible (a cache step), so no tile list is built; a step with dropout goes to the
forward kernel instead.

Shape legend: B, Hq, Hkv (G = Hq // Hkv), Nq new queries, Nk cached keys, R = G·Nq ≤ 16 rows (padded to RP),
S splits, BN keys per tile.
"""
import torch
import triton
import triton.language as tl

from ._jit import LN2, LOG2E, apply_mods, dot, mask_tile
from ..lowering import DECODE_MAX_ROWS
from .fwd import _strides0, common_args, pad_dim, upcast

MAX_ROWS = DECODE_MAX_ROWS
TARGET_PROGRAMS = 264  # ~2 per SM on an H100/H200 (132 SMs)


def serves(call) -> bool:
    return call.G * call.Nq <= MAX_ROWS and call.dropout_p == 0.0 and call.B * call.Nq > 0 and call.Nk > 0


@triton.jit
def _decode_kernel(Q, K, V, OP, LP, BIAS, P, I64, U8, MPI, MPF, SL, TAB,
                   sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sbb, sbh, sbn, sbk,
                   Hq, Hkv, G, Nq, Nk, D, Dv, nd, scale, S, chunk,
                   RP: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, IN_PREC: tl.constexpr,
                   UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MODS: tl.constexpr,
                   NA: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                   TT: tl.constexpr, ALL_AND: tl.constexpr,
                   M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, T5_SLOT: tl.constexpr):
    sp = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    r = tl.arange(0, RP)[:, None]  # (RP, 1) rows: r = g·Nq + i
    rowv = r < G * Nq
    i = r % Nq
    h = hk * G + r // Nq  # (RP, 1) query head of each row
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    q = tl.load(Q + b * sqb + h * sqh + i * sqn + offs_d[None, :] * sqd, mask=rowv & (offs_d[None, :] < D),
                other=0.0)  # (RP, BD)
    m_i = tl.full([RP], float("-inf"), tl.float32)
    l_i = tl.zeros([RP], tl.float32)
    acc = tl.zeros([RP, BDV], tl.float32)
    k_lo = sp * chunk
    k_hi = tl.minimum(k_lo + chunk, Nk)
    for n0 in range(k_lo, k_hi, BN):
        offs_n = n0 + tl.arange(0, BN)
        j = offs_n[None, :]
        colv = j < k_hi
        valid = rowv & colv
        k = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                    mask=colv & (offs_d[:, None] < D), other=0.0)  # (BD, BN)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < k_hi) & (offs_dv[None, :] < Dv), other=0.0)  # (BN, BDV)
        qk = dot(q, k, IN_PREC, UPCAST)
        if HAS_BIAS or HAS_MODS:
            s = qk * scale
            if HAS_BIAS:
                s += tl.load(BIAS + b * sbb + h * sbh + i * sbn + j * sbk, mask=valid, other=0.0).to(tl.float32)
            if HAS_MODS:
                s, _d, _a = apply_mods(s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid, M0, M1, M2, M3, T5_SLOT)
            s = s * LOG2E
        else:
            s = qk * (scale * LOG2E)
        allowed = mask_tile(P, I64, U8, b, h, i, j, valid, NA, K0, K1, K2, K3, TT, ALL_AND)
        s = tl.where(allowed, s, float("-inf"))
        if NA > 0:
            seen = tl.max(allowed.to(tl.int32), 0) > 0
            v = tl.where(seen[:, None], v, 0.0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IN_PREC, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    rr = tl.arange(0, RP)
    base = bhk * S + sp
    tl.store(OP + (base * RP + rr[:, None]) * BDV + offs_dv[None, :], acc / l_safe[:, None])
    tl.store(LP + base * RP + rr, tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2))


def forward(call):
    B, Hq, Hkv, G, Nq, Nk, D, Dv = call.B, call.Hq, call.Hkv, call.G, call.Nq, call.Nk, call.D, call.Dv
    dev = call.device
    R = G * Nq
    RP = 16
    BN = call.block_k or 64
    nkb = triton.cdiv(Nk, BN)
    S = max(1, min(nkb, triton.cdiv(TARGET_PROGRAMS, B * Hkv)))
    chunk = triton.cdiv(nkb, S) * BN
    S = triton.cdiv(Nk, chunk)
    ma, mo, bias, _ = common_args(call)
    q, k, v = call.q.detach(), call.k.detach(), call.v.detach()
    BDV = pad_dim(Dv)
    opart = torch.empty((B * Hkv, S, RP, BDV), dtype=torch.float32, device=dev)
    lpart = torch.empty((B * Hkv, S, RP), dtype=torch.float32, device=dev)
    bias_t = bias if bias is not None else torch.zeros(1, dtype=torch.float32, device=dev)
    sb = _strides0(bias) if bias is not None else [0, 0, 0, 0]
    _decode_kernel[(S, B * Hkv)](
        q, k, v, opart, lpart, bias_t, ma.P, ma.I64, ma.U8, mo.MPI, mo.MPF, mo.SL, mo.TAB,
        *q.stride(), *k.stride(), *v.stride(), *sb, Hq, Hkv, G, Nq, Nk, D, Dv, mo.nd, float(call.scale), S, chunk,
        RP=RP, BN=BN, BD=pad_dim(D), BDV=BDV, IN_PREC="ieee" if call.dtype == torch.float32 else "tf32",
        UPCAST=upcast(call.dtype), HAS_BIAS=bias is not None, HAS_MODS=call.score_mod is not None,
        **ma.constexprs(), **mo.constexprs(), num_warps=4, num_stages=2)
    # merge the splits by LSE: (B·Hkv, S, R) -> (B·Hkv, R)
    lp = lpart[:, :, :R]
    m = lp.amax(1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lp - m)  # (B·Hkv, S, R), 0 for empty splits
    tot = w.sum(1)  # (B·Hkv, R)
    lse = torch.where(tot == 0, torch.full_like(tot, float("-inf")), m[:, 0] + torch.log(tot))
    o = (w[..., None] * opart[:, :, :R, :Dv]).sum(1) / torch.where(tot == 0, torch.ones_like(tot), tot)[..., None]
    out = o.view(B, Hkv, G, Nq, Dv).reshape(B, Hq, Nq, Dv).to(call.dtype)  # rows r = g·Nq + i -> (h, i)
    return out, lse.view(B, Hq, Nq)
