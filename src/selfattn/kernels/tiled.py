"""The tiled kernel: FlashAttention's blocked online softmax, forward and backward, on torch ops.

Never holds more than one (B·Hkv, G·Tq, Tk) tile of scores. Tiles the mask classifies EMPTY are never computed;
FULL tiles skip the mask; PARTIAL tiles evaluate ``mask_mod`` on the tile's indices. The backward saves only
q, k, v, out and lse (plus the dropout seed) and recomputes every tile's scores.

Shape legend: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, Nq/Nk sequence lengths, D/Dv head dims,
Tq/Tk tile sizes, BH = B·Hkv. GQA without copying K/V: the G query heads that share a KV head are stacked along
the row axis of one tile, (BH, G·Tq, D) @ (BH, D, Tk).

Cost per visited tile (forward): 2 matmuls of 2·G·Tq·Tk·D flops; the softmax touches the tile ~4 times
(max, subtract+exp in place, sum). Backward: 5 matmuls (recompute S, dV, dP, dQ, dK) = 2.5× the forward flops.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..masks import EMPTY, FULL, summarize_classes
from ._common import as_4d, bias_tile, compute_dtype, dead_keys, dropout_keep, zero_rows

# Chosen by benchmarks/bench_core.py on a 2-core x86 CPU (see benchmarks/NOTES.md).
BLOCK_Q = 256
BLOCK_K = 512


def _tile_kinds(mask, B: int, Hq: int, Nq: int, Nk: int, bq: int, bk: int, device) -> List[List[int]]:
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    if mask is None:
        return [[FULL] * nkb for _ in range(nqb)]
    return summarize_classes(mask.block_classes(B, Hq, Nq, Nk, bq, bk, device)).tolist()


class _Problem:
    """Everything about one call that the forward and the backward share."""

    def __init__(self, q, k, v, mask, bias, score_mod, scale, dropout_p, seed, block_q, block_k):
        self.B, self.Hq, self.Nq, self.D = q.shape
        self.Hkv, self.Nk, self.Dv = k.shape[1], k.shape[2], v.shape[-1]
        self.G = self.Hq // self.Hkv
        self.BH = self.B * self.Hkv
        self.cdt = compute_dtype(q.dtype)
        self.mask, self.score_mod = mask, score_mod
        self.bias4 = as_4d(bias) if bias is not None else None
        self.bias_shape = bias.shape if bias is not None else None
        self.scale, self.dropout_p, self.seed = scale, dropout_p, seed
        self.bq, self.bk = block_q, block_k
        self.device = q.device
        self.kinds = _tile_kinds(mask, self.B, self.Hq, self.Nq, self.Nk, block_q, block_k, q.device)

    def q_tiles(self):
        for qb in range(len(self.kinds)):
            qs = qb * self.bq
            yield qb, qs, min(self.Nq, qs + self.bq)

    def k_tiles(self):
        for kb in range(-(-self.Nk // self.bk)):
            ks = kb * self.bk
            yield kb, ks, min(self.Nk, ks + self.bk)

    def idx(self, s: int, e: int, col: bool) -> Tensor:
        r = torch.arange(s, e, device=self.device)
        return r[None, :] if col else r[:, None]

    def scores(self, qt: Tensor, kt: Tensor, qs, qe, ks, ke, partial: bool, grad_mod: bool = False):
        """Scaled, biased, modified, masked scores of one tile.

        qt: (BH, G·Tq, D) already multiplied by scale; kt: (BH, Tk, D).
        Returns s (BH, G·Tq, Tk) contiguous, the allowed mask (or None) and, when grad_mod, the (s_in, s_out)
        pair the backward differentiates through."""
        B, Hq, Tq, Tk = self.B, self.Hq, qe - qs, ke - ks
        s = torch.bmm(qt, kt.transpose(1, 2))  # (BH, G·Tq, Tk)
        s4 = s.view(B, Hq, Tq, Tk)
        if self.bias4 is not None:
            s4.add_(bias_tile(self.bias4, qs, qe, ks, ke))
        graph = None
        if self.score_mod is not None:
            qi, ki = self.idx(qs, qe, False), self.idx(ks, ke, True)
            if grad_mod:
                s_in = s4.detach().requires_grad_(True)
                with torch.enable_grad():
                    s_out = self.score_mod(s_in, qi, ki).expand(B, Hq, Tq, Tk)
                graph = (s_in, s_out)
                s4 = s_out.detach().contiguous()
            else:
                s4 = self.score_mod(s4, qi, ki).expand(B, Hq, Tq, Tk).contiguous()
            s = s4.view(self.BH, self.G * Tq, Tk)
        allowed = None
        if partial:
            allowed = as_4d(self.mask.mask_mod(self.idx(qs, qe, False), self.idx(ks, ke, True), self.Nq, self.Nk))
            s4.masked_fill_(~allowed, float("-inf"))
        return s, allowed, graph

    def keep_scale(self, qs, qe, ks, ke) -> Tensor:
        """Dropout multiplier of a tile, (BH, G·Tq, Tk): keep / (1 - p)."""
        keep = dropout_keep(self.seed, self.dropout_p, self.B, self.Hq, self.Nq, self.Nk,
                            self.idx(qs, qe, False), self.idx(ks, ke, True), device=self.device)
        return (keep.to(self.cdt) * (1.0 / (1.0 - self.dropout_p))).view(self.BH, self.G * (qe - qs), ke - ks)

    def clean_kv(self, allowed, kt, vt):
        """Zero K/V rows no query of the tile may see (NaN-safe), (BH, Tk, D)."""
        dead = dead_keys(allowed, self.B, self.Hkv, self.G)  # (Bm, Hkv|1, Tk)
        if not bool(dead.any()):
            return kt, vt
        Tk = kt.shape[1]
        # explicit head dims, not -1: with B = 0 the tiles hold no elements and -1 would be ambiguous
        k4 = zero_rows(kt.view(self.B, self.Hkv, Tk, self.D), dead)
        v4 = zero_rows(vt.view(self.B, self.Hkv, Tk, self.Dv), dead)
        return k4.reshape(self.BH, Tk, self.D), v4.reshape(self.BH, Tk, self.Dv)


def _forward(P: _Problem, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    BH, G, Nq, cdt = P.BH, P.G, P.Nq, P.cdt
    q4 = q.reshape(BH, G, Nq, P.D)  # (BH, G, Nq, D)
    k3 = k.reshape(BH, P.Nk, P.D)  # (BH, Nk, D)
    v3 = v.reshape(BH, P.Nk, P.Dv)  # (BH, Nk, Dv)
    out = torch.empty(BH, G, Nq, P.Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(BH, G, Nq, dtype=cdt, device=q.device)
    neg_inf = float("-inf")
    for qb, qs, qe in P.q_tiles():
        Tq = qe - qs
        # scale folded into q once per q tile (G·Tq·D multiplies instead of G·Tq·Nk)
        qt = q4[:, :, qs:qe].reshape(BH, G * Tq, P.D).to(cdt) * P.scale  # (BH, G·Tq, D)
        m = torch.full((BH, G * Tq), neg_inf, dtype=cdt, device=q.device)  # running max
        l = torch.zeros((BH, G * Tq), dtype=cdt, device=q.device)  # running sum
        acc = torch.zeros((BH, G * Tq, P.Dv), dtype=cdt, device=q.device)  # unnormalized output
        for kb, ks, ke in P.k_tiles():
            kind = P.kinds[qb][kb]
            if kind == EMPTY:
                continue
            kt, vt = k3[:, ks:ke].to(cdt), v3[:, ks:ke].to(cdt)  # (BH, Tk, D), (BH, Tk, Dv)
            s, allowed, _ = P.scores(qt, kt, qs, qe, ks, ke, kind != FULL)
            if allowed is not None:
                kt, vt = P.clean_kv(allowed, kt, vt)
            m_new = torch.maximum(m, s.amax(-1))  # (BH, G·Tq)
            # rows with nothing allowed so far keep max -inf; subtract 0 there so exp gives 0, not NaN
            m_safe = m_new.masked_fill(m_new == neg_inf, 0.0) if kind != FULL or P.bias4 is not None \
                or P.score_mod is not None else m_new
            s.sub_(m_safe.unsqueeze(-1)).exp_()  # s is now p, in place: no second tile-sized buffer
            alpha = torch.exp(m - m_safe)  # (BH, G·Tq) rescale of what was accumulated
            l.mul_(alpha).add_(s.sum(-1))
            if P.dropout_p > 0.0:
                s.mul_(P.keep_scale(qs, qe, ks, ke))
            acc.mul_(alpha.unsqueeze(-1)).baddbmm_(s, vt)  # acc = acc·alpha + p v
            m = m_new
        l_safe = torch.where(l == 0, torch.ones_like(l), l)
        out[:, :, qs:qe] = (acc / l_safe.unsqueeze(-1)).view(BH, G, Tq, P.Dv).to(q.dtype)
        lse[:, :, qs:qe] = (m + torch.log(l)).view(BH, G, Tq)  # empty rows: -inf + log 0 = -inf
    return out.view(P.B, P.Hq, Nq, P.Dv), lse.view(P.B, P.Hq, Nq)


def _backward(P: _Problem, do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
              need_bias_grad: bool, mod_params: Sequence[Tensor]):
    BH, G, Nq, Nk, cdt = P.BH, P.G, P.Nq, P.Nk, P.cdt
    q4 = q.reshape(BH, G, Nq, P.D)
    k3 = k.reshape(BH, Nk, P.D)
    v3 = v.reshape(BH, Nk, P.Dv)
    do4 = do.reshape(BH, G, Nq, P.Dv)
    # delta_i = sum_j P_ij dP_ij = dO_i · O_i (holds with dropout too): read 2·Nq·Dv, write Nq
    delta = (do.to(cdt) * out.to(cdt)).sum(-1).reshape(BH, G, Nq)
    # empty rows have lse -inf; +inf makes exp(s - lse) = 0 there instead of NaN
    lse4 = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).reshape(BH, G, Nq).to(cdt)
    dq = torch.zeros(BH, G, Nq, P.D, dtype=cdt, device=q.device)
    dk = torch.empty(BH, Nk, P.D, dtype=cdt, device=q.device)
    dv = torch.empty(BH, Nk, P.Dv, dtype=cdt, device=q.device)
    dbias = torch.zeros(P.bias4.shape, dtype=cdt, device=q.device) if need_bias_grad else None
    dparams = [torch.zeros_like(p, dtype=cdt) for p in mod_params]
    q_cache = {}
    for kb, ks, ke in P.k_tiles():
        Tk = ke - ks
        kt0, vt0 = k3[:, ks:ke].to(cdt), v3[:, ks:ke].to(cdt)  # (BH, Tk, D), (BH, Tk, Dv)
        dk_acc = torch.zeros(BH, Tk, P.D, dtype=cdt, device=q.device)
        dv_acc = torch.zeros(BH, Tk, P.Dv, dtype=cdt, device=q.device)
        for qb, qs, qe in P.q_tiles():
            kind = P.kinds[qb][kb]
            if kind == EMPTY:
                continue
            Tq = qe - qs
            if qb not in q_cache:  # q·scale and dO tiles, reused across k tiles
                q_cache.clear() if len(q_cache) > 64 else None
                q_cache[qb] = (q4[:, :, qs:qe].reshape(BH, G * Tq, P.D).to(cdt) * P.scale,
                               do4[:, :, qs:qe].reshape(BH, G * Tq, P.Dv).to(cdt))
            qt, dot = q_cache[qb]
            s, allowed, graph = P.scores(qt, kt0, qs, qe, ks, ke, kind != FULL,
                                         grad_mod=P.score_mod is not None)
            kt, vt = (kt0, vt0) if allowed is None else P.clean_kv(allowed, kt0, vt0)
            lse_t = lse4[:, :, qs:qe].reshape(BH, G * Tq, 1)
            p = s.sub_(lse_t).exp_()  # (BH, G·Tq, Tk) probabilities, in place
            dp = torch.bmm(dot, vt.transpose(1, 2))  # (BH, G·Tq, Tk)
            if P.dropout_p > 0.0:
                ks_ = P.keep_scale(qs, qe, ks, ke)
                dv_acc.baddbmm_((p * ks_).transpose(1, 2), dot)
                dp.mul_(ks_)
            else:
                dv_acc.baddbmm_(p.transpose(1, 2), dot)  # dV += Pᵀ dO (sums the G heads of a KV head)
            ds = dp.sub_(delta[:, :, qs:qe].reshape(BH, G * Tq, 1)).mul_(p)  # dS = P ∘ (dP − delta)
            if allowed is not None:  # masked entries: exactly 0 even if dP is NaN from a dead key
                ds.view(P.B, P.Hq, Tq, Tk).masked_fill_(~allowed, 0.0)
            if graph is not None:
                s_in, s_out = graph
                grads = torch.autograd.grad(s_out, [s_in, *mod_params], ds.view(P.B, P.Hq, Tq, Tk),
                                            allow_unused=True)
                ds = grads[0].reshape(BH, G * Tq, Tk)
                for acc_p, g in zip(dparams, grads[1:]):
                    if g is not None:
                        acc_p.add_(g)
            if dbias is not None:
                _accumulate_bias_grad(dbias, ds.view(P.B, P.Hq, Tq, Tk), qs, qe, ks, ke)
            dq[:, :, qs:qe].add_(torch.bmm(ds, kt).view(BH, G, Tq, P.D), alpha=P.scale)
            dk_acc.baddbmm_(ds.transpose(1, 2), qt)  # qt carries the scale already
        dk[:, ks:ke] = dk_acc
        dv[:, ks:ke] = dv_acc
    return (dq.view(P.B, P.Hq, Nq, P.D), dk.view(P.B, P.Hkv, Nk, P.D), dv.view(P.B, P.Hkv, Nk, P.Dv),
            dbias, dparams)


def _accumulate_bias_grad(dbias: Tensor, ds4: Tensor, qs, qe, ks, ke):
    """dbias (Bb, Hb, Nq|1, Nk|1) += ds (B, Hq, Tq, Tk) summed over the dims the bias broadcasts."""
    dims = [d for d in range(4) if dbias.shape[d] == 1 and ds4.shape[d] != 1]
    g = ds4.sum(dim=dims, keepdim=True) if dims else ds4
    bias_tile(dbias, qs, qe, ks, ke).add_(g)


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, problem: _Problem, *mod_params):
        out, lse = _forward(problem, q, k, v)
        ctx.problem = problem
        ctx.save_for_backward(q, k, v, out, lse)  # no scores, no dropout mask: only a seed
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.mod_params = mod_params  # the modifier's own tensors (a learned table), read again per tile
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        P = ctx.problem
        need_bias = P.bias4 is not None and ctx.needs_input_grad[3]
        wanted = [p for p, n in zip(ctx.mod_params, ctx.needs_input_grad[5:]) if n]
        dq, dk, dv, dbias, dwanted = _backward(P, dout.contiguous(), q, k, v, out, lse, need_bias, wanted)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype).reshape(P.bias_shape)
        it = iter(dwanted)
        dparams = [next(it).to(p.dtype) if n else None for p, n in zip(ctx.mod_params, ctx.needs_input_grad[5:])]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dbias, None, *dparams)


def attention_tiled(q: Tensor, k: Tensor, v: Tensor, mask=None, bias: Optional[Tensor] = None, score_mod=None,
                    scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0, return_lse: bool = False,
                    block_q: Optional[int] = None, block_k: Optional[int] = None):
    """q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), v: (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) [, lse (B, Hq, Nq)].

    Inputs are assumed validated by ``selfattn.attention``. lse is float32 (float64 for float64 inputs)."""
    problem = _Problem(q, k, v, mask, bias, score_mod, scale, dropout_p, seed,
                       block_q or BLOCK_Q, block_k or BLOCK_K)
    mod_params = tuple(score_mod.parameters()) if score_mod is not None else ()
    out, lse = _TiledAttention.apply(q, k, v, bias, problem, *mod_params)
    return (out, lse) if return_lse else out
