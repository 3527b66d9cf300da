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

from .common import as_4d, compute_dtype, dead_keys, dropout_keep, safe_pv, zero_rows

DEFAULT_MAX_BYTES = 4 << 30


def max_bytes() -> int:
    raw = os.environ.get("SELFATTN_REFERENCE_MAX_BYTES")
    if raw is None:
        return DEFAULT_MAX_BYTES
    try:
        n = int(raw.strip())
    except ValueError:
        raise ValueError(f"SELFATTN_REFERENCE_MAX_BYTES: expected a whole number of bytes (e.g. 8000000000), got "
                         f"{raw!r}") from None
    if n < 0:
        raise ValueError(f"SELFATTN_REFERENCE_MAX_BYTES: expected a non-negative number of bytes, got {n}")
    return n


def score_bytes(B: int, Hq: int, Nq: int, Nk: int, dtype: torch.dtype) -> int:
    return B * Hq * Nq * Nk * torch.empty((), dtype=compute_dtype(dtype)).element_size()


NAME = "reference"
COMPILED = False  # torch ops: traced as they are
DEVICES = None  # torch ops: any device
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = None
FUNCTORCH = True  # torch ops only: runs under torch.func.grad / vjp
DIFFERENTIABLE_BACKWARD = True  # the backward recomputes under autograd: double backward is exact
PRIORITY = 30
# Automatic choice: below this many score entries per (batch, head) the single matmul beats tiling's per-tile
# overhead; above it the tiled kernel runs, so memory never grows with Nq·Nk by surprise
AUTO_MAX_SCORES = 128 * 128


def automatic(call):
    n = call.Nq * call.Nk
    if n > AUTO_MAX_SCORES:
        return False, f"Nq·Nk = {n} > {AUTO_MAX_SCORES} (the tiled kernel keeps memory linear)"
    return True, f"Nq·Nk = {n} ≤ {AUTO_MAX_SCORES}, one small matmul beats per-tile overhead"


def tiles(call):
    """One tile: the whole (Nq, Nk) score matrix."""
    return max(call.Nq, 1), max(call.Nk, 1)


def why_not(call) -> Optional[str]:
    need = score_bytes(call.B, call.Hq, call.Nq, call.Nk, call.dtype)
    if need > max_bytes():
        return (f"its scores need {need / 2**30:.1f} GiB for (B, H, Nq, Nk) = {(call.B, call.Hq, call.Nq, call.Nk)} "
                f"(limit SELFATTN_REFERENCE_MAX_BYTES={max_bytes()})")
    return None


def math_(call, return_weights: bool = False):
    """The explicit math on a call, differentiable through torch autograd (to any order):
    out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) [, weights (B, Hq, Nq, Nk) before dropout]."""
    q, k, v = call.q, call.k, call.v
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = Hq // Hkv
    reason = why_not(call)
    if reason is not None:
        raise ValueError(f"kernel='reference' cannot serve this call: {reason}; use kernel='tiled' or None")
    cdt = compute_dtype(q.dtype)
    kf, vf = k.to(cdt), v.to(cdt)
    allowed = call.dense_mask()
    if allowed is not None:
        dead = dead_keys(allowed, B, Hkv, G)  # (Bm, Hkv|1, Nk)
        kf, vf = zero_rows(kf, dead), zero_rows(vf, dead)
    qf = q.to(cdt).reshape(B, Hkv, G * Nq, D)  # (B, Hkv, G·Nq, D): GQA by grouping, K/V never repeated
    s = (qf @ kf.transpose(-1, -2)).view(B, Hq, Nq, Nk) * call.scale  # (B, Hq, Nq, Nk)
    if call.bias is not None:
        s = s + call.bias.to(cdt)
    if call.score_mod is not None:
        s = call.apply_mod(s, 0, Nq, 0, Nk, None).expand(B, Hq, Nq, Nk)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if Nk == 0:  # no keys: every row is empty (amax refuses an empty dim)
        m = s.new_full((B, Hq, Nq, 1), float("-inf"))
    else:
        m = s.amax(-1, keepdim=True).detach()  # (B, Hq, Nq, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # empty rows: exp(-inf - 0) = 0, not NaN
    # a finite max can still overflow exp's argument only if scores are ±inf: +inf scores make a NaN row, as the
    # math says (every kernel returns the same NaN)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    w = p / torch.where(l == 0, torch.ones_like(l), l)  # empty rows: weights 0, output 0
    wd = w
    if call.dropout_p > 0.0:
        keep = dropout_keep(call.seed, call.dropout_p, torch.arange(B), torch.arange(Hq), call.q_pos(0, Nq),
                            call.k_pos(0, Nk))
        wd = w * keep.to(cdt) / (1.0 - call.dropout_p)
    wg = wd.reshape(B, Hkv, G * Nq, Nk)  # (B, Hkv, G·Nq, Nk)
    pv = wg @ vf if allowed is None or bool(torch.isfinite(vf).all()) else safe_pv(wg, vf)  # 0·NaN never leaks
    out = pv.view(B, Hq, Nq, Dv).to(q.dtype)  # (B, Hq, Nq, Dv)
    lse = (m + torch.log(l)).squeeze(-1)
    if return_weights:
        return out, lse, w.to(q.dtype)
    return out, lse


