"""The decode kernel: a few query rows per KV head against a long key/value cache (a generation step).

Why a kernel of its own: with G·Nq = 4 rows per KV head, each of the tiled kernel's Nk/block_k tiles is two skinny
GEMMs plus ~10 small elementwise ops whose launch and thread-barrier costs exceed their math (measured 2-3x
slower at 32k keys). Here: one K·qᵀ GEMM over the whole cache into (B·Hkv, Nk, G·Nq) scores -- G·Nq·Nk floats per
KV head, linear in the cache (512 KiB per head at 32k keys, G·Nq = 4) --, one softmax, one pᵀ·V GEMM: K and V are
each read once and nothing else touches them. No mask (or one that allows every entry), no bias, no dropout;
float32/float64 (the cache is not upcast). Its backward recomputes the same math under autograd (memory stays
linear in the cache).

Shape legend: B batch, Hq/Hkv heads (G = Hq // Hkv), Nq new queries, Nk cached keys, D/Dv head dims,
BH = B·Hkv, R = G·Nq query rows per KV head.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .lowering import DECODE_MAX_ROWS  # the scores stay (BH, Nk, R = G·Nq), linear in Nk

DECODE_DTYPES = (torch.float32, torch.float64)


def attention_decode(q: Tensor, k: Tensor, v: Tensor, scale: float, return_lse: bool = False):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv) -> out (B, Hq, Nq, Dv) [, lse (B, Hq, Nq)]."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    R = (Hq // Hkv) * Nq
    k3 = k.reshape(B * Hkv, Nk, D)  # (BH, Nk, D): a view for cache slices (B and Hkv merge)
    v3 = v.reshape(B * Hkv, Nk, Dv)  # (BH, Nk, Dv)
    qt = (q.reshape(B * Hkv, R, D) * scale).transpose(1, 2)  # (BH, D, R): scale folded into R·D numbers
    s = torch.bmm(k3, qt)  # (BH, Nk, R)
    m = s.amax(1, keepdim=True).detach()  # (BH, 1, R)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    p = torch.exp(s - m) if grad else s.sub_(m).exp_()  # in place when no graph needs s
    l = p.sum(1)  # (BH, R)
    out = (torch.bmm(p.transpose(1, 2), v3) / l.unsqueeze(-1)).view(B, Hq, Nq, Dv)  # (B, Hq, Nq, Dv)
    if not return_lse:
        return out
    lse = (m.squeeze(1) + torch.log(l)).detach().view(B, Hq, Nq)  # (B, Hq, Nq)
    return out, lse


NAME = "decode"
COMPILED = False  # torch ops: traced as they are
DEVICES = None  # torch ops: any device
DTYPES = DECODE_DTYPES
MAX_HEAD_DIM = None
FUNCTORCH = True  # torch ops only: runs under torch.func.grad / vjp
DIFFERENTIABLE_BACKWARD = True  # the backward recomputes under autograd
PRIORITY = 20


def automatic(call):
    return True, (f"{call.G * call.Nq} query rows per KV head ≤ {DECODE_MAX_ROWS}, no mask, bias or dropout: one "
                  f"pass over K and V (a generation step)")


def tiles(call):
    """One tile: all G·Nq rows of a KV head against the whole cache."""
    return max(call.Nq, 1), max(call.Nk, 1)


def why_not(call) -> Optional[str]:
    rows = call.G * call.Nq
    if rows > DECODE_MAX_ROWS:
        return f"(Hq/Hkv)·Nq = {rows} query rows per KV head > {DECODE_MAX_ROWS}"
    if call.B == 0 or call.Nk == 0 or call.Nq == 0:
        return "an empty batch, no queries or no keys"
    if call.has_bias:
        return "a bias or score modifier"
    if call.dropout_p > 0.0:
        return "dropout"
    if not call.allows_everything():
        return "a mask that forbids some entries"
    return None


def forward(call):
    with torch.no_grad():
        return attention_decode(call.q, call.k, call.v, call.scale, return_lse=True)


def backward(call, grad_out: Tensor, out: Tensor, lse: Tensor, needs):
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        q, k, v = ((t if create else t.detach().requires_grad_(n)) for t, n in zip((call.q, call.k, call.v), needs))
        o = attention_decode(q, k, v, call.scale)
        wrt = [t for t, n in zip((q, k, v), needs[:3]) if n]
        grads = iter(torch.autograd.grad(o, wrt, grad_out, create_graph=create) if wrt else ())
    return (*(next(grads) if n else None for n in needs[:3]), None, ())
