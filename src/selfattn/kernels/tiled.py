"""The tiled kernel: FlashAttention's blocked online softmax, forward and backward, on torch ops.

Never holds more than one (G·Tq, Tk) tile of scores per worker thread. Tiles the mask classifies EMPTY are never
computed; FULL tiles skip the mask; PARTIAL tiles evaluate ``mask_mod`` on the tile's indices. Consecutive FULL
tiles are merged (forward: along keys up to ``SEGMENT_K``; backward: along queries up to ``SEGMENT_Q``): fewer,
larger torch calls. The backward saves only q, k, v, out and lse (plus the dropout seed) and recomputes every
tile's scores.

Shape legend: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, Nq/Nk sequence lengths, D/Dv head dims,
Tq/Tk tile sizes, BH = B·Hkv, J = KV heads in one work item (1, or BH when a score modifier needs all heads),
R = G·Tq rows of one tile. GQA without copying K/V: the G query heads that share a KV head are stacked along the
row axis of one tile, (J, G·Tq, D) @ (J, D, Tk).

Where the time goes (2-core x86, fp32, D=64, one 256x512 tile, one thread): the two matmuls ~430 us (~78 GFLOP/s),
exp2 ~75 us, a row sum ~15 us, Python ~30 us. So the kernel
  * works in log2 units: q is multiplied by scale·log2(e) once and the softmax uses exp2, ~2x cheaper than exp
    here (natural-log lse is restored at the end: lse = lse2 · ln 2);
  * folds the max subtraction into the first matmul (addmm with a broadcast row shift costs the same as mm);
  * skips the running max where it can: without bias or score modifier, every row of a q block uses one fixed
    shift c_i, the exact max of its first FULL segment, accepted only if no score of the row can exceed it by
    more than 2^_HEADROOM: scores are bounded by |q_i|·max_j|k_j| (Cauchy-Schwarz). Then there is no rescaling,
    no per-tile max and no running-max bookkeeping. If the bound is too loose for some row (or anything is
    non-finite), the q block is recomputed with the classic online softmax: exact either way (in random data the
    gap bound - max is ~10 in log2 units);
  * computes a PARTIAL tile only for its rows that may see a key, and masks it by adding a cached 0/-inf tile;
  * runs work items in parallel Python threads (kernels/_pool.py), each with one intra-op thread (torch releases
    the GIL inside ops): on a 2-core machine shared with other processes, one barrier-free stream per core beats two-thread
    ops that wait for each other at every call. Items: (KV head, q block) forward, (KV head, key range)
    backward; every item is computed the same way on any thread, so results are bit-identical run to run.

Cost per visited tile (forward): 2 matmuls of 2·G·Tq·Tk·D flops; exp2 once over the tile, one row sum.
Backward: 5 matmuls (recompute S, dP, dV, dQ, dK) = 2.5x the forward flops; exp2, a subtraction and a multiply
over the tile. fp32 at large scores (some |lse| >= 11): one more matmul and exp2 per tile, a stats pass that
renormalizes P over the backward's own scores (see _RENORM_FROM).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..masks import EMPTY, FULL, PARTIAL
from .common import as_4d, bias_tile, compute_dtype, dropout_keep, safe_pv, zero_rows
from ._pool import Workspace, run

# Chosen by benchmarks/bench_core.py on a 2-core x86 CPU (see benchmarks/NOTES.md): a 256x512 fp32 tile is
# 512 KiB, which with its K/V slices stays inside the 1 MiB per-core L2.
BLOCK_Q = 512
BLOCK_K = 256
SEGMENT_K = 512  # forward: consecutive tiles of one kind are merged up to this many keys
SEGMENT_Q = 1024  # backward: consecutive q blocks of one kind are merged up to this many rows

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# Fixed-shift forward: weights may reach 2^_HEADROOM after the shift; summed over 2^20 keys and times |v| that is
# still far below fp32's 2^128. Rows whose score bound exceeds their shift by more go through the online path.
_HEADROOM = 64.0
# Backward precision (fp32): P = exp2(S - lse2) takes the lse as stored, rounded to fp32, an absolute error of up
# to ulp(lse)/2 that is a relative error of every P of its row: 2e-6 at lse = 60 (FlashAttention's bwd_overflow
# inputs), dV 13x the error of a plain fp32 softmax, which normalizes over its own scores. From |lse2| >= this, a
# stats pass sums each row's exp2(S - lse2) over the same S bits (one more S matmul and exp2 per tile, ~+25% of
# the backward) and P is divided by that sum: normalized over the kernel's own scores, as the plain softmax is.
# Below, the stored lse moves P by <= 2^-20 (~5 ulp) and the pass is skipped. A float64 lse would not do: the
# backward's S is not the forward's bit for bit (another shift in another fused matmul) and rounds as much at |S|
# ~ 90. The same threshold as the native kernel's (csrc/backward.cc).
_RENORM_FROM = 16.0


# ---------------------------------------------------------------------------------------------------------------
# helpers

def _segments(kinds_row: List[int], Nk: int, bk: int, seg_k: int) -> List[Tuple[int, int, int]]:
    """Non-EMPTY tiles along a row (or column) of tiles, runs of FULL ones merged up to seg_k indices:
    [(start, end, kind)]."""
    segs: List[Tuple[int, int, int]] = []
    per = max(1, seg_k // bk)
    kb = 0
    while kb < len(kinds_row):
        kind = kinds_row[kb]
        if kind == EMPTY:
            kb += 1
            continue
        end = kb + 1
        # only FULL tiles merge: a PARTIAL tile stays alone so that its rows that see nothing can be skipped
        while kind == FULL and end < len(kinds_row) and end - kb < per and kinds_row[end] == FULL:
            end += 1
        segs.append((kb * bk, min(Nk, end * bk), kind))
        kb = end
    return segs


def _mm(out: Tensor, a: Tensor, b: Tensor, shift: Optional[Tensor] = None, add: bool = False) -> Tensor:
    """out = a @ b, or a @ b - shift (shift (J, M, 1)), or out += a @ b; all (J, ...) batches. One matrix (J = 1,
    the per-head items) goes through the 2-D BLAS entry points: mm/addmm run ~30% faster here than bmm/baddbmm
    on the same (1, 256, 512) problem."""
    if out.shape[0] == 1:
        o, a2, b2 = out[0], a[0], b[0]
        if add:
            o.addmm_(a2, b2)
        elif shift is not None:
            torch.addmm(shift[0].expand(o.shape), a2, b2, beta=-1.0, out=o)
        else:
            torch.mm(a2, b2, out=o)
    elif add:
        out.baddbmm_(a, b)
    elif shift is not None:
        torch.baddbmm(shift.expand(out.shape), a, b, beta=-1.0, out=out)
    else:
        torch.bmm(a, b, out=out)
    return out


def _scale_into(out: Tensor, x: Tensor, fac: float) -> Tensor:
    """out = x·fac in out's (compute) dtype. A bf16/fp16 x is widened first: torch.mul(x, fac, out=out) computes
    in x's dtype and would round every scaled q, hence every score, to 8 (bf16) or 11 bits before the softmax."""
    if x.dtype == out.dtype:
        return torch.mul(x, fac, out=out)
    return out.copy_(x).mul_(fac)


