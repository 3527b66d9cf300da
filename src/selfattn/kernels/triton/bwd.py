"""FlashAttention-2 backward in Triton: three kernels, no atomics (every output element has one writer, so two runs
give the same bits).

1. ``_delta_kernel``: delta = rowsum(dO ∘ O) per query row, float32 (B·Hq·Nq·Dv reads).
2. ``_dkdv_kernel``: one program per (k block, batch row, KV head) keeps K and V resident and walks, for each of
   the G query heads of that KV head, the q blocks of the transposed tile list: P = exp2(s − lse) recomputed,
   dV += Pᵀ dO, dK += dSᵀ Q. GQA sums over the G heads inside the program instead of atomically.
3. ``_dq_kernel``: one program per (q block, batch row, query head) walks the forward's tile list: dQ += dS K; the
   bias gradient (dS itself, reduced inside the program over a broadcast row or column) and the T5 table gradient
   (dS summed per bucket) come from here too.

Cost: 2.5× the forward's FLOPs (2.0 for the backward matmuls + 0.5 recomputing QKᵀ in both kernels: 4 matmuls per
tile in dK/dV, 3 in dQ). Scores recompute the forward's exact ops, so P matches the forward's to the bit.

Shape legend: B, Hq, Hkv (G = Hq // Hkv), Nq, Nk, D, Dv; BM/BN tile rows/keys, BD/BDV padded head dims, NB the
T5 table's buckets padded to a power of two.
"""
import torch
import triton
import triton.language as tl

from ._jit import dot, LOG2E, apply_mods, dropout_keep, mask_tile
from ._lower import tile_lists
from .fwd import _strides0, common_args, pad_dim, upcast


def block_sizes(call):
    """(BM, BN) of the backward (both kernels walk the same tiles): the call's blocks when given."""
    if call.block_q is not None or call.block_k is not None:
        return call.block_q or 64, call.block_k or 64
    return (64, 64) if max(call.D, call.Dv) <= 128 else (32, 32)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, Hq, Nq, Dv,
                  BM: tl.constexpr, BDV: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    offs_m = qb * BM + tl.arange(0, BM)
    offs_dv = tl.arange(0, BDV)
    msk = (offs_m[:, None] < Nq) & (offs_dv[None, :] < Dv)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :] * sod, mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_dv[None, :] * sdd, mask=msk, other=0.0)
    tl.store(DELTA + bh * Nq + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < Nq)


@triton.jit
def _recompute(q, k, b, h, i, j, valid, BIAS, sbb, sbh, sbn, sbk, MPI, MPF, SL, TAB, Hq, Nq, nd, scale,
               IN_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MODS: tl.constexpr,
                M0: tl.constexpr,
               M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, T5_SLOT: tl.constexpr):
    """The forward's scores of a tile in log2 units (same ops, same bits), with the modifier chain's derivatives:
    (s2, dall, dafter); k is (BD, BN) (Kᵀ)."""
    qk = dot(q, k, IN_PREC, UPCAST)
    dall = 1.0
    da = 1.0
    if HAS_BIAS or HAS_MODS:
        s = qk * scale
        if HAS_BIAS:
            s += tl.load(BIAS + b * sbb + h * sbh + i * sbn + j * sbk, mask=valid, other=0.0).to(tl.float32)
        if HAS_MODS:
            s, dall, da = apply_mods(s, MPI, MPF, SL, TAB, h, i, j, Hq, Nq, nd, valid, M0, M1, M2, M3, T5_SLOT)
        s2 = s * LOG2E
    else:
        s2 = qk * (scale * LOG2E)
    return s2, dall, da


