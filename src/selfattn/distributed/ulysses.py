"""Ulysses (DeepSpeed-Ulysses) context parallelism: all-to-all from sequence shards to head shards, one local
``selfattn.attention`` over the *full* sequence for H/P heads, and all-to-all back.

Cost: 4 all-to-alls of the activations per layer forward (q, k, v, out; each moves (P−1)/P of a shard), no ring
steps, and every mask, modifier and kernel works unchanged on the full sequence. It cannot run when the heads do
not divide by P (K/V heads too, under GQA): then the ring is the answer. The gathered sequence is put back in
global order (the layout's segments), so masks see positions 0..N−1 exactly as the single-process call does.

Before the first all-to-all every rank validates its call and the ranks agree (``agreement.py``) on shapes,
dtype, layout, dropout, kernel and the fingerprints of mask and modifiers: a rank with another mask would otherwise
attend its heads under it and return a silently mixed result.

Head-dependent extras need the global head index: ALiBi slopes and T5 tables are sliced to this rank's heads;
dropout draws the single-process pattern for the same generator: the rank's first global head is folded into the
seed of the dropout hash.

Shape legend: B batch, Hq/Hkv heads, P ranks, n local length, N = P·n, D/Dv head dims, h = H/P heads per rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import scores as _scores
from ..kernels.lowering import head_seed
from ..functional import plan, prepare, run
from ..validation import draw_seed, split_bias
from .agreement import agree, as_mask, call_fields, mask_fingerprint, mod_fingerprint
from .layout import LAYOUTS, check_layout, group_rank, group_size, segments

__all__ = ["ulysses_attention"]


class _AllToAll(torch.autograd.Function):
    """x (P, ...) contiguous: block j goes to rank j; block i of the result came from rank i. Its own inverse,
    so the backward is the same exchange of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        dx = torch.empty_like(dy)
        dist.all_to_all_single(dx, dy, group=ctx.group)
        return dx, None


def _global_order(P: int, n: int, layout: str, device) -> Tensor:
    """(N,) index: position g of the full sequence is row order[g] of the rank-major gathered rows (rank j's
    local row l at j·n + l)."""
    order = torch.empty(P * n, dtype=torch.int64, device=device)
    for j in range(P):
        for ls, ln, g in segments(j, P, n, layout):
            order[g:g + ln] = torch.arange(j * n + ls, j * n + ls + ln, device=device)
    return order