class _Heads:
    """The KV heads one work item covers: one (b, hkv) pair, or all of them (score modifiers see whole tiles)."""
    __slots__ = ("j0", "J", "b0", "h0", "Bi", "Hi", "Hkvi")

    def __init__(self, P: "_Problem", j: Optional[int]):
        if j is None:
            self.j0, self.J, self.b0, self.h0, self.Bi, self.Hkvi = 0, P.BH, 0, 0, P.B, P.Hkv
        else:
            self.j0, self.J, self.b0, self.h0, self.Bi, self.Hkvi = j, 1, j // P.Hkv, (j % P.Hkv) * P.G, 1, 1
        self.Hi = self.Hkvi * P.G  # query heads covered

    def select(self, t4: Tensor) -> Tensor:
        """Rows of a tensor broadcastable to (B, Hq, ...) that belong to these heads: (Bi|1, Hi|1, ...)."""
        if self.J != 1:
            return t4
        b = slice(self.b0, self.b0 + 1) if t4.shape[0] != 1 else slice(None)
        h = slice(self.h0, self.h0 + self.Hi) if t4.shape[1] != 1 else slice(None)
        return t4[b, h]


class _Problem:
    """Everything about one call that the forward and the backward share."""

    def __init__(self, call):
        q, k, v, mask, bias, score_mod = call.q, call.k, call.v, call.mask, call.bias, call.score_mod
        scale, dropout_p, seed = call.scale, call.dropout_p, call.seed
        block_q, block_k = call.block_q or BLOCK_Q, call.block_k or BLOCK_K
        self.call = call
        self.B, self.Hq, self.Nq, self.D = q.shape
        self.Hkv, self.Nk, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.BH = self.B * self.Hkv
        self.cdt = compute_dtype(q.dtype)
        self.mask, self.score_mod = mask, score_mod
        self.bias4 = bias
        self.bias_shape = call.bias_shape
        # a finite bias beyond ±max/log2(e) would overflow to ±inf in log2 units: clamp such tiles (rare, checked
        # once per call) so that the tiled kernel agrees with the reference, which works in natural units
        self.bias_clamp = bias is not None and bias.numel() > 0 and \
            bool((bias.detach().abs().masked_fill(torch.isinf(bias.detach()), 0).amax()
                  > torch.finfo(compute_dtype(q.dtype)).max / LOG2E))
        # NaN/inf in K: a masked entry of a visible tile must be overwritten with -inf, not added to
        self.scale, self.dropout_p, self.seed = scale, dropout_p, seed
        self.bq, self.bk = block_q, block_k
        self.device = q.device
        # only PARTIAL tiles need to know (a masked entry next to a NaN): one sum each, no bool copy of K/V; a
        # finite sum that overflows only sends the call down the careful path
        partial = mask is not None and any(kind == PARTIAL for row in call.tile_kinds(block_q, block_k) for kind in row)
        self.k_finite = not partial or k.numel() == 0 or math.isfinite(float(k.sum()))
        self.v_finite = not partial or v.numel() == 0 or math.isfinite(float(v.sum()))
        self.kinds = call.tile_kinds(block_q, block_k)
        self.segs = [_segments(row, self.Nk, block_k, max(SEGMENT_K, block_k)) for row in self.kinds]
        # the backward walks key tiles and, for each, merged runs of q blocks (its tiles are (G·Tq_seg, bk))
        self.seg_q = max(SEGMENT_Q, block_q) // block_q * block_q
        nkb = -(-self.Nk // block_k)
        self.col_segs = [_segments([row[kb] for row in self.kinds], self.Nq, block_q, self.seg_q)
                         for kb in range(nkb)]
        self._mask_cache = {}
        # fixed-shift forward (see the module docstring) needs scores bounded by |q|·|k|: no bias, no modifier
        self.shift_ok = bias is None and score_mod is None
        self.headroom = _HEADROOM
        # built-in modifiers take a head index: one (batch, KV head) per work item; a custom modifier that is not
        # per_head is called on whole (B, Hq, Tq, Tk) tiles
        self.per_head = score_mod is None or score_mod.per_head

    def q_range(self, qb: int) -> Tuple[int, int]:
        return qb * self.bq, min(self.Nq, (qb + 1) * self.bq)

    def idx(self, s: int, e: int, col: bool) -> Tensor:
        r = torch.arange(s, e, device=self.device)
        return r[None, :] if col else r[:, None]

    def tile_mask(self, hd: _Heads, qs, qe, ks, ke, neg: bool = False):
        """A PARTIAL tile's mask for the item's heads: (allowed (Bi|1, Hi|1, Tq', Tk) bool, r0, r1, dead, neginf).

        Rows outside r0:r1 may see no key of the tile: they get exactly nothing from it (weights 0, gradients 0),
        so callers skip them when G == 1 (a causal diagonal tile is half empty); allowed is already cut to
        them then (Tq' = r1 - r0), and (r0, r1) = (0, Tq) when G > 1. dead (Bi|1, Hkvi|1, Tk) bool marks keys
        no query of the tile may see (None if there is none). neginf, when asked for: allowed as an additive
        float tile (0 / -inf), ~6x cheaper to apply than masked_fill here. Everything derived from a mask that
        does not vary over batch and heads is computed once per tile and shared by the items of the other heads
        (they run at about the same time; a few recent tiles are kept). Reductions run on uint8 views: bool
        any() is ~10x slower than uint8 amax() in this torch build."""
        key = (qs, qe, ks, ke)
        ent = self._mask_cache.get(key)
        if ent is None:
            a = as_4d(self.call.mask_tile(qs, qe, ks, ke))
            a = a.expand(a.shape[0], a.shape[1], qe - qs, ke - ks)  # a mask may broadcast over rows or keys
            ent = {"a": a}
            if len(self._mask_cache) >= 16:  # dict ops are atomic under the GIL; a lost entry is only recomputed
                self._mask_cache.clear()
            if a.numel() <= 1 << 20:  # a per-(batch, head) mask tile can be large: keep only small ones
                self._mask_cache[key] = ent
        a = ent["a"]
        shared = a.shape[0] == 1 and a.shape[1] == 1  # same for every head: derived values can be cached
        if shared and "rows" in ent and (not neg or "neg" in ent):
            return ent["sel"], ent["rows"][0], ent["rows"][1], ent["dead"], ent.get("neg")
        sel = hd.select(a)
        Tq, Tk = sel.shape[-2], sel.shape[-1]
        u = sel.contiguous().view(torch.uint8)
        r0, r1 = 0, Tq
        if self.G == 1:
            rows = u.amax(-1).reshape(-1, Tq).amax(0)  # (Tq,) 1 where the row sees some key
            r0 = int(rows.argmax())
            if int(rows[r0]) == 0:
                return sel, 0, 0, None, None
            r1 = Tq - int(rows.flip(0).argmax())
            sel, u = sel[..., r0:r1, :], u[..., r0:r1, :]
        seen = u.amax(2)  # (Bi|1, Hi|1, Tk)
        if seen.shape[1] != 1:
            seen = seen.view(seen.shape[0], hd.Hkvi, self.G, Tk).amax(2)  # a KV head is seen if any of its G is
        dead = seen == 0
        dead = dead if int(seen.amin()) == 0 else None
        neginf = None
        if neg and self.k_finite:
            neginf = torch.zeros(sel.shape, dtype=self.cdt, device=sel.device).masked_fill_(~sel, float("-inf"))
        if shared:
            ent.update(sel=sel, rows=(r0, r1), dead=dead)
            if neg:
                ent["neg"] = neginf
        return sel, r0, r1, dead, neginf

    def clean_kv(self, hd: _Heads, dead: Optional[Tensor], kt: Tensor, vt: Tensor) -> Tuple[Tensor, Tensor]:
        """Zero K/V rows no query of the tile may see (NaN-safe): (J, Tk, D) copies, or kt, vt when none."""
        if dead is None:
            return kt, vt
        Tk = kt.shape[1]
        k4 = zero_rows(kt.view(hd.Bi, hd.Hkvi, Tk, kt.shape[-1]), dead)
        v4 = zero_rows(vt.view(hd.Bi, hd.Hkvi, Tk, vt.shape[-1]), dead)
        return k4.reshape(hd.J, Tk, kt.shape[-1]), v4.reshape(hd.J, Tk, vt.shape[-1])

    def keep_scale(self, hd: _Heads, qs, qe, ks, ke) -> Tensor:
        """Dropout multiplier of a tile for the item's heads, (J, G·Tq, Tk): keep / (1 - p). The hash only sees
        the global row id (b·Hq + h)·Nq + i, so offsetting q_idx by the item's first row id gives the same bits as
        the reference's whole-tensor call."""
        c = self.call
        keep = dropout_keep(self.seed, self.dropout_p, torch.arange(hd.b0, hd.b0 + hd.Bi),
                            torch.arange(hd.h0, hd.h0 + hd.Hi), c.q_pos(qs, qe), c.k_pos(ks, ke))
        return (keep.to(self.cdt) * (1.0 / (1.0 - self.dropout_p))).view(hd.J, self.G * (qe - qs), ke - ks)

    def scores(self, hd: _Heads, qt: Tensor, kt: Tensor, sbuf: Tensor, qs, qe, ks, ke, allowed,
               shift: Optional[Tensor] = None, grad_mod: bool = False, neginf: Optional[Tensor] = None):
        """Scores of one tile in log2 units, biased, modified, masked: (J, G·Tq, Tk) in sbuf.

        qt: (J, R, D) already multiplied by scale·log2(e); kt: (J, Tk, D) cleaned; shift: (J, R, 1) subtracted
        inside the matmul (only without bias and modifier). When grad_mod, also returns (s_in, s_out), natural
        units, for the backward to differentiate through."""
        J, R, Tk, Tq = qt.shape[0], qt.shape[1], ke - ks, qe - qs
        s = sbuf[: J * R * Tk].view(J, R, Tk)
        _mm(s, qt, kt.transpose(1, 2), shift=shift)  # s = qk - shift: the subtraction costs nothing in BLAS
        s4 = s.view(hd.Bi, hd.Hi, Tq, Tk)
        if self.bias4 is not None:
            bt = hd.select(bias_tile(self.bias4, qs, qe, ks, ke))
            if self.bias_clamp:
                big = torch.finfo(self.cdt).max
                bt = torch.where(torch.isinf(bt), bt * LOG2E, (bt * LOG2E).clamp(-big, big))
                s4.add_(bt)
            else:
                s4.add_(bt, alpha=LOG2E)
        graph = None
        if self.score_mod is not None:  # modifiers see natural-log scores: two extra passes, only here
            h_idx = None if hd.J == self.BH else torch.arange(hd.h0, hd.h0 + hd.Hi, device=self.device)
            s_nat = s4 * LN2
            if grad_mod:
                s_in = s_nat.requires_grad_(True)
                with torch.enable_grad():
                    s_out = self.call.apply_mod(s_in, qs, qe, ks, ke, h_idx).expand(hd.Bi, hd.Hi, Tq, Tk)
                graph = (s_in, s_out)
                torch.mul(s_out.detach(), LOG2E, out=s4)
            else:
                torch.mul(self.call.apply_mod(s_nat, qs, qe, ks, ke, h_idx).expand(hd.Bi, hd.Hi, Tq, Tk), LOG2E,
                          out=s4)
        if neginf is not None:  # finite scores (no bias, no modifier): adding the 0/-inf tile masks them
            s4.add_(neginf)
        elif allowed is not None:  # a bias or modifier may be NaN/inf where masked: overwrite
            s4.masked_fill_(~allowed, float("-inf"))
        return s, graph


# ---------------------------------------------------------------------------------------------------------------
# forward

def _forward(P: _Problem, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    BH, G, Nq, Nk, cdt = P.BH, P.G, P.Nq, P.Nk, P.cdt
    q4 = q.reshape(BH, G, Nq, P.D)  # (BH, G, Nq, D)
    k3 = k.reshape(BH, Nk, P.D)  # (BH, Nk, D)
    v3 = v.reshape(BH, Nk, P.Dv)  # (BH, Nk, Dv)
    out = torch.empty(BH, G, Nq, P.Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(BH, G, Nq, dtype=cdt, device=q.device)
    knorm = None
    if P.shift_ok and Nk > 0:
        # max |k_j| per (KV head, tile): (BH, nkb); NaN (a poisoned key) -> inf, which forces the exact path
        kn = torch.linalg.vector_norm(k3, dim=-1, dtype=cdt)  # (BH, Nk)
        nkb = -(-Nk // P.bk)
        kn = torch.nn.functional.pad(kn, (0, nkb * P.bk - Nk)).view(BH, nkb, P.bk).amax(-1)
        knorm = torch.nan_to_num(kn, nan=float("inf"))
        # the accumulator sums up to Nk weights of at most 2^headroom times |v|: keep that below the dtype's max
        # (|V| ~ 1e21 would overflow fp32 at the full 2^64 headroom; such calls get less, or the online path)
        vmax = float(v3.abs().amax()) if v3.numel() else 0.0
        if vmax > 0 and math.isfinite(vmax):
            room = math.log2(torch.finfo(cdt).max) - math.log2(vmax * max(Nk, 1)) - 2.0
            P.headroom = min(_HEADROOM, room)
    qfac = P.scale * LOG2E

    def item(it, ws: Workspace):
        j, qb = it
        hd = _Heads(P, j)
        J, js = hd.J, slice(hd.j0, hd.j0 + hd.J)
        qs, qe = P.q_range(qb)
        Tq = qe - qs
        R = G * Tq
        out_t = out[js, :, qs:qe]  # (J, G, Tq, Dv)
        lse_t = lse[js, :, qs:qe]  # (J, G, Tq)
        segs = P.segs[qb]
        if not segs:  # every key masked for these rows: out 0, lse -inf
            out_t.zero_()
            lse_t.fill_(float("-inf"))
            return
        qt = ws.get("q", J * R * P.D).view(J, R, P.D)
        _scale_into(qt.view(J, G, Tq, P.D), q4[js, :, qs:qe], qfac)  # scale·log2(e) folded in once
        acc = ws.get("acc", J * R * P.Dv).view(J, R, P.Dv)
        l = ws.get("l", J * R).view(J, R)
        sbuf = ws.get("s", J * R * max(ke - ks for ks, ke, _ in segs))
        ok = False
        if knorm is not None and any(kind == FULL for _, _, kind in segs):
            ok, m = _fwd_fixed_shift(P, hd, qt, k3[js], v3[js], knorm[js], segs, qs, qe, sbuf, acc, l)
        if not ok:
            m = _fwd_online(P, hd, qt, k3[js], v3[js], segs, qs, qe, sbuf, acc, l)
        l_safe = torch.where(l == 0, torch.ones_like(l), l)  # empty rows: acc is 0, out 0
        torch.div(acc.view(J, G, Tq, P.Dv), l_safe.view(J, G, Tq, 1), out=out_t)
        # natural log, m + log2(l) in float64 and rounded once (fp32 lost ~3e-7 at |lse2| ~ 10); empty rows: -inf
        torch.mul(l.double().log2_().add_(m).view(J, G, Tq), LN2, out=lse_t)

    heads = [] if BH == 0 else (list(range(BH)) if P.per_head else [None])
    items = [(j, qb) for qb in range(len(P.segs)) for j in heads]
    work = [sum(ke - ks for ks, ke, _ in P.segs[qb]) for _, qb in items]
    items = [it for _, it in sorted(zip(work, items), key=lambda x: -x[0])]  # longest first: balanced threads
    run(items, item, cdt, q.device)
    return out.view(P.B, P.Hq, Nq, P.Dv), lse.view(P.B, P.Hq, Nq)


def _forward_tile(P, hd, k3, v3, qs, qe, ks, ke, kind, plain):
    """K/V of one forward tile and the rows of it that may see a key: (kt, vt, allowed, neginf, r0, r1, i0, i1),
    or None when no row of the tile sees any key. Rows are trimmed to r0:r1 only when G == 1."""
    kt, vt = k3[:, ks:ke].to(P.cdt), v3[:, ks:ke].to(P.cdt)  # (J, Tk, D), (J, Tk, Dv); no copy for fp32
    allowed, neginf, r0, r1 = None, None, 0, P.G * (qe - qs)
    if kind != FULL:
        allowed, r0, r1, dead, neginf = P.tile_mask(hd, qs, qe, ks, ke, neg=plain)
        if r0 >= r1:
            return None
        if P.G != 1:
            r0, r1 = 0, P.G * (qe - qs)
        kt, vt = P.clean_kv(hd, dead, kt, vt)
    i0, i1 = (qs + r0, qs + r1) if P.G == 1 else (qs, qe)  # query indices of those rows
    return kt, vt, allowed, neginf, r0, r1, i0, i1


def _fwd_fixed_shift(P, hd, qt, k3, v3, knorm, segs, qs, qe, sbuf, acc, l):
    """One pass with a fixed per-row shift c: no running max, no rescaling. c is the exact row max over the first
    FULL segment (so at least one weight is 2^0 and the row sum is >= 1), accepted only if no score of the row
    can exceed it by more than _HEADROOM: scores are bounded by |q_i|·max_j|k_j| (Cauchy-Schwarz).
    Returns (ok, c); ok False means some row's bound was too loose: the caller redoes the block online."""
    kbs = sorted({kb for ks, ke, _ in segs for kb in range(ks // P.bk, -(-ke // P.bk))})
    bound = torch.linalg.vector_norm(qt, dim=-1).mul_(knorm[:, kbs].amax(-1)[:, None])  # (J, R)
    c = None
    # the common case, one head in the compute dtype without dropout, runs its FULL segments as five 2-D calls
    fast = qt.shape[0] == 1 and k3.dtype == P.cdt and v3.dtype == P.cdt and P.dropout_p == 0.0
    plain = True  # no bias, no modifier on this path: masks apply as an additive 0/-inf tile
    q2, k2, v2, acc2, l2, R = qt[0], k3[0], v3[0], acc[0], l[0], qt.shape[1]  # (R, D), (Nk, D), (Nk, Dv), ...
    c2 = None  # (R, 1) view of c, set with c
    for ks, ke, kind in sorted(segs, key=lambda sg: sg[2] != FULL):  # a FULL segment first, order kept
        if fast and kind == FULL and c is not None:
            s2 = sbuf[: R * (ke - ks)].view(R, ke - ks)
            torch.addmm(c2.expand(R, ke - ks), q2, k2[ks:ke].t(), beta=-1.0, out=s2)  # s - c
            l2.add_(s2.exp2_().sum(1))
            acc2.addmm_(s2, v2[ks:ke])
            continue
        tile = _forward_tile(P, hd, k3, v3, qs, qe, ks, ke, kind, plain)
        if tile is None:
            continue
        kt, vt, allowed, neginf, r0, r1, i0, i1 = tile
        first = c is None
        if first:
            s, _ = P.scores(hd, qt, kt, sbuf, qs, qe, ks, ke, None)
            c = s.amax(-1)  # (J, R), finite: every row has an allowed key in a FULL segment
            # inf bound (a NaN/inf key somewhere) also lands here; a NaN c (NaN in q) propagates like the math
            if bool((bound - c > P.headroom).any()):
                return False, None
            p = s.sub_(c.unsqueeze(-1)).exp2_()
            torch.sum(p, -1, out=l)
            c2 = c[0].unsqueeze(1)  # (R, 1) for the fast path (J == 1 there)
        else:
            p, _ = P.scores(hd, qt[:, r0:r1], kt, sbuf, i0, i1, ks, ke, allowed,
                            shift=c[:, r0:r1].unsqueeze(-1), neginf=neginf)
            p.exp2_()  # each weight <= 2^_HEADROOM
            l[:, r0:r1].add_(p.sum(-1))
        if P.dropout_p > 0.0:
            p.mul_(P.keep_scale(hd, i0, i1, ks, ke))
        _pv(P, kind, acc[:, r0:r1], p, vt, add=not first)
    return True, c


def _pv(P, kind, out: Tensor, p: Tensor, vt: Tensor, add: bool):
    """out (+)= p @ vt; in a PARTIAL tile of a call whose V holds NaN/inf, through ``safe_pv`` (checked once per
    call: the plain matmul would let 0·NaN reach rows that may not see that value)."""
    if P.v_finite or kind == FULL:
        return _mm(out, p, vt, add=add)
    pv = safe_pv(p, vt)
    return out.add_(pv) if add else out.copy_(pv)


def _fwd_online(P, hd, qt, k3, v3, segs, qs, qe, sbuf, acc, l):
    """Classic online softmax with a running max m (J, R) in log2 units. Returns m (-inf for empty rows)."""
    J, R = qt.shape[0], qt.shape[1]
    neg_inf = float("-inf")
    m = torch.full((J, R), neg_inf, dtype=P.cdt, device=qt.device)
    l.zero_()
    acc.zero_()
    plain = P.bias4 is None and P.score_mod is None
    for ks, ke, kind in segs:
        tile = _forward_tile(P, hd, k3, v3, qs, qe, ks, ke, kind, plain)
        if tile is None:
            continue
        kt, vt, allowed, neginf, r0, r1, i0, i1 = tile
        m_r, l_r, acc_r = m[:, r0:r1], l[:, r0:r1], acc[:, r0:r1]  # live rows (all of them unless trimmed)
        s, _ = P.scores(hd, qt[:, r0:r1], kt, sbuf, i0, i1, ks, ke, allowed, neginf=neginf)
        m_new = torch.maximum(m_r, s.amax(-1))  # (J, R)
        # rows with nothing allowed so far keep max -inf; subtract 0 there so exp2 gives 0, not NaN
        m_safe = m_new if (kind == FULL and plain) else m_new.masked_fill(m_new == neg_inf, 0.0)
        s.sub_(m_safe.unsqueeze(-1)).exp2_()  # s is now p, in place
        alpha = torch.exp2(m_r - m_safe)  # (J, R) rescale of what was accumulated
        l_r.mul_(alpha).add_(s.sum(-1))
        if P.dropout_p > 0.0:
            s.mul_(P.keep_scale(hd, i0, i1, ks, ke))
        _pv(P, kind, acc_r.mul_(alpha.unsqueeze(-1)), s, vt, add=True)  # acc = acc·alpha + p v
        m_r.copy_(m_new)
    return m


# ---------------------------------------------------------------------------------------------------------------
# backward

def _split_keys(P: _Problem, parts: int) -> List[Tuple[int, int]]:
    """Split the key tiles into `parts` contiguous ranges of about equal work (visited tiles): [(kb0, kb1)]."""
    nkb = -(-P.Nk // P.bk)
    col = [sum(1 for row in P.kinds if row[kb] != EMPTY) + 1 for kb in range(nkb)]
    total, bounds, acc, start = sum(col), [], 0, 0
    for kb in range(nkb):
        acc += col[kb]
        if len(bounds) < parts - 1 and acc >= total * (len(bounds) + 1) / parts and kb + 1 < nkb:
            bounds.append((start, kb + 1))
            start = kb + 1
    bounds.append((start, nkb))
    return bounds


class _Saved:
    """The backward's call-wide tensors, as its tiles read them: q4 (BH, G, Nq, D), do4 (BH, G, Nq, Dv), lse2 and
    delta (BH, G, Nq), rsum (BH, G, Nq) or None (the renormalization's row sums, once computed)."""
    __slots__ = ("q4", "do4", "lse2", "delta", "rsum", "plain", "grad_mod", "mod_params")

    def __init__(self, P: _Problem, q4, do4, lse2, delta, mod_params):
        self.q4, self.do4, self.lse2, self.delta, self.rsum = q4, do4, lse2, delta, None
        self.plain = P.bias4 is None and P.score_mod is None
        self.grad_mod = P.score_mod is not None
        self.mod_params = mod_params


def _backward(P: _Problem, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              need_bias_grad: bool, mod_params: Sequence[Tensor]):
    BH, G, Nq, Nk, cdt = P.BH, P.G, P.Nq, P.Nk, P.cdt
    k3 = k.reshape(BH, Nk, P.D)
    v3 = v.reshape(BH, Nk, P.Dv)
    # delta_i = sum_j P_ij dP_ij = dO_i · O_i (holds with dropout too): read 2·Nq·Dv, write Nq
    # in chunks of rows, so the product's temporary stays a few MiB at any N
    n_rows = P.B * P.Hq * Nq
    do_rows, out_rows = do.reshape(n_rows, P.Dv), out.reshape(n_rows, P.Dv)  # (B·Hq·Nq, Dv)
    delta = torch.empty(do_rows.shape[0], dtype=cdt, device=q.device)
    for r in range(0, do_rows.shape[0], 16384):
        delta[r:r + 16384] = (do_rows[r:r + 16384].to(cdt) * out_rows[r:r + 16384].to(cdt)).sum(-1)
    # log2-unit lse; empty rows have lse -inf: +inf makes exp2(s - lse2) = 0 there instead of NaN
    lse2 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).reshape(BH, G, Nq).to(cdt) \
        * LOG2E
    sv = _Saved(P, q.reshape(BH, G, Nq, P.D), do.reshape(BH, G, Nq, P.Dv), lse2, delta.view(BH, G, Nq),
                mod_params)
    dq = torch.zeros(BH, G, Nq, P.D, dtype=cdt, device=q.device)
    dk = torch.zeros(BH, Nk, P.D, dtype=cdt, device=q.device)
    dv = torch.zeros(BH, Nk, P.Dv, dtype=cdt, device=q.device)
    dbias = torch.zeros(P.bias4.shape, dtype=cdt, device=q.device) if need_bias_grad else None
    dparams = [torch.zeros_like(p, dtype=cdt) for p in mod_params]

    # Work items own disjoint key ranges, so dK/dV never race. dQ (and dbias, modifier parameter grads, the row
    # sums) sum over key ranges: the first range of a head writes the real buffers, the others private ones added
    # in order after the join -- deterministic, whatever thread ran what.
    nthreads = max(1, torch.get_num_threads())
    shared_acc = need_bias_grad or bool(mod_params) or not P.per_head
    heads: List[Optional[int]] = [] if BH == 0 else ([None] if shared_acc else list(range(BH)))
    parts = max(1, -(-nthreads // max(1, len(heads))))
    ranges = _split_keys(P, parts) if Nk > 0 else []
    items = [(j, kb0, kb1, slot) for j in heads for slot, (kb0, kb1) in enumerate(ranges)]

    def walk(it, ws: Workspace, dst, tile_fn):
        """tile_fn(P, hd, ws, sv, tile, ks, ke, *dst) for every visited tile of a work item: its key tiles in
        order, and for each the runs of q blocks of one kind, merged up to SEGMENT_Q rows."""
        j, kb0, kb1, _ = it
        hd = _Heads(P, j)
        js = slice(hd.j0, hd.j0 + hd.J)
        for kb in range(kb0, kb1):
            ks, ke = kb * P.bk, min(Nk, (kb + 1) * P.bk)
            kt0, vt0 = k3[js, ks:ke].to(cdt), v3[js, ks:ke].to(cdt)  # (J, Tk, D), (J, Tk, Dv)
            for qs, qe, kind in P.col_segs[kb]:
                tile = _backward_tile(P, hd, kt0, vt0, qs, qe, ks, ke, kind, sv.plain)
                if tile is not None:
                    tile_fn(P, hd, ws, sv, tile, ks, ke, *dst)

    private = {(j, slot): None for j, _, _, slot in items if slot > 0}
    if cdt == torch.float32 and _renormalize(lse2):
        # the stats pass (see _RENORM_FROM): row sums of exp2(S - lse2) over the same S bits as the pass below
        rsum = torch.zeros(BH, G, Nq, dtype=cdt, device=q.device)
        for key in private:
            private[key] = torch.zeros(BH if key[0] is None else 1, G, Nq, dtype=cdt, device=q.device)

        def stats_item(it, ws: Workspace):
            j, slot = it[0], it[3]
            dst = rsum[slice(None) if j is None else slice(j, j + 1)] if slot == 0 else private[(j, slot)]
            walk(it, ws, (dst,), _bwd_row_sums)

        run(items, stats_item, cdt, q.device)
        for (j, slot), rs in sorted(private.items(), key=lambda kv: (kv[0][1], kv[0][0] or 0)):
            rsum[slice(None) if j is None else slice(j, j + 1)].add_(rs)
        sv.rsum = rsum.masked_fill_(rsum == 0, 1.0)  # rows that see no key: P is 0 there anyway

    for j, slot in private:
        private[(j, slot)] = (torch.zeros(BH if j is None else 1, G, Nq, P.D, dtype=cdt, device=q.device),
                              torch.zeros_like(dbias) if dbias is not None else None,
                              [torch.zeros_like(d) for d in dparams])

    def item(it, ws: Workspace):
        j, slot = it[0], it[3]
        dst = (dq[slice(None) if j is None else slice(j, j + 1)], dbias, dparams) if slot == 0 \
            else private[(j, slot)]
        walk(it, ws, (dk, dv, *dst), _bwd_tile_grads)

    run(items, item, cdt, q.device)
    for (j, slot), (dq_p, dbias_p, dparams_p) in sorted(private.items(), key=lambda kv: (kv[0][1], kv[0][0] or 0)):
        js = slice(None) if j is None else slice(j, j + 1)
        dq[js].add_(dq_p)
        if dbias is not None:
            dbias.add_(dbias_p)
        for a, b in zip(dparams, dparams_p):
            a.add_(b)
    dq.mul_(P.scale)
    dk.mul_(LN2)
    return (dq.view(P.B, P.Hq, Nq, P.D), dk.view(P.B, P.Hkv, Nk, P.D), dv.view(P.B, P.Hkv, Nk, P.Dv),
            dbias, dparams)


def _renormalize(lse2: Tensor) -> bool:
    """Whether P is renormalized over the backward's own scores: some finite |lse2| >= _RENORM_FROM. The rule
    reads the data only (one pass over (BH, G, Nq)), so every schedule makes the same choice."""
    if lse2.numel() == 0:
        return False
    a = lse2.abs()
    return bool(torch.where(torch.isfinite(a), a, torch.zeros((), dtype=a.dtype)).amax() >= _RENORM_FROM)


def _backward_tile(P, hd, kt0, vt0, qs, qe, ks, ke, kind, plain):
    """K/V of one backward tile (a key tile and a run of q blocks) and the query rows of it that may see a key:
    (kt, vt, allowed, neginf, qs, qe), or None when no row sees any key. Rows are trimmed only when G == 1."""
    kt, vt, allowed, neginf = kt0, vt0, None, None
    if kind != FULL:
        allowed, r0, r1, dead, neginf = P.tile_mask(hd, qs, qe, ks, ke, neg=plain)
        if r0 >= r1:
            return None
        if P.G == 1:
            qs, qe = qs + r0, qs + r1
        kt, vt = P.clean_kv(hd, dead, kt0, vt0)
    return kt, vt, allowed, neginf, qs, qe


def _bwd_probs(P, hd, ws: Workspace, sv: _Saved, tile, ks, ke, grad_mod: bool):
    """The recomputed probabilities of one tile: (qt (J, R, D) times scale·log2(e), p (J, R, Tk) in ws's score
    buffer, graph (see _Problem.scores)). p = exp2(S - lse2), divided by the row sums when renormalized."""
    kt, _, allowed, neginf, qs, qe = tile
    J, js, G, Tq = hd.J, slice(hd.j0, hd.j0 + hd.J), P.G, qe - qs
    R, R_max = G * Tq, G * P.seg_q  # buffers sized for the largest tile: reused across the item's tiles
    qt = ws.get("q", J * R_max * P.D)[: J * R * P.D].view(J, R, P.D)
    _scale_into(qt.view(J, G, Tq, P.D), sv.q4[js, :, qs:qe], P.scale * LOG2E)
    lse_t = sv.lse2[js, :, qs:qe].reshape(J, R, 1)
    s, graph = P.scores(hd, qt, kt, ws.get("s", J * R_max * P.bk), qs, qe, ks, ke, allowed,
                        shift=lse_t if sv.plain else None, grad_mod=grad_mod, neginf=neginf)
    if not sv.plain:
        s.sub_(lse_t)
    p = s.exp2_()  # (J, R, Tk) probabilities, in place
    if sv.rsum is not None:
        p.div_(sv.rsum[js, :, qs:qe].reshape(J, R, 1))  # a division: one visible key gives P = 1 exactly
    return qt, p, graph


def _bwd_row_sums(P, hd, ws: Workspace, sv: _Saved, tile, ks, ke, rsum: Tensor):
    """rsum (J, G, Nq) += the tile's row sums of exp2(S - lse2)."""
    qs, qe = tile[4], tile[5]
    _, p, _ = _bwd_probs(P, hd, ws, sv, tile, ks, ke, grad_mod=False)
    rsum[:, :, qs:qe].add_(p.sum(-1).view(hd.J, P.G, qe - qs))


def _bwd_tile_grads(P, hd, ws: Workspace, sv: _Saved, tile, ks, ke, dk: Tensor, dv: Tensor, dq_t: Tensor,
                    dbias_t: Optional[Tensor], dparams_t: List[Tensor]):
    """One tile's share of every gradient: dk, dv (BH, Nk, ·) and dq_t (J, G, Nq, D) accumulated in place, in
    log2 units (the caller applies ln 2 and the scale once); dbias_t, dparams_t too when given."""
    kt, vt, allowed, _, qs, qe = tile
    J, js, G, Tq, Tk, cdt = hd.J, slice(hd.j0, hd.j0 + hd.J), P.G, qe - qs, ke - ks, P.cdt
    R, R_max = G * Tq, G * P.seg_q
    qt, p, graph = _bwd_probs(P, hd, ws, sv, tile, ks, ke, grad_mod=sv.grad_mod)
    dot = sv.do4[js, :, qs:qe]
    if G != 1 or dot.dtype != cdt or not dot.is_contiguous():
        dot = ws.get("do", J * R_max * P.Dv)[: J * R * P.Dv].view(J, G, Tq, P.Dv).copy_(dot)
    dot = dot.reshape(J, R, P.Dv)
    delta_t = sv.delta[js, :, qs:qe].reshape(J, R, 1)
    dk_acc, dv_acc = dk[js, ks:ke], dv[js, ks:ke]  # (J, Tk, D), (J, Tk, Dv) views, accumulated in place
    dp = ws.get("dp", J * R_max * P.bk)[: J * R * Tk].view(J, R, Tk)
    # dP - delta in two steps, not one baddbmm(beta=-1): with a single visible key dP == delta and the exact
    # gradient is 0; a separate subtraction keeps it 0 where a fused beta would leave roundoff
    _mm(dp, dot, vt.transpose(1, 2)).sub_(delta_t)
    if P.dropout_p > 0.0:
        keep = P.keep_scale(hd, qs, qe, ks, ke)
        _mm(dv_acc, (p * keep).transpose(1, 2), dot, add=True)
        dp.add_(delta_t).mul_(keep).sub_(delta_t)  # dropout scales dP, not delta
    else:
        _mm(dv_acc, p.transpose(1, 2), dot, add=True)  # dV += Pᵀ dO (sums the G heads of a KV head)
    ds = dp.mul_(p)  # dS = P ∘ (dP − delta), natural-log units
    if allowed is not None:  # masked entries: exactly 0 even if dP is NaN from a dead key
        ds4 = ds.view(hd.Bi, hd.Hi, Tq, Tk)
        torch.where(allowed, ds4, torch.zeros((), dtype=cdt), out=ds4)  # 1.5x faster than masked_fill
    if graph is not None:
        s_in, s_out = graph
        with torch.enable_grad():
            grads = torch.autograd.grad(s_out, [s_in, *sv.mod_params], ds.view(hd.Bi, hd.Hi, Tq, Tk),
                                        allow_unused=True)
        ds = grads[0].reshape(J, R, Tk)
        for acc_p, g in zip(dparams_t, grads[1:]):
            if g is not None:
                acc_p.add_(g)
    if dbias_t is not None:
        _accumulate_bias_grad(dbias_t, ds.view(P.B, P.Hq, Tq, Tk), qs, qe, ks, ke)
    dq_rows = dq_t[:, :, qs:qe]  # (J, G, Tq, D)
    if G == 1:
        _mm(dq_rows.view(J, Tq, P.D), ds, kt, add=True)  # scale applied once at the end
    else:
        dq_rows.add_(torch.bmm(ds, kt).view(J, G, Tq, P.D))
    _mm(dk_acc, ds.transpose(1, 2), qt, add=True)  # qt carries scale·log2(e): × ln 2 at the end


def _accumulate_bias_grad(dbias: Tensor, ds4: Tensor, qs, qe, ks, ke):
    """dbias (Bb, Hb, Nq|1, Nk|1) += ds (B, Hq, Tq, Tk) summed over the dims the bias broadcasts."""
    dims = [d for d in range(4) if dbias.shape[d] == 1 and ds4.shape[d] != 1]
    g = ds4.sum(dim=dims, keepdim=True) if dims else ds4
    bias_tile(dbias, qs, qe, ks, ke).add_(g)


# ---------------------------------------------------------------------------------------------------------------
# the kernel contract

NAME = "tiled"
COMPILED = False  # torch ops: traced as they are
DEVICES = None  # torch ops: any device
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = None
FUNCTORCH = True  # torch ops only: runs under torch.func.grad / vjp
DIFFERENTIABLE_BACKWARD = False
PRIORITY = 40  # last: the portable fallback


def why_not(call) -> Optional[str]:
    return None  # the portable fallback serves every call attention() accepts


def automatic(call) -> Tuple[bool, str]:
    return True, "the portable torch-op kernel, memory linear in sequence length, masked tiles skipped"


def tiles(call) -> Tuple[int, int]:
    return call.block_q or BLOCK_Q, call.block_k or BLOCK_K


def _problem(call) -> _Problem:
    P = call._memo.get("tiled_problem")
    if P is None:
        P = call._memo["tiled_problem"] = _Problem(call)
    return P


def forward(call) -> Tuple[Tensor, Tensor]:
    with torch.no_grad():
        return _forward(_problem(call), call.q, call.k, call.v)


def backward(call, grad_out: Tensor, out: Tensor, lse: Tensor, needs):
    P = _problem(call)
    params = call.mod_params
    wanted = list(params) if needs[4] else []
    dq, dk, dv, dbias, dwanted = _backward(P, grad_out.contiguous(), call.q, call.k, call.v, out, lse,
                                           bool(needs[3]) and P.bias4 is not None, wanted)
    dparams = tuple(d.to(p.dtype) for d, p in zip(dwanted, params)) if needs[4] else tuple(None for _ in params)
    return (dq.to(call.q.dtype), dk.to(call.k.dtype), dv.to(call.v.dtype),
            dbias.to(call.bias.dtype) if dbias is not None else None, dparams)