@triton.jit(do_not_specialize=["seed", "thresh"])
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, BIAS, QBI, QBF, QBN, P, I64, U8, MPI, MPF, SL, TAB,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
                 sbb, sbh, sbn, sbk, lsb, lsh, lsr, lcb, lch,
                 Hq, Hkv, G, Nq, Nk, D, Dv, nd, scale, seed, thresh, inv_keep, q_base, k_base,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 IN_PREC: tl.constexpr, UPCAST: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MODS: tl.constexpr,
                 DROPOUT: tl.constexpr,
                 NA: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
                 TT: tl.constexpr, ALL_AND: tl.constexpr,
                 M0: tl.constexpr, M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, T5_SLOT: tl.constexpr):
    kb = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = kb * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    j = offs_n[None, :]  # (1, BN)
    colv = j < Nk
    kT = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                 mask=colv & (offs_d[:, None] < D), other=0.0)  # (BD, BN)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < Dv), other=0.0)  # (BN, BDV)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        lrow = b * lsb + h * lsh + kb * lsr
        n = tl.load(QBN + b * lcb + h * lch + kb)
        for t in range(0, n):
            qb = tl.load(QBI + lrow + t)
            fl = tl.load(QBF + lrow + t)
            offs_m = qb * BM + tl.arange(0, BM)
            i = offs_m[:, None]
            rowv = i < Nq
            valid = rowv & colv
            q = tl.load(Q + b * sqb + h * sqh + i * sqn + offs_d[None, :] * sqd,
                        mask=rowv & (offs_d[None, :] < D), other=0.0)  # (BM, BD)
            do = tl.load(DO + b * sdb + h * sdh + i * sdn + offs_dv[None, :] * sdd,
                         mask=rowv & (offs_dv[None, :] < Dv), other=0.0)  # (BM, BDV)
            lse = tl.load(LSE + (b * Hq + h) * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E  # empty rows: P = 0
            delta = tl.load(DELTA + (b * Hq + h) * Nq + offs_m, mask=offs_m < Nq, other=0.0)
            s2, dall, _da = _recompute(q, kT, b, h, i, j, valid, BIAS, sbb, sbh, sbn, sbk, MPI, MPF, SL, TAB, Hq,
                                       Nq, nd, scale, IN_PREC, UPCAST, HAS_BIAS, HAS_MODS, M0, M1, M2, M3,
                                       T5_SLOT)
            vv = v
            if fl == 0:
                allowed = mask_tile(P, I64, U8, b, h, i, j, valid, NA, K0, K1, K2, K3, TT, ALL_AND)
                s2 = tl.where(allowed, s2, float("-inf"))
                seen = tl.max(allowed.to(tl.int32), 0) > 0
                vv = tl.where(seen[:, None], v, 0.0)  # a masked key's NaN value never reaches dP
            p = tl.math.exp2(s2 - lse2[:, None])  # (BM, BN)
            dp = dot(do, tl.trans(vv), IN_PREC, UPCAST)  # (BM, BN)
            if DROPOUT:
                keep = dropout_keep(seed, thresh, b, h, i + q_base, j + k_base)
                pd = tl.where(keep, p * inv_keep, 0.0)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            else:
                pd = p
            dv += dot(tl.trans(pd.to(do.dtype)), do, IN_PREC, UPCAST)
            ds = p * (dp - delta[:, None]) * dall
            dk += dot(tl.trans(ds.to(q.dtype)), q, IN_PREC, UPCAST)
    dk = dk * scale
    tl.store(DK + bhk * Nk * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Nk) & (offs_d[None, :] < D))
    tl.store(DV + bhk * Nk * Dv + offs_n[:, None] * Dv + offs_dv[None, :], dv.to(DV.dtype.element_ty),
             mask=(offs_n[:, None] < Nk) & (offs_dv[None, :] < Dv))