def _seq_to_heads(x: Tensor, P: int, group, order: Tensor) -> Tensor:
    """(B, H, n, D) sequence shard -> (B, H/P, N, D) head shard in global order."""
    B, H, n, D = x.shape
    x = x.reshape(B, P, H // P, n, D).transpose(0, 1)  # (P, B, h, n, D): block j for rank j
    y = _AllToAll.apply(x, group)  # (P, B, h, n, D): block j from rank j
    y = y.permute(1, 2, 0, 3, 4).reshape(B, H // P, P * n, D)  # (B, h, P·n, D) rank-major rows
    return y.index_select(2, order)  # (B, h, N, D) global order


def _heads_to_seq(y: Tensor, P: int, group, rank_major: Tensor) -> Tensor:
    """(B, h, N, D) head shard in global order -> (B, h·P, n, D) sequence shard."""
    B, h, N, D = y.shape
    n = N // P
    y = y.index_select(2, rank_major)  # (B, h, N, D) rank-major rows
    y = y.reshape(B, h, P, n, D).permute(2, 0, 1, 3, 4)  # (P, B, h, n, D): block j for rank j
    x = _AllToAll.apply(y, group)  # (P, B, h, n, D): block j = head group j of our shard
    return x.transpose(0, 1).reshape(B, P * h, n, D)  # (B, H, n, D)


def _slice_heads(mod, h0: int, h1: int):
    """The modifier restricted to query heads h0:h1 (it then sees local head indices 0..h1-h0-1)."""
    if mod is None:
        return None
    if isinstance(mod, _scores.Compose):
        return _scores.compose(*(_slice_heads(m, h0, h1) for m in mod.mods))
    if isinstance(mod, _scores.ALiBi):
        return _scores.ALiBi(mod.slopes[h0:h1], None, mod.symmetric, mod.q_offset)
    if isinstance(mod, _scores.T5Relative):
        return _scores.T5Relative(mod.table[:, h0:h1], mod.bidirectional, mod.num_buckets, mod.max_distance,
                                  mod.q_offset)
    if isinstance(mod, _scores.Softcap):
        return mod
    raise ValueError(f"bias: ulysses_attention cannot split {mod!r} by heads (it knows ALiBi, T5 relative and "
                     f"softcap); use ring_attention")


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
                      dropout_p: float = 0.0, generator: Optional[torch.Generator] = None, group=None,
                      layout: str = "zigzag", return_lse: bool = False, kernel: Optional[str] = None):
    """Like ``ring_attention`` (same shards, same result), by all-to-all: q (B, Hq, n, D), k (B, Hkv, n, D),
    v (B, Hkv, n, Dv) with Hq and Hkv divisible by P. mask: of the full problem. bias: score modifiers only.
    kernel: passed to the local ``selfattn.attention``. Returns out (B, Hq, n, Dv) [, lse (B, Hq, n)]."""
    P, rank = group_size(group), group_rank(group)
    error, mask_obj, mod, params, seed = None, None, None, (), 0
    try:  # every check that can differ by rank, before the first all-to-all; the outcome is agreed on below
        check_layout(layout)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: expected a 4-dim tensor (B, H, n, D), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        B, Hq, n, D = q.shape
        Hkv = k.shape[1]
        if Hq % P or Hkv % P:
            raise ValueError(f"ulysses_attention: query heads Hq={Hq} and key/value heads Hkv={Hkv} must both be "
                             f"divisible by the group size P={P} (each rank attends over H/P heads); use "
                             f"ring_attention, which has no such limit")
        if k.shape[2] != n or v.shape[2] != n:
            raise ValueError(f"k, v: expected shards of q's length {n}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
        bias_t, mod = split_bias(bias)
        if bias_t is not None:
            raise ValueError("bias: ulysses_attention takes score modifiers, not a dense bias tensor")
        mask_obj = as_mask(mask)
        seed = draw_seed(dropout_p, generator)
        h, N = Hq // P, P * n
        if mod is not None:
            mod = mod.bind(Hq)
            params = tuple(mod.parameters())
        local_mod = _slice_heads(mod, rank * h, (rank + 1) * h)
        if local_mod is not None:
            local_mod.check_call(h, None)
        if mask_obj is not None:  # the mask's data must cover the whole global problem
            mask_obj.check_shape(B, Hq, N, N)
            mask_obj.check_device(q.device)
            mask_obj.check_data(B, Hq, N, N)
        if kernel is not None:  # the named kernel must serve this rank's local call (shapes only, no data)
            plan(B, h, N, N, D, v.shape[3], Hkv // P, mask=mask_obj, kernel=kernel, dtype=q.dtype,
                 dropout_p=dropout_p, device=q.device)
    except Exception as e:  # raised after the exchange below, so that the other ranks hear of it
        error = e
    tensors = [t for t in (q, k, v, *params) if isinstance(t, Tensor)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fields = call_fields(q, k, v, layout=layout, layouts=LAYOUTS, dropout_p=dropout_p, scale=scale, kernel=kernel,
                         grad=grad, return_lse=return_lse)
    Nf = P * q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else 0
    # every rank must send and receive the same block sizes and attend to the same problem: rank 0's seed
    seed = agree(group, "ulysses_attention", rank, P, fields, mask_fingerprint(mask_obj, Nf), mod_fingerprint(mod),
                 error, seed, q.device if isinstance(q, Tensor) else None)
    mod = local_mod
    order = _global_order(P, n, layout, q.device)
    rank_major = torch.argsort(order)
    qf = _seq_to_heads(q, P, group, order)  # (B, Hq/P, N, D)
    kf = _seq_to_heads(k, P, group, order)  # (B, Hkv/P, N, D)
    vf = _seq_to_heads(v, P, group, order)
    # this rank's heads start at global head rank·h: the folded seed draws the single-process pattern for them
    local_seed = head_seed(seed, rank * h)
    call, module, _ = prepare(qf, kf, vf, mask_obj, bias=mod, scale=scale, dropout_p=dropout_p, seed=local_seed,
                              return_lse=True, kernel=kernel)
    out, lse = run(module, call)
    out = _heads_to_seq(out, P, group, rank_major)  # (B, Hq, n, Dv)
    if not return_lse:
        return out
    lse = _heads_to_seq(lse.detach()[..., None], P, group, rank_major)[..., 0]  # (B, Hq, n)
    return out, lse