def forward(call):
    with torch.no_grad():
        out, lse = math_(call)
    return out, lse


def backward(call, grad_out: Tensor, out: Tensor, lse: Tensor, needs):
    """Recomputes the forward under autograd and differentiates it; under create_graph (double backward) the
    gradients keep their graph, so second-order terms are exact."""
    create = torch.is_grad_enabled()
    if torch._C._are_functorch_transforms_active():  # torch.func.grad / vjp: differentiate functionally
        return _backward_functional(call, grad_out, needs)
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(n) for t, n in zip((call.q, call.k, call.v), needs[:3]))
        if create:  # keep the graph back to the caller's tensors
            q, k, v = call.q, call.k, call.v
        bias = call.bias
        if bias is not None and not create:
            bias = bias.detach().requires_grad_(needs[3])
        params = call.mod_params
        sub = call.with_tensors(q, k, v, bias)
        o, _ = math_(sub)
        wrt = [t for t, n in zip((q, k, v, bias), needs[:4]) if n] + [p for p in params if needs[4]]
        grads = torch.autograd.grad(o, wrt, grad_out, allow_unused=True, create_graph=create) if wrt else ()
    it = iter(grads)
    dq, dk, dv, db = (next(it) if n else None for n in needs[:4])
    dparams = tuple(next(it) if needs[4] else None for _ in params)
    fill = [(dq, call.q), (dk, call.k), (dv, call.v)]
    dq, dk, dv = (torch.zeros_like(t) if (g is None and n) else g for (g, t), n in zip(fill, needs[:3]))
    if needs[3] and db is None and bias is not None:
        db = torch.zeros_like(bias)
    return dq, dk, dv, db, dparams


def _backward_functional(call, grad_out: Tensor, needs):
    """The same gradients through torch.func.vjp (under torch.func transforms requires_grad_ is not allowed).
    Modifier parameters (a T5 table) are differentiated through the call's own tensors only when not needed."""
    if needs[4] and call.mod_params:
        raise RuntimeError("kernel='reference' under torch.func transforms: gradients to score-modifier parameters "
                           "(a T5 table) are not supported there; use plain autograd")
    bias = call.bias if call.bias is not None else torch.zeros(())

    def f(q, k, v, b):
        return math_(call.with_tensors(q, k, v, b if call.bias is not None else None))[0]

    _, vjp = torch.func.vjp(f, call.q, call.k, call.v, bias)
    dq, dk, dv, db = vjp(grad_out)
    return (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
            db if (needs[3] and call.bias is not None) else None, tuple(None for _ in call.mod_params))


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask=None, bias: Optional[Tensor] = None,
                        score_mod=None, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                        return_lse: bool = False, return_weights: bool = False):
    """The reference math on plain arguments (tests and the oracle): out [, lse] [, weights], differentiable."""
    from .call import Call
    c = Call(q, k, v, mask=mask, bias=as_4d(bias) if bias is not None else None,
             bias_shape=tuple(bias.shape) if bias is not None else None,
             score_mod=score_mod.bind(q.shape[1]) if score_mod is not None else None, scale=scale,
             dropout_p=dropout_p, seed=seed)
    res = math_(c, return_weights=return_weights)
    out, lse = res[0], res[1].detach()
    extra = [lse] if return_lse else []
    if return_weights:
        extra.append(res[2])
    return out if not extra else (out, *extra)