@triton.jit(do_not_specialize=["seed", "thresh"])
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DB, DT, BKT, BIAS, KVI, KVF, KVN, P, I64, U8, MPI, MPF, SL, TAB,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
               sbb, sbh, sbn, sbk, lsb, lsh, lsr, lcb, lch, db_r, db_c,
               Hq, G, Nq, Nk, D, Dv, nd, nqb, scale, seed, thresh, inv_keep, q_base, k_base,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                IN_PREC: tl.constexpr, UPCAST: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MODS: tl.constexpr, DROPOUT: tl.constexpr, DB_MODE: tl.constexpr,
               NB: tl.constexpr,
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
    i = offs_m[:, None]
    rowv = i < Nq
    q = tl.load(Q + b * sqb + h * sqh + i * sqn + offs_d[None, :] * sqd, mask=rowv & (offs_d[None, :] < D),
                other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + i * sdn + offs_dv[None, :] * sdd, mask=rowv & (offs_dv[None, :] < Dv),
                 other=0.0)
    lse = tl.load(LSE + bh * Nq + offs_m, mask=offs_m < Nq, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    db_row = tl.zeros([BM], tl.float32)
    offs_nb = tl.arange(0, NB)
    dt = tl.zeros([NB], tl.float32)
    lrow = b * lsb + h * lsh + qb * lsr
    n = tl.load(KVN + b * lcb + h * lch + qb)
    for t in range(0, n):
        kb = tl.load(KVI + lrow + t)
        fl = tl.load(KVF + lrow + t)
        offs_n = kb * BN + tl.arange(0, BN)
        j = offs_n[None, :]
        colv = j < Nk
        valid = rowv & colv
        kT = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=colv & (offs_d[:, None] < D), other=0.0)  # (BD, BN)
        vT = tl.load(V + b * svb + hk * svh + offs_n[None, :] * svn + offs_dv[:, None] * svd,
                     mask=colv & (offs_dv[:, None] < Dv), other=0.0)  # (BDV, BN)
        s2, dall, da = _recompute(q, kT, b, h, i, j, valid, BIAS, sbb, sbh, sbn, sbk, MPI, MPF, SL, TAB, Hq, Nq,
                                  nd, scale, IN_PREC, UPCAST, HAS_BIAS, HAS_MODS, M0, M1, M2, M3,
                                  T5_SLOT)
        if fl == 0:
            allowed = mask_tile(P, I64, U8, b, h, i, j, valid, NA, K0, K1, K2, K3, TT, ALL_AND)
            s2 = tl.where(allowed, s2, float("-inf"))
            seen = tl.max(allowed.to(tl.int32), 0) > 0
            kT = tl.where(seen[None, :], kT, 0.0)  # masked keys' NaN never reaches dQ
            vT = tl.where(seen[None, :], vT, 0.0)
        p = tl.math.exp2(s2 - lse2[:, None])
        dp = dot(do, vT, IN_PREC, UPCAST)
        if DROPOUT:
            keep = dropout_keep(seed, thresh, b, h, i + q_base, j + k_base)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        ds = p * (dp - delta[:, None])  # dL / d(modified score)
        if T5_SLOT >= 0:
            # the table's gradient: dS through the ops after the T5 op, summed per bucket (NB passes over the
            # tile: paid only when the table requires grad)
            gt = ds * da
            bkt = tl.load(BKT + (j - i + Nq - 1), mask=valid, other=-1)
            for nb in tl.static_range(NB):
                dt += tl.where(offs_nb == nb, tl.sum(tl.sum(tl.where(bkt == nb, gt, 0.0), 1), 0), 0.0)
        ds = ds * dall  # dL / d(scale·qk + bias)
        if DB_MODE == 1:
            tl.store(DB + bh * db_r * db_c + i * db_c + j, ds, mask=valid)
        elif DB_MODE == 2:
            db_row += tl.sum(ds, 1)
        elif DB_MODE == 3:
            tl.store(DB + bh * db_r * db_c + qb * db_c + offs_n, tl.sum(ds, 0), mask=offs_n < Nk)
        elif DB_MODE == 4:
            db_row += tl.sum(ds, 1)
        dq += dot(ds.to(kT.dtype), tl.trans(kT), IN_PREC, UPCAST)
    dq = dq * scale
    tl.store(DQ + bh * Nq * D + i * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=rowv & (offs_d[None, :] < D))
    if DB_MODE == 2:
        tl.store(DB + bh * db_r + offs_m, db_row, mask=offs_m < Nq)
    if DB_MODE == 4:
        tl.store(DB + bh * db_r + qb, tl.sum(db_row, 0))
    if T5_SLOT >= 0:
        tl.store(DT + (bh * nqb + qb) * NB + offs_nb, dt)


