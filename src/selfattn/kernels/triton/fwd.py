"""FlashAttention-2 forward in Triton (the fused-attention tutorial's loop, on selfattn's call contract).

Loop order: one program per (q block, batch row, query head); the q block (BM x D) stays in registers, K/V blocks
(BN x D) stream through in the order of the tile list, which holds only the non-empty k blocks of this q block;
FULL tiles skip the mask. Online softmax in float32 and log2 units (exp2: one multiply folded into the scale),
the LSE written in natural log. Reads Q once, K and V once per (q block, query head) -- from L2 for the G heads of
one KV head (GQA without copying K/V) --, writes O and LSE: 4·Nq·Nk·D FLOPs per head, no Nq·Nk memory.

Tiles: BM x BN = 128 x 64 for D <= 64, 64 x 64 up to D = 128, 64 x 32 beyond (registers: the q tile and the
BM x Dv accumulator); D and Dv are padded to powers of two with masked loads. fp32 inputs use IEEE fp32 dot
products (TF32 off: exact to fp32 roundoff); fp16/bf16 feed the tensor cores, accumulating in fp32.

Shape legend: B, Hq, Hkv (G = Hq // Hkv), Nq, Nk, D, Dv; BM/BN tile rows/keys, BD/BDV padded head dims.
"""
import os

import torch
import triton
import triton.language as tl

from ._jit import dot, LOG2E, LN2, apply_mods, dropout_keep, mask_tile
from ..lowering import strides0
from ._lower import MaskArgs, ModArgs, dropout_args, tile_lists


def block_sizes(call):
    """(BM, BN) of the forward: the call's block_q/block_k when given (powers of two >= 16), else by head dim."""
    if call.block_q is not None or call.block_k is not None:
        return call.block_q or 64, call.block_k or 64
    D = max(call.D, call.Dv)
    if D <= 64:
        return 128, 64
    if D <= 128:
        return 64, 64
    return 64, 32


