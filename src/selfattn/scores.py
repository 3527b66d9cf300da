"""Score modifiers: functions of a tile of scores and its indices, never an N×N tensor.

A modifier is called as ``mod(s, q_idx, k_idx)`` with ``s: (B, H, Tq, Tk)`` scores already scaled (fp32 for
half inputs, fp64 for fp64), ``q_idx: (Tq, 1)`` and ``k_idx: (1, Tk)`` int64 absolute positions, and returns the
modified scores, broadcastable to ``s``'s shape. The same call serves the reference kernel (one tile covering
everything) and the tiled kernels (one call per tile). It must be written in differentiable torch ops: the tiled
backward recomputes it per tile under autograd, so the gradient to ``s`` and to the tensors listed by
``parameters()`` (a learned table, say) is exact without any hand-written derivative.

Plain additive tensors are not modifiers: pass them as ``bias=`` (the kernels add them natively and reduce their
gradient over broadcast dimensions).

The modifiers: ``alibi`` (linear distance penalty per head), ``t5_relative`` (T5's learned bucketed bias),
``softcap`` (c·tanh(s/c), Gemma 2 / Grok), composed with ``compose(a, b)`` or ``a >> b`` (a first).

Positions. A modifier sees absolute query and key indices, not Nq and Nk, so it cannot align the two the way
``masks.causal`` does. ``q_offset`` says at which key position query 0 sits: 0 (the default) when queries and keys
are the same sequence; Nk − Nq when the queries are the last Nq positions (decoding with a KV cache). For ALiBi
with a causal mask the offset changes every row by a constant, which softmax ignores; for T5 buckets and the
symmetric ALiBi it matters.

Shape legend: B batch, H query heads, Tq/Tk tile sizes, nd distinct key−query distances in a tile (Tq + Tk − 1).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ScoreMod", "Compose", "compose", "alibi", "alibi_slopes", "ALiBi", "t5_relative",
           "relative_position_bucket", "T5Relative", "softcap", "Softcap"]


class ScoreMod:
    """Base class of score modifiers. Subclasses implement ``__call__`` and, if learned, ``parameters``."""

    def __call__(self, s: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        raise NotImplementedError

    def parameters(self) -> Tuple[Tensor, ...]:
        """Tensors the modifier reads that may require grad (gradients flow to them)."""
        return ()

    def __rshift__(self, other: "ScoreMod") -> "ScoreMod":
        """``a >> b`` applies a, then b."""
        return compose(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Compose(ScoreMod):
    """Apply modifiers in order: ``Compose(a, b)(s) == b(a(s))``."""

    def __init__(self, *mods: ScoreMod):
        flat = []
        for m in mods:
            if not isinstance(m, ScoreMod):
                raise TypeError(f"compose: expected ScoreMod objects, got {type(m).__name__}")
            flat.extend(m.mods if isinstance(m, Compose) else [m])
        self.mods = tuple(flat)

    def __call__(self, s, q_idx, k_idx):
        for m in self.mods:
            s = m(s, q_idx, k_idx)
        return s

    def parameters(self):
        return tuple(p for m in self.mods for p in m.parameters())

    def __repr__(self):
        return " >> ".join(repr(m) for m in self.mods)


def compose(*mods: ScoreMod) -> ScoreMod:
    """Chain modifiers, applied left to right (e.g. ``compose(alibi(), softcap(30.0))``)."""
    return Compose(*mods)


# -- helpers ---------------------------------------------------------------------------------------------------
def _check_int(name: str, x, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r}")
    if x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x}")
    return x


def _check_heads(who: str, have: int, s: Tensor):
    if s.dim() != 4 or s.shape[1] != have:
        raise ValueError(f"{who}: holds values for {have} heads, but the scores have shape {tuple(s.shape)} "
                         f"(B, H, Tq, Tk) with H={s.shape[1] if s.dim() == 4 else '?'}")


def _distance(q_idx: Tensor, k_idx: Tensor, q_offset: int) -> Tensor:
    """Key minus query position, (Tq, Tk) int64: T5's ``memory_position - context_position``."""
    return k_idx - (q_idx + q_offset)