def backward(call, grad_out, out, lse, needs):
    nq, nk, nv, nb, npar = needs
    B, Hq, Hkv, Nq, Nk, D, Dv = call.B, call.Hq, call.Hkv, call.Nq, call.Nk, call.D, call.Dv
    dev, dt_ = call.device, call.dtype
    q, k, v = call.q.detach(), call.k.detach(), call.v.detach()
    params = call.mod_params
    ma, mo, bias, (seed, thresh, inv_keep) = common_args(call)
    want_dq = nq or (nb and bias is not None) or (npar and mo.t5_slot >= 0)
    dq = torch.zeros((B, Hq, Nq, D), dtype=dt_, device=dev)
    dk = torch.zeros((B, Hkv, Nk, D), dtype=dt_, device=dev)
    dv = torch.zeros((B, Hkv, Nk, Dv), dtype=dt_, device=dev)
    dbias = None
    if nb and bias is not None:
        dbias = torch.zeros(bias.shape, dtype=call.bias.dtype, device=dev)
    dparams = [torch.zeros_like(t) if npar else None for t in params]
    if B * Hq * Nq == 0 or Nk == 0:
        return (dq if nq else None, dk if nk else None, dv if nv else None, dbias, tuple(dparams))
    BM, BN = block_sizes(call)
    nqb = triton.cdiv(Nq, BM)
    do = grad_out.detach().to(dt_)
    out = out.detach()
    lse = lse.detach().to(torch.float32).contiguous()
    delta = torch.empty((B, Hq, Nq), dtype=torch.float32, device=dev)
    BDV = pad_dim(Dv)
    _delta_kernel[(nqb, B * Hq)](out, do, delta, *out.stride(), *do.stride(), Hq, Nq, Dv, BM=BM, BDV=BDV)
    bias_t = bias if bias is not None else torch.zeros(1, dtype=torch.float32, device=dev)
    sb = _strides0(bias) if bias is not None else [0, 0, 0, 0]
    common = dict(BM=BM, BN=BN, BD=pad_dim(D), BDV=BDV, IN_PREC="ieee" if dt_ == torch.float32 else "tf32",
                  UPCAST=upcast(dt_),
                  HAS_BIAS=bias is not None, HAS_MODS=call.score_mod is not None, DROPOUT=call.dropout_p > 0.0,
                  **ma.constexprs(), **mo.constexprs(), num_warps=4, num_stages=1)
    if nk or nv:
        tt = tile_lists(call, BM, BN, transpose=True)
        _dkdv_kernel[(triton.cdiv(Nk, BN), B * Hkv)](
            q, k, v, do, lse, delta, dk, dv, bias_t, tt.idx, tt.full, tt.cnt, ma.P, ma.I64, ma.U8,
            mo.MPI, mo.MPF, mo.SL, mo.TAB, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *sb,
            tt.sb, tt.sh, tt.sr, tt.cb, tt.ch, Hq, Hkv, call.G, Nq, Nk, D, Dv, mo.nd, float(call.scale), seed,
            thresh, inv_keep, call.q_base, call.k_offset, **common)
    if want_dq:
        tq = tile_lists(call, BM, BN)
        db_mode, db_buf, db_r, db_c = 0, torch.zeros(1, dtype=torch.float32, device=dev), 1, 1
        if dbias is not None:
            rows, cols = bias.shape[2] != 1, bias.shape[3] != 1
            db_mode = {(True, True): 1, (True, False): 2, (False, True): 3, (False, False): 4}[(rows, cols)]
            db_r, db_c = (Nq if rows else nqb), (Nk if cols else 1)
            db_buf = torch.zeros((B, Hq, db_r, db_c), dtype=torch.float32, device=dev)
        t5 = mo.t5_slot >= 0 and npar
        dt_buf = torch.zeros((B, Hq, nqb, mo.NB) if t5 else (1,), dtype=torch.float32, device=dev)
        cx = dict(common)
        if not t5:
            cx["T5_SLOT"] = -1
        _dq_kernel[(nqb, B * Hq)](
            q, k, v, do, lse, delta, dq, db_buf, dt_buf, mo.BKT, bias_t, tq.idx, tq.full, tq.cnt, ma.P, ma.I64,
            ma.U8, mo.MPI, mo.MPF, mo.SL, mo.TAB, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *sb,
            tq.sb, tq.sh, tq.sr, tq.cb, tq.ch, db_r, db_c, Hq, call.G, Nq, Nk, D, Dv, mo.nd, nqb,
            float(call.scale), seed, thresh, inv_keep, call.q_base, call.k_offset, DB_MODE=db_mode,
            NB=mo.NB if t5 else 1, **cx)
        if dbias is not None:
            g = db_buf
            if bias.shape[0] == 1:
                g = g.sum(0, keepdim=True)
            if bias.shape[1] == 1:
                g = g.sum(1, keepdim=True)
            if bias.shape[2] == 1:
                g = g.sum(2, keepdim=True)
            dbias = g.reshape(bias.shape).to(call.bias.dtype)
        if t5:
            gt = dt_buf.sum((0, 2))[:, :mo.n_buckets].t()  # (num_buckets, Hq)
            for n, t in enumerate(params):
                if t is mo.t5_op.table:
                    dparams[n] = (dparams[n].float() + gt.to(dparams[n].device)).to(t.dtype)
    return (dq if nq else None, dk if nk else None, dv if nv else None, dbias, tuple(dparams))