def upcast(dtype) -> bool:
    """Widen bf16 dot operands to fp32 under the interpreter (its bf16 tl.dot is wrong in triton 3.9.0)."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def pad_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _score_tile(q, k, b, h, i, j, valid, BIAS, sbb, sbh, sbn, sbk, MPI, MPF, SL, TAB, Hq, Nq, nd, scale,
                IN_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MODS: tl.constexpr,
                M0: tl.constexpr,
                M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, T5_SLOT: tl.constexpr):
    """Scores of a tile in log2 units, (BM, BN) float32, with bias and modifiers applied (not yet masked)."""
    qk = dot(q, k, IN_PREC, UPCAST)
    if HAS_BIAS or HAS_MODS:
        s = qk * scale
        if HAS_BIAS:
            s += tl.load(BIAS + b * sbb + h * sbh + i * sbn + j * sbk, mask=valid, other=0.0).to(tl.float32)
        if HAS_MODS:
            s, _d, _a = apply_mods(s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid, M0, M1, M2, M3, T5_SLOT)
        s = s * LOG2E
    else:
        s = qk * (scale * LOG2E)  # one multiply: the scale folded into log2 units
    return s


@triton.jit(do_not_specialize=["seed", "thresh"])
def _fwd_kernel(Q, K, V, O, LSE, BIAS, KVI, KVF, KVN, P, I64, U8, MPI, MPF, SL, TAB,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                sbb, sbh, sbn, sbk, lsb, lsh, lsr, lcb, lch,
                Hq, G, Nq, Nk, D, Dv, nd, scale, seed, thresh, inv_keep, q_base, k_base,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                IN_PREC: tl.constexpr, UPCAST: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_MODS: tl.constexpr, DROPOUT: tl.constexpr,
                NA: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                TT: tl.constexpr, ALL_AND: tl.constexpr,
                M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, T5_SLOT: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = qb * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    i = offs_m[:, None]  # (BM, 1)
    rowv = i < Nq
    q = tl.load(Q + b * sqb + h * sqh + i * sqn + offs_d[None, :] * sqd, mask=rowv & (offs_d[None, :] < D),
                other=0.0)  # (BM, BD)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    lrow = b * lsb + h * lsh + qb * lsr
    n = tl.load(KVN + b * lcb + h * lch + qb)
    Kb = K + b * skb + hk * skh
    Vb = V + b * svb + hk * svh
    for t in range(0, n):
        kb = tl.load(KVI + lrow + t)
        fl = tl.load(KVF + lrow + t)
        offs_n = kb * BN + tl.arange(0, BN)
        j = offs_n[None, :]  # (1, BN)
        colv = j < Nk
        valid = rowv & colv
        k = tl.load(Kb + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=colv & (offs_d[:, None] < D),
                    other=0.0)  # (BD, BN): K^T
        v = tl.load(Vb + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                    mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < Dv), other=0.0)  # (BN, BDV)
        s = _score_tile(q, k, b, h, i, j, valid, BIAS, sbb, sbh, sbn, sbk, MPI, MPF, SL, TAB, Hq, Nq, nd, scale,
                        IN_PREC, UPCAST, HAS_BIAS, HAS_MODS, M0, M1, M2, M3, T5_SLOT)
        if fl == 0:
            allowed = mask_tile(P, I64, U8, b, h, i, j, valid, NA, K0, K1, K2, K3, TT, ALL_AND)
            s = tl.where(allowed, s, float("-inf"))
            # a key no row of the tile may see contributes nothing, even if its value row holds NaN/inf
            seen = tl.max(allowed.to(tl.int32), 0) > 0  # (BN,)
            v = tl.where(seen[:, None], v, 0.0)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty so far: exp2(-inf - 0) = 0, not NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = dropout_keep(seed, thresh, b, h, i + q_base, j + k_base)
            p = tl.where(keep, p, 0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IN_PREC, UPCAST)
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (inv_keep / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(O + b * sob + h * soh + i * son + offs_dv[None, :] * sod, out.to(O.dtype.element_ty),
             mask=rowv & (offs_dv[None, :] < Dv))
    tl.store(LSE + bh * Nq + offs_m, lse, mask=offs_m < Nq)


def _strides0(t):
    return list(strides0(t))


def common_args(call):
    """Lowered mask, modifiers, bias and dropout of a call (memoized on it: the backward reuses them)."""
    key = ("triton_common",)
    if key not in call._memo:
        from ..common import as_4d
        bias = None
        if call.bias is not None:
            bias = as_4d(call.bias).detach()
        call._memo[key] = (MaskArgs(call), ModArgs(call), bias, dropout_args(call))
    return call._memo[key]


def forward(call):
    """out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 natural log."""
    B, Hq, Nq, Nk, D, Dv = call.B, call.Hq, call.Nq, call.Nk, call.D, call.Dv
    dev = call.device
    out = torch.zeros((B, Hq, Nq, Dv), dtype=call.dtype, device=dev)
    lse = torch.full((B, Hq, Nq), float("-inf"), dtype=torch.float32, device=dev)
    if B * Hq * Nq == 0 or Nk == 0:
        return out, lse
    BM, BN = block_sizes(call)
    ma, mo, bias, (seed, thresh, inv_keep) = common_args(call)
    tl_ = tile_lists(call, BM, BN)
    q, k, v = call.q.detach(), call.k.detach(), call.v.detach()
    bias_t = bias if bias is not None else torch.zeros(1, dtype=torch.float32, device=dev)
    sb = _strides0(bias) if bias is not None else [0, 0, 0, 0]
    grid = (triton.cdiv(Nq, BM), B * Hq)
    _fwd_kernel[grid](
        q, k, v, out, lse, bias_t, tl_.idx, tl_.full, tl_.cnt, ma.P, ma.I64, ma.U8, mo.MPI, mo.MPF, mo.SL, mo.TAB,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sb, tl_.sb, tl_.sh, tl_.sr, tl_.cb, tl_.ch,
        Hq, call.G, Nq, Nk, D, Dv, mo.nd, float(call.scale), seed, thresh, inv_keep, call.q_base, call.k_offset,
        BM=BM, BN=BN, BD=pad_dim(D), BDV=pad_dim(Dv), IN_PREC="ieee" if call.dtype == torch.float32 else "tf32",
        UPCAST=upcast(call.dtype),
        HAS_BIAS=bias is not None, HAS_MODS=call.score_mod is not None, DROPOUT=call.dropout_p > 0.0,
        **ma.constexprs(), **mo.constexprs(), num_warps=8 if BM >= 128 else 4, num_stages=2)
    return out, lse
