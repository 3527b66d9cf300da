"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Each rank holds the queries, keys and values of its shard (``layout.py``). The K/V shards travel around the ring
(rank r sends to r+1, receives from r−1) with asynchronous point-to-point ops posted *before* the step's compute,
so the transfer of step s+1's K/V overlaps step s's tiles. At step s rank r holds the K/V of rank (r − s) mod P.

Work items: every (query segment, key segment) pair of a step is one call of the kernel contract
(``functional.prepare`` → the kernel's ``forward`` / ``backward``) with the segments' global ``q_offset`` /
``k_offset``: masks, modifiers and dropout then see the positions the single-process call sees, and a zigzag shard
is just two segments (four sub-calls per step, each skipped on its own). Partial outputs merge by their LSE in
fp32 (fp64 for fp64).

Skipping: the plan (``ring_plan``) asks the mask for the tile counts of every sub-call of every rank and step —
the same arithmetic on every rank, so no rank has to tell another. A sub-call with no computed tile is not run; a
K/V hop that no rank further along the ring needs is neither sent nor waited on (under a causal contiguous layout
the wrapped-around shards never travel).

Backward (FlashAttention-2's split): the kernel's backward with the *merged* out and lse gives each step's exact
partial dQ, dK, dV. dQ stays local; the K/V circulate again and a dK/dV accumulator travels with them: the rank
at hop s adds its part and passes it on; the last rank that needs an owner's K/V sends the sum straight back to
that owner. Score-modifier parameter gradients (ALiBi slopes, T5 tables) are this rank's partial sums, like the
gradients of every other parameter under context parallelism: all-reduce them over the group (``model.py``).

Agreement (``agreement.py``): every check that can differ by rank (arguments, the mask's data against the global
problem, each sub-call's validation) runs before the first transfer; one all_gather then compares the ranks'
shapes, dtype, layout, dropout, kernel, gradient mode and the fingerprints of mask and modifiers, so misuse or a
difference on one rank fails every rank with that rank named, instead of a ring that waits forever.

Kernels: each sub-call runs the native kernel when it can serve the call, else the tiled one. The reference and
decode kernels are refused: their backward differentiates the step's own softmax, not the merged one.

Shape legend: B batch, Hq query heads, Hkv K/V heads, n this rank's length, N = P·n, D, Dv head dims, c segment
length, acc the accumulation dtype (float32, float64 for float64 inputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import masks as _masks
from ..functional import prepare
from ..validation import draw_seed, split_bias
from ..kernels import tiled as _tiled
from .agreement import Fingerprint, agree, as_mask, call_fields, mask_fingerprint, mod_fingerprint
from .layout import LAYOUTS, check_layout, group_rank, group_size, segments

__all__ = ["ring_attention", "ring_plan", "RingPlan", "SubCall", "PLAN_BLOCK"]

# tile size at which the plan counts work (and decides that a sub-call is empty): the tiled kernel's default, so
# the counts are the tiles a step actually computes
PLAN_BLOCK = (_tiled.BLOCK_Q, _tiled.BLOCK_K)
_TAG_KV, _TAG_DKV, _TAG_FINAL = 1 << 12, 2 << 12, 3 << 12  # message kinds: one pair of ranks may carry two at once
# the kernels whose backward takes the merged out and lse (the registry's automatic order picks among them)
_RING_KERNELS = ("native", "tiled")


# ---------------------------------------------------------------------------------------------------------------
# the plan: which sub-calls each rank computes at each step, the same on every rank
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SubCall:
    """One (query segment, key segment) pair of a ring step: local starts, length, global starts, tiles."""
    q_start: int
    q_len: int
    q_offset: int
    k_start: int
    k_len: int
    k_offset: int
    tiles: int


@dataclass(frozen=True)
class RingPlan:
    """work[r][s]: the sub-calls rank r computes at step s (with the K/V of rank (r − s) mod P); an empty tuple is
    a skipped step. last[o]: the last step at which some rank needs rank o's K/V (0: no other rank does), so
    hops 1..last[o] carry them and nothing further."""
    P: int
    layout: str
    n_local: int
    block: Tuple[int, int]
    work: Tuple[Tuple[Tuple[SubCall, ...], ...], ...]
    last: Tuple[int, ...]

    def steps(self, rank: int) -> List[int]:
        """The steps rank computes (0 is its own K/V)."""
        return [s for s, w in enumerate(self.work[rank]) if w]

    @property
    def steps_per_rank(self) -> List[int]:
        return [len(self.steps(r)) for r in range(self.P)]

    @property
    def skipped(self) -> int:
        """Steps skipped over all ranks."""
        return self.P * self.P - sum(self.steps_per_rank)

    @property
    def tiles_per_rank(self) -> List[int]:
        return [sum(c.tiles for w in self.work[r] for c in w) for r in range(self.P)]

    @property
    def balance(self) -> float:
        """Most / least tiles over ranks (1.0: perfectly balanced; inf when a rank computes nothing)."""
        t = self.tiles_per_rank
        return max(t) / min(t) if min(t) else math.inf

    @property
    def hops(self) -> int:
        """K/V transfers per forward (each is n·(D + Dv)·B·Hkv elements)."""
        return sum(self.last)

    def to_string(self) -> str:
        bq, bk = self.block
        lines = [f"ring plan: P={self.P}, layout={self.layout}, n={self.n_local} per rank, tiles {bq}x{bk}; "
                 f"{self.skipped} of {self.P * self.P} steps skipped, {self.hops} of {self.P * (self.P - 1)} "
                 f"K/V hops sent, balance {self.balance:.2f}"]
        for r in range(self.P):
            marks = "".join("#" if w else "." for w in self.work[r])
            lines.append(f"  rank {r}: steps {marks}  {len(self.steps(r))} computed, {self.tiles_per_rank[r]} tiles")
        return "\n".join(lines)

    __str__ = to_string


def _tiles(mask, B, H, nq, nk, q_offset, k_offset, block) -> int:
    bq, bk = block
    if nq == 0 or nk == 0:
        return 0
    if mask is None:
        return -(-nq // bq) * -(-nk // bk)
    return mask.tile_counts(B, H, nq, nk, bq, bk, q_offset, k_offset)[1]


def _plan(mask, B: int, H: int, n_local: int, P: int, layout: str, block=PLAN_BLOCK) -> RingPlan:
    work = []
    for r in range(P):
        qsegs = segments(r, P, n_local, layout)
        row = []
        for s in range(P):
            ksegs = segments((r - s) % P, P, n_local, layout)
            subs = []
            for qs, ql, qg in qsegs:
                for ks, kl, kg in ksegs:
                    t = _tiles(mask, B, H, ql, kl, qg, kg, block)
                    if t:
                        subs.append(SubCall(qs, ql, qg, ks, kl, kg, t))
            row.append(tuple(subs))
        work.append(tuple(row))
    # owner o's K/V are at rank (o + s) mod P at step s
    last = tuple(max([s for s in range(1, P) if work[(o + s) % P][s]], default=0) for o in range(P))
    return RingPlan(P, layout, n_local, tuple(block), tuple(work), last)


# plans by the mask's fingerprint (its lowering: kinds, parameters and a hash of its data, computed for the ranks'
# agreement anyway): a layer builds causal() afresh on every forward, and a plan costs O(P²) mask queries (~50 ms at
# P = 8). A mask without a lowering (a user's subclass) is planned on every call.
_PLAN_CACHE: dict = {}


def _cached_plan(mask, fp: Fingerprint, B: int, H: int, n: int, P: int, layout: str) -> RingPlan:
    if not fp.exact:
        return _plan(mask, B, H, n, P, layout)
    key = (fp.digest, B, H, n, P, layout)
    if key not in _PLAN_CACHE:
        if len(_PLAN_CACHE) > 64:
            _PLAN_CACHE.clear()
        _PLAN_CACHE[key] = _plan(mask, B, H, n, P, layout)
    return _PLAN_CACHE[key]


def ring_plan(mask, B: int, H: int, N: int, P: int, layout: str = "zigzag", block=PLAN_BLOCK) -> RingPlan:
    """How ``ring_attention`` would run a global length-N self-attention over P ranks with this mask: the steps
    and tiles each rank computes, the steps skipped, the K/V hops sent. Pure arithmetic on the mask (no process
    group needed). ``print(ring_plan(masks.causal(), 1, 8, 4096, 4, "contiguous"))`` shows the pattern."""
    check_layout(layout)
    for name, x in (("B", B), ("H", H), ("N", N), ("P", P)):
        if isinstance(x, bool) or not isinstance(x, int) or x < (1 if name in ("H", "P") else 0):
            raise ValueError(f"{name}: expected a {'positive' if name in ('H', 'P') else 'non-negative'} int, "
                             f"got {x!r}")
    parts = 2 * P if layout == "zigzag" else P
    if N % parts:
        raise ValueError(f"N: {N} is not a multiple of {parts} (layout={layout!r}, P={P})")
    return _plan(as_mask(mask), B, H, N // P, P, layout, tuple(block))


# ---------------------------------------------------------------------------------------------------------------
# helpers: communication, packing, merging
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Spec:
    """Everything a ring call needs besides its tensors (saved on the autograd context)."""
    group: object
    ranks: Tuple[int, ...]  # global rank of each group rank (what isend/irecv address)
    rank: int
    P: int
    plan: RingPlan
    mask: Optional[_masks.Mask]
    mod: object
    scale: Optional[float]
    dropout_p: float
    seed: int
    kernel: Optional[str]

    @property
    def next(self) -> int:
        return self.ranks[(self.rank + 1) % self.P]

    @property
    def prev(self) -> int:
        return self.ranks[(self.rank - 1) % self.P]


def _wait(work, spec: _Spec, what: str):
    try:
        work.wait()
    except Exception as e:  # a peer raised, exited or timed out: say which transfer, keep the cause
        raise RuntimeError(f"ring_attention: rank {spec.rank} of {spec.P}: {what} failed (did another rank raise "
                           f"or exit?): {e}") from e


def _wait_sends(sends: list, spec: _Spec) -> None:
    """Wait for (what, work, buffer) sends and drop them (no loop variable left holding a buffer)."""
    while sends:
        what, work, _ = sends.pop()
        _wait(work, spec, what)


def _isend(t: Tensor, dst: int, tag: int, spec: _Spec):
    return dist.isend(t, dst=dst, group=spec.group, tag=tag)


def _irecv(t: Tensor, src: int, tag: int, spec: _Spec):
    return dist.irecv(t, src=src, group=spec.group, tag=tag)


def _pack(k: Tensor, v: Tensor, dtype=None) -> Tensor:
    """k (B, Hkv, n, D), v (B, Hkv, n, Dv) -> one flat contiguous buffer: one message per hop, not two."""
    dtype = dtype or k.dtype
    return torch.cat([k.reshape(-1).to(dtype), v.reshape(-1).to(dtype)])


def _unpack(buf: Tensor, k_shape, v_shape) -> Tuple[Tensor, Tensor]:
    nk = math.prod(k_shape)
    return buf[:nk].view(k_shape), buf[nk:].view(v_shape)  # views, no copy


def _merge(acc_o: Tensor, acc_l: Tensor, o: Tensor, lse: Tensor) -> None:
    """acc_o (B, Hq, c, Dv), acc_l (B, Hq, c) absorb a partial (o, lse) in place: the softmax over the union of
    key sets. A side with lse −inf weighs 0; a row empty on both sides stays (0, −inf), never NaN."""
    lse = lse.to(acc_l.dtype)
    new = torch.logaddexp(acc_l, lse)
    fin = torch.isfinite(new)
    ref = torch.where(fin, new, torch.zeros_like(new))
    wa = torch.where(fin, torch.exp(acc_l - ref), torch.zeros_like(new))  # (B, Hq, c)
    wb = torch.where(fin, torch.exp(lse - ref), torch.zeros_like(new))
    acc_o.mul_(wa[..., None]).add_(o.to(acc_o.dtype) * wb[..., None])
    acc_l.copy_(new)


def _step_call(spec: _Spec, q: Tensor, k: Tensor, v: Tensor, sub: SubCall):
    """The sub-call's frozen description and the kernel module that runs it."""
    qs = q[:, :, sub.q_start:sub.q_start + sub.q_len]  # (B, Hq, c, D)
    ks = k[:, :, sub.k_start:sub.k_start + sub.k_len]  # (B, Hkv, c, D)
    vs = v[:, :, sub.k_start:sub.k_start + sub.k_len]
    call, module, _ = prepare(qs, ks, vs, spec.mask, bias=spec.mod, scale=spec.scale, dropout_p=spec.dropout_p,
                              seed=spec.seed, q_offset=sub.q_offset, k_offset=sub.k_offset, return_lse=True,
                              kernel=spec.kernel, allowed=_RING_KERNELS)
    return call, module


def _post_kv(spec: _Spec, s: int, kv: Optional[Tensor], numel: int, dtype, device) -> Tuple[list, Optional[Tensor]]:
    """Post step s → s+1's K/V transfer: send what this rank holds if a later rank needs it, receive the next
    owner's if this rank or a later one needs it (this rank may hold nothing at step s and still receive: a
    window needs the neighbours on both sides). Returns (requests, receive buffer or None)."""
    P, r, plan = spec.P, spec.rank, spec.plan
    reqs, nxt = [], None
    if s + 1 >= P:
        return reqs, nxt
    if plan.last[(r - s) % P] >= s + 1:
        reqs.append(("send K/V of step %d to rank %d" % (s + 1, (r + 1) % P), _isend(kv, spec.next, _TAG_KV + s, spec)))
    if plan.last[(r - s - 1) % P] >= s + 1:
        nxt = torch.empty(numel, dtype=dtype, device=device)
        reqs.append(("receive K/V of step %d from rank %d" % (s + 1, (r - 1) % P),
                     _irecv(nxt, spec.prev, _TAG_KV + s, spec)))
    return reqs, nxt


# ---------------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------------
def _ring_forward(spec: _Spec, q: Tensor, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
    B, Hq, n, _ = q.shape
    Dv = v.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    acc_o = torch.zeros(B, Hq, n, Dv, dtype=acc, device=q.device)  # (B, Hq, n, Dv)
    acc_l = torch.full((B, Hq, n), -math.inf, dtype=acc, device=q.device)  # (B, Hq, n)
    kv = _pack(k, v)
    for s in range(spec.P):
        reqs, nxt = _post_kv(spec, s, kv, k.numel() + v.numel(), q.dtype, q.device)
        if spec.plan.work[spec.rank][s]:
            ks, vs = _unpack(kv, k.shape, v.shape)
            for sub in spec.plan.work[spec.rank][s]:
                call, module = _step_call(spec, q, ks, vs, sub)
                o, lse = module.forward(call)  # (B, Hq, c, Dv), (B, Hq, c)
                rows = slice(sub.q_start, sub.q_start + sub.q_len)
                _merge(acc_o[:, :, rows], acc_l[:, :, rows], o, lse)
        for what, w in reqs:
            _wait(w, spec, what)
        kv = nxt if s + 1 < spec.P else None
    return acc_o.to(q.dtype), acc_l


# ---------------------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------------------
def _ring_backward(spec: _Spec, q, k, v, out, lse, dout, params: Sequence[Tensor]):
    P, r, plan = spec.P, spec.rank, spec.plan
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)  # (B, Hq, n, D)
    dparams = [torch.zeros(p.shape, dtype=acc, device=p.device) for p in params]
    needs = (True, True, True, False, bool(params))
    kv = _pack(k, v)
    n_dkv = k.numel() + v.numel()
    own = None
    final = None
    if plan.last[r] >= 1:  # the sum over every other rank's part, from the last rank that needed our K/V
        src = (r + plan.last[r]) % P
        fbuf = torch.empty(n_dkv, dtype=acc, device=q.device)
        final = (fbuf, _irecv(fbuf, spec.ranks[src], _TAG_FINAL, spec), src)
    sends = []
    for s in range(P):
        o = (r - s) % P
        reqs, nxt = _post_kv(spec, s, kv, k.numel() + v.numel(), q.dtype, q.device)
        inc = None
        if s >= 2 and plan.last[o] >= s:  # the accumulator of hops 1..s-1, from the previous rank
            ibuf = torch.empty(n_dkv, dtype=acc, device=q.device)
            inc = (ibuf, _irecv(ibuf, spec.prev, _TAG_DKV + s, spec))
        holds = s == 0 or plan.last[o] >= s
        posted = None  # this step's dK/dV send
        dkv = torch.zeros(n_dkv, dtype=acc, device=q.device) if holds else None
        if plan.work[r][s]:
            ks, vs = _unpack(kv, k.shape, v.shape)
            dk, dv = _unpack(dkv, k.shape, v.shape)
            for sub in plan.work[r][s]:
                call, module = _step_call(spec, q, ks, vs, sub)
                rows = slice(sub.q_start, sub.q_start + sub.q_len)
                keys = slice(sub.k_start, sub.k_start + sub.k_len)
                g = module.backward(call, dout[:, :, rows], out[:, :, rows], lse[:, :, rows], needs)
                dq[:, :, rows] += g[0]
                dk[:, :, keys] += g[1]
                dv[:, :, keys] += g[2]
                for acc_p, gp in zip(dparams, g[4] or ()):
                    if gp is not None:
                        acc_p += gp
        if s == 0:
            own = dkv
        elif holds:
            if inc is not None:
                _wait(inc[1], spec, f"receive dK/dV of step {s} from rank {(r - 1) % P}")
                dkv += inc[0]
            if s < plan.last[o]:
                dst, tag, who = spec.next, _TAG_DKV + s + 1, (r + 1) % P
            else:
                dst, tag, who = spec.ranks[o], _TAG_FINAL, o
            posted = (f"send dK/dV of rank {o} to rank {who}", _isend(dkv, dst, tag, spec), dkv)
        for what, w in reqs:
            _wait(w, spec, what)
        # the previous step's dK/dV send completes now (its receiver posted at the start of this step): waiting
        # keeps one accumulator in flight, so a rank holds O(n) memory, not P−1 accumulators of n
        _wait_sends(sends, spec)
        sends = [posted] if posted is not None else []
        kv = nxt if s + 1 < P else None
    if final is not None:
        _wait(final[1], spec, f"receive the summed dK/dV from rank {final[2]}")
        own += final[0]
    _wait_sends(sends, spec)
    dk, dv = _unpack(own, k.shape, v.shape)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), [d.to(p.dtype) for d, p in zip(dparams, params)]


class _RingFunction(torch.autograd.Function):
    """Saves q, k, v (this rank's shard), the merged out and lse; the backward circulates K/V once more."""

    @staticmethod
    def forward(ctx, spec, q, k, v, *params):
        out, lse = _ring_forward(spec, q, k, v)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, out, lse, *params)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *params = ctx.saved_tensors
        with torch.no_grad():
            dq, dk, dv, dparams = _ring_backward(ctx.spec, q, k, v, out, lse, dout, params)
        return (None, dq, dk, dv, *dparams)


# ---------------------------------------------------------------------------------------------------------------
# the function callers use
# ---------------------------------------------------------------------------------------------------------------
def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}"


def _group_ranks(group, P: int) -> Tuple[int, ...]:
    if group is None or group is dist.group.WORLD:
        return tuple(range(P))
    return tuple(dist.get_global_rank(group, i) for i in range(P))


def ring_attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
                   dropout_p: float = 0.0, generator: Optional[torch.Generator] = None, group=None,
                   layout: str = "zigzag", return_lse: bool = False, kernel: Optional[str] = None):
    """Exact self-attention of a sequence sharded over ``group``: equal to ``selfattn.attention`` on the full
    sequence, restricted to this rank's rows.

    q: (B, Hq, n, D), k: (B, Hkv, n, D), v: (B, Hkv, n, Dv): this rank's shard in ``layout`` (``shard``), the same
    shape on every rank; global length N = P·n. mask: a ``selfattn.masks`` object (or bool tensor) of the *full*
    problem (N × N): its data (lengths, document ids) index global positions. bias: None or score modifiers
    (``selfattn.scores``: alibi, t5_relative, softcap); a dense bias tensor is refused. dropout_p / generator: as
    ``attention``; rank 0's seed is used on every rank, so the pattern is the single-process one for the same
    generator. kernel: None (native where it serves a step, else tiled), "native" or "tiled".
    Returns out (B, Hq, n, Dv) [, lse (B, Hq, n), float32 (float64 for float64)]."""
    P, rank = group_size(group), group_rank(group)
    spec, error, mask_obj, mod, params, seed = None, None, None, None, (), 0
    mask_fp = mask_fingerprint(None, 0)  # replaced once the mask is read; a rank that fails before says why
    try:  # every check that can differ by rank, before any transfer; the outcome is agreed on below
        check_layout(layout)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, Tensor) or t.dim() != 4:
                raise ValueError(f"{name}: expected a 4-dim tensor (B, H, n, D), got "
                                 f"{_describe(t) if isinstance(t, Tensor) else type(t).__name__}")
        if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
            raise ValueError(f"k, v: ring attention is self-attention over one sharded sequence, so q, k and v "
                             f"shards must have the same length; got q {_describe(q)}, k {_describe(k)}, "
                             f"v {_describe(v)}")
        if isinstance(bias, Tensor) or (isinstance(bias, (list, tuple)) and any(isinstance(b, Tensor) for b in bias)):
            raise ValueError("bias: ring_attention takes score modifiers (selfattn.scores.alibi, t5_relative, "
                             "softcap), not a dense bias tensor: an (N, N) tensor cannot be sharded across the ring; "
                             "express it as a modifier or use selfattn.attention")
        if kernel is not None and kernel not in _RING_KERNELS:
            raise ValueError(f"kernel: expected None, 'native' or 'tiled' for ring_attention, got {kernel!r} (the "
                             f"reference and decode backwards differentiate a step's own softmax, not the merged "
                             f"one)")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
        B, Hq, n, D = q.shape
        mask_obj = as_mask(mask)
        _, mod = split_bias(bias)
        if mod is not None:
            mod = mod.bind(Hq)
            params = tuple(mod.parameters())
        seed = draw_seed(dropout_p, generator)
        if mask_obj is not None:  # the mask's data (lengths, ids) must cover the whole global problem
            mask_obj.check_shape(B, Hq, P * n, P * n)
            mask_obj.check_device(q.device)
            mask_obj.check_data(B, Hq, P * n, P * n)
        mask_fp = mask_fingerprint(mask_obj, P * n)
        plan = _cached_plan(mask_obj, mask_fp, B, Hq, n, P, layout)
        spec = _Spec(group, _group_ranks(group, P), rank, P, plan, mask_obj, mod, scale, float(dropout_p), seed,
                     kernel)
        for w in plan.work[rank]:  # the sub-calls' validation (dtypes, mask data, modifier heads), no compute
            for sub in w:
                _step_call(spec, q, k, v, sub)
    except Exception as e:  # raised after the exchange below, so that the other ranks hear of it
        error = e
    tensors = [t for t in (q, k, v, *params) if isinstance(t, Tensor)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fields = call_fields(q, k, v, layout=layout, layouts=LAYOUTS, dropout_p=dropout_p, scale=scale, kernel=kernel,
                         grad=grad, return_lse=return_lse)
    seed = agree(group, "ring_attention", rank, P, fields, mask_fp, mod_fingerprint(mod),
                 error, seed, q.device if isinstance(q, Tensor) else None)
    spec.seed = seed
    if grad:
        out, lse = _RingFunction.apply(spec, q, k, v, *params)
    else:
        out, lse = _ring_forward(spec, q, k, v)
    return (out, lse) if return_lse else out