# -- ALiBi -----------------------------------------------------------------------------------------------------
def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi paper's head slopes, (num_heads,) float64: for H a power of 2, the geometric sequence
    2^(-8/H), 2^(-16/H), …, 2^(-8); otherwise the slopes of the closest smaller power of 2, P, followed by every
    other slope of 2P (the rule of the paper's reference code and HF's ``build_alibi_tensor``)."""
    _check_int("num_heads", num_heads, 1)
    p = 2 ** math.floor(math.log2(num_heads))  # closest power of 2 <= H

    def geometric(n: int):
        base = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
        return [base ** i for i in range(1, n + 1)]

    slopes = geometric(p)
    if p != num_heads:
        slopes += geometric(2 * p)[0::2][:num_heads - p]  # odd powers of 2^(-8/2P)
    return torch.tensor(slopes, dtype=torch.float64)


class ALiBi(ScoreMod):
    """s + slope_h · (k_pos − q_pos), or − slope_h · |k_pos − q_pos| when symmetric."""

    def __init__(self, slopes=None, num_heads: Optional[int] = None, symmetric: bool = False,
                 q_offset: int = 0):
        if slopes is not None:
            if isinstance(slopes, (list, tuple)):
                bad = next((x for x in slopes if isinstance(x, bool) or not isinstance(x, (int, float))), None)
                if bad is not None:
                    raise TypeError(f"alibi slopes: expected numbers, got {type(bad).__name__} {bad!r}")
                slopes = torch.tensor(slopes, dtype=torch.float64)
            if not isinstance(slopes, Tensor):
                raise TypeError(f"alibi slopes: expected None, a list of floats or a (H,) float tensor, got "
                                f"{type(slopes).__name__}")
            if not slopes.is_floating_point() or slopes.dim() != 1 or slopes.numel() == 0:
                raise ValueError(f"alibi slopes: expected a non-empty (H,) float tensor, got shape "
                                 f"{tuple(slopes.shape)} dtype {slopes.dtype}")
            if not bool(torch.isfinite(slopes.detach()).all()):
                raise ValueError("alibi slopes: expected finite values")
            if num_heads is not None and _check_int("num_heads", num_heads, 1) != slopes.numel():
                raise ValueError(f"alibi: num_heads={num_heads} but {slopes.numel()} slopes were given")
        elif num_heads is not None:
            slopes = alibi_slopes(num_heads)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")
        self.q_offset = _check_int("q_offset", q_offset, 0)
        self.slopes, self.symmetric = slopes, symmetric
        self._default = {}  # H -> standard slopes, when none were given (the head count comes with the scores)

    def _slopes(self, s: Tensor) -> Tensor:
        if self.slopes is None:
            H = s.shape[1]
            if H not in self._default:
                self._default[H] = alibi_slopes(H)
            return self._default[H].to(device=s.device, dtype=s.dtype)
        _check_heads("alibi", self.slopes.numel(), s)
        return self.slopes.to(device=s.device, dtype=s.dtype)

    def __call__(self, s, q_idx, k_idx):
        m = self._slopes(s)  # (H,)
        d = _distance(q_idx, k_idx, self.q_offset)  # (Tq, Tk)
        d = -d.abs() if self.symmetric else d
        return s + m[:, None, None] * d.to(s.dtype)  # (B, H, Tq, Tk); cost: H·Tq·Tk multiply-adds per tile

    def parameters(self):
        return (self.slopes,) if isinstance(self.slopes, Tensor) and self.slopes.requires_grad else ()

    def __repr__(self):
        what = "standard slopes" if self.slopes is None else f"{self.slopes.numel()} slopes"
        return f"alibi({what}, symmetric={self.symmetric}, q_offset={self.q_offset})"


def alibi(slopes=None, num_heads: Optional[int] = None, symmetric: bool = False, q_offset: int = 0) -> ScoreMod:
    """ALiBi (Press et al. 2022): adds slope_h · (k_pos − q_pos) to the scores of head h.

    With a causal mask this is ≤ 0 and equals HF BLOOM's ``slope_h · k_pos`` (``build_alibi_tensor``) minus the
    per-row constant ``slope_h · q_pos``, so softmax, outputs and gradients are the same. ``symmetric=True`` uses
    −slope_h · |k_pos − q_pos| for bidirectional encoders. slopes: None (the paper's standard slopes for however
    many heads the scores have, or for ``num_heads``), a list, or a (H,) float tensor (may require grad).
    q_offset: key position of query 0 (see the module docstring). When decoding with a cache, pass Nk − Nq even
    though softmax ignores it: otherwise the biases grow to slope·Nk and large scores cost float32 precision."""
    return ALiBi(slopes, num_heads, symmetric, q_offset)


# -- T5 relative position buckets ------------------------------------------------------------------------------
def relative_position_bucket(relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> Tensor:
    """T5's bucketing of ``memory_position − query_position`` (Mesh TensorFlow / HF ``T5Attention.
    _relative_position_bucket``, op for op, float32 logs included, so the buckets agree at every boundary):
    half the buckets are exact small distances, the other half logarithmic up to max_distance; bidirectional
    splits them between keys before and after the query."""
    buckets = torch.zeros_like(relative_position, dtype=torch.long)
    n = relative_position
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (n > 0).to(torch.long) * num_buckets
        n = torch.abs(n)
    else:
        n = -torch.min(n, torch.zeros_like(n))
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log(0) = -inf for n = 0 casts to garbage, but those entries take the is_small branch
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, n, large)


class T5Relative(ScoreMod):
    """s + table[bucket(k_pos − q_pos), h]; the gradient flows to the learned (num_buckets, H) table."""

    def __init__(self, table: Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128,
                 q_offset: int = 0):
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional: expected a bool, got {type(bidirectional).__name__}")
        # max_exact = num_buckets // 2 (// 4 bidirectional) must be >= 1, or the log branch divides by zero
        self.num_buckets = _check_int("num_buckets", num_buckets, 4 if bidirectional else 2)
        max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        self.max_distance = _check_int("max_distance", max_distance, max_exact + 1)
        if not isinstance(table, Tensor):
            raise TypeError(f"table: expected a (num_buckets, H) float tensor, got {type(table).__name__}")
        if not table.is_floating_point() or table.dim() != 2 or table.shape[0] != num_buckets:
            raise ValueError(f"table: expected a (num_buckets={num_buckets}, H) float tensor, got shape "
                             f"{tuple(table.shape)} dtype {table.dtype}")
        self.table, self.bidirectional = table, bidirectional
        self.q_offset = _check_int("q_offset", q_offset, 0)

    def bucket(self, relative_position: Tensor) -> Tensor:
        return relative_position_bucket(relative_position, self.bidirectional, self.num_buckets, self.max_distance)

    def __call__(self, s, q_idx, k_idx):
        _check_heads("t5_relative table", self.table.shape[1], s)
        d = _distance(q_idx, k_idx, self.q_offset)  # (Tq, Tk)
        Tq, Tk = d.shape
        # a tile holds at most Tq + Tk − 1 distinct distances: bucket and look those up, then gather per entry
        # (one log per distance instead of per score; the gather's backward is an index_add into the table)
        dmin = int(d.min()) if d.numel() else 0
        dmax = int(d.max()) if d.numel() else -1
        dist = torch.arange(dmin, dmax + 1, device=d.device)  # (nd,)
        per_dist = self.table.to(device=s.device, dtype=s.dtype).t().index_select(1, self.bucket(dist))  # (H, nd)
        bias = per_dist.index_select(1, (d - dmin).reshape(-1)).view(-1, Tq, Tk)  # (H, Tq, Tk)
        return s + bias

    def parameters(self):
        return (self.table,)

    def __repr__(self):
        return (f"t5_relative(table {tuple(self.table.shape)}, bidirectional={self.bidirectional}, "
                f"num_buckets={self.num_buckets}, max_distance={self.max_distance}, q_offset={self.q_offset})")


def t5_relative(table: Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128,
                q_offset: int = 0) -> ScoreMod:
    """T5's relative position bias: ``table[relative_position_bucket(k_pos − q_pos), h]`` added to head h's
    scores. table: the learned (num_buckets, H) tensor (HF's ``relative_attention_bias.weight``); its gradient
    is exact. T5 encoders use bidirectional=True, decoders False; T5 attends with scale=1."""
    return T5Relative(table, bidirectional, num_buckets, max_distance, q_offset)


# -- softcapping -----------------------------------------------------------------------------------------------
class Softcap(ScoreMod):
    """c · tanh(s / c): scores squashed smoothly into (−c, c)."""

    def __init__(self, cap: float):
        if isinstance(cap, bool) or not isinstance(cap, (int, float)):
            raise TypeError(f"softcap: expected a positive number, got {type(cap).__name__} {cap!r}")
        if not (math.isfinite(cap) and cap > 0):
            raise ValueError(f"softcap: expected a finite number > 0, got {cap}")
        self.cap = float(cap)

    def __call__(self, s, q_idx, k_idx):
        return torch.tanh(s / self.cap) * self.cap  # 2 passes over the tile + tanh

    def __repr__(self):
        return f"softcap({self.cap})"


def softcap(cap: float) -> ScoreMod:
    """Logit softcapping (Gemma 2: 50.0 on attention scores): s ↦ cap · tanh(s / cap), after scaling and bias."""
    return Softcap(cap)
