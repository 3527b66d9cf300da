"""Score modifiers: functions of a tile of scores and its indices, never an N×N tensor.

Kernels call ``mod.apply(s, q_pos, k_pos, h_idx)`` with ``s: (Bi, Hi, Tq, Tk)`` scores already scaled (fp32 for
half inputs, fp64 for fp64), ``q_pos: (Tq, 1)`` and ``k_pos: (1, Tk)`` int64 global positions, and ``h_idx: (Hi,)``
the query heads the tile covers (None: all of them, Hi == Hq), and get the modified scores, broadcastable to
``s``'s shape (FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``, on tiles). Built-in modifiers are
``per_head``: a kernel may call them on one head's tile, so no modifier forces whole-batch work items. A custom
modifier that only defines ``__call__(s, q_idx, k_idx)`` keeps working: it is called on tiles of every head. The same call serves the reference kernel (one tile covering
everything) and the tiled kernels (one call per tile). It must be written in differentiable torch ops: the tiled
backward recomputes it per tile under autograd, so the gradient to ``s`` and to the tensors listed by
``parameters()`` (a learned table, say) is exact without any hand-written derivative.

Plain additive tensors are not modifiers: pass them as ``bias=`` (the kernels add them natively and reduce their
gradient over broadcast dimensions).

The modifiers: ``alibi`` (linear distance penalty per head), ``t5_relative`` (T5's learned bucketed bias),
``softcap`` (c·tanh(s/c), Gemma 2 / Grok), composed with ``compose(a, b)`` or ``a >> b`` (a first).

Positions. Key j sits at ``k_offset + j``; query i at ``q_offset + i`` when the call gives ``q_offset`` (then a
modifier's own ``q_offset`` must be 0), else at ``k_offset + mod.q_offset + i``. A modifier's ``q_offset`` thus
says at which key position query 0 sits when the call does not: 0 (the default) when queries and keys are the
same sequence; Nk − Nq when the queries are the last Nq positions (decoding with a KV cache); bottom-right
alignment with Nq > Nk is ``attention(..., q_offset=Nk - Nq)`` (negative). For ALiBi
with a causal mask the offset changes every row by a constant, which softmax ignores; for T5 buckets and the
symmetric ALiBi it matters.

Shape legend: B batch, H query heads, Tq/Tk tile sizes, nd distinct key−query distances in a tile (Tq + Tk − 1).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["ScoreMod", "LoweredMod", "Compose", "compose", "alibi", "alibi_slopes", "ALiBi", "t5_relative",
           "relative_position_bucket", "T5Relative", "softcap", "Softcap"]


class ScoreMod:
    """Base class of score modifiers. Subclasses implement ``apply`` (``per_head = True``) or just ``__call__``
    (called on tiles of every head), and, if learned, ``parameters``."""
    per_head = False  # True: apply() honours h_idx, so kernels may hand it one head's tile
    q_offset = 0

    def __call__(self, s: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        if type(self).apply is ScoreMod.apply:
            raise NotImplementedError(f"{type(self).__name__}: implement apply(s, q_pos, k_pos, h_idx) or "
                                      f"__call__(s, q_idx, k_idx)")
        return self.apply(s, q_idx, k_idx, None)

    def apply(self, s: Tensor, q_pos: Tensor, k_pos: Tensor, h_idx: Optional[Tensor]) -> Tensor:
        """s (Bi, Hi, Tq, Tk) modified for query heads h_idx (None: all). The default calls ``self(s, ...)``,
        which sees every head: kernels pass h_idx=None to modifiers that are not ``per_head``."""
        if h_idx is not None:
            raise ValueError(f"{type(self).__name__} is not per_head: it must be called on tiles of every head")
        return self(s, q_pos, k_pos)

    def bind(self, num_heads: int) -> "ScoreMod":
        """The modifier for a call with this many query heads (standard ALiBi slopes resolve here)."""
        return self

    def check_call(self, num_heads: int, call_q_offset: Optional[int]) -> None:
        """Raise ValueError if the modifier cannot serve a call with this many query heads and q_offset."""
        if call_q_offset is not None and self.q_offset != 0:
            raise ValueError(f"q_offset: given to attention() ({call_q_offset}) and to the modifier {self!r}; the "
                             f"call's global positions replace the modifier's q_offset, pass it in one place")

    def lower(self) -> Optional[tuple]:
        """The modifier as a tuple of ``LoweredMod`` ops a compiled kernel applies in order, or None when it has
        no lowering (a custom Python modifier)."""
        return None

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

    @property
    def per_head(self):
        return all(m.per_head for m in self.mods)

    def __call__(self, s, q_idx, k_idx):
        return self.apply(s, q_idx, k_idx, None)

    def apply(self, s, q_pos, k_pos, h_idx):
        for m in self.mods:
            s = m.apply(s, q_pos, k_pos, h_idx)
        return s

    def check_call(self, num_heads, call_q_offset):
        for m in self.mods:
            m.check_call(num_heads, call_q_offset)

    def bind(self, num_heads):
        bound = [m.bind(num_heads) for m in self.mods]
        return self if all(a is b for a, b in zip(bound, self.mods)) else Compose(*bound)

    def lower(self):
        ops = [m.lower() for m in self.mods]
        return None if any(o is None for o in ops) else tuple(x for o in ops for x in o)

    def parameters(self):
        return tuple(p for m in self.mods for p in m.parameters())

    def __repr__(self):
        return " >> ".join(repr(m) for m in self.mods)


def compose(*mods: ScoreMod) -> ScoreMod:
    """Chain modifiers, applied left to right (e.g. ``compose(alibi(), softcap(30.0))``)."""
    return Compose(*mods)


# -- helpers ---------------------------------------------------------------------------------------------------
def _host_readable(x: Tensor) -> bool:
    """Values of x may be read now: a CPU tensor outside tracing (as ``masks._host_readable``)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


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


class LoweredMod:
    """One lowered modifier op: ``kind`` "alibi" (slopes (H,) float64, symmetric, q_offset), "t5" (table
    (num_buckets, H), bidirectional, num_buckets, max_distance, q_offset) or "softcap" (cap). Distances are
    d = kp − (qp + q_offset) with the call's global positions."""

    def __init__(self, kind: str, **fields):
        self.kind = kind
        self.__dict__.update(fields)

    def __repr__(self):
        return f"LoweredMod({self.kind})"


def _heads(values: Tensor, h_idx: Optional[Tensor], dim: int) -> Tensor:
    return values if h_idx is None else values.index_select(dim, h_idx.to(values.device))


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
            # a value check reads the slopes: done when they are on the host and nothing is being traced (in
            # eager code, and inside the kernel op, which rebuilds its modifiers), never on a traced call path
            if _host_readable(slopes) and not bool(torch.isfinite(slopes.detach()).all()):
                raise ValueError("alibi slopes: expected finite values")
            if num_heads is not None and _check_int("num_heads", num_heads, 1) != slopes.numel():
                raise ValueError(f"alibi: num_heads={num_heads} but {slopes.numel()} slopes were given")
        elif num_heads is not None:
            slopes = alibi_slopes(num_heads)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")
        self.q_offset = _check_int("q_offset", q_offset, 0)
        self.slopes, self.symmetric = slopes, symmetric
        self.per_head = True
        self._default = {}  # H -> standard slopes, when none were given (the head count comes with the scores)
        self._bound = {}  # H -> the bound modifier: one per head count, not a new tensor per call

    def _slopes(self, s: Tensor, h_idx: Optional[Tensor]) -> Tensor:
        if self.slopes is None:  # unbound standard slopes: the head count comes with the scores (all heads)
            if h_idx is not None:
                raise ValueError("alibi: standard slopes on one head's tile need bind(num_heads) first")
            H = s.shape[1]
            if H not in self._default:
                self._default[H] = alibi_slopes(H)
            return self._default[H].to(device=s.device, dtype=s.dtype)
        if h_idx is None:
            _check_heads("alibi", self.slopes.numel(), s)
        return _heads(self.slopes, h_idx, 0).to(device=s.device, dtype=s.dtype)

    def bind(self, num_heads: int) -> "ALiBi":
        if self.slopes is not None:
            return self
        if num_heads not in self._bound:
            b = ALiBi(alibi_slopes(num_heads), None, self.symmetric, self.q_offset)
            b._standard = True
            self._bound[num_heads] = b
        return self._bound[num_heads]

    def check_call(self, num_heads, call_q_offset):
        super().check_call(num_heads, call_q_offset)
        if self.slopes is not None and self.slopes.numel() != num_heads:
            raise ValueError(f"alibi: holds {self.slopes.numel()} slopes, but the call has Hq={num_heads} query "
                             f"heads")

    def apply(self, s, q_pos, k_pos, h_idx):
        m = self._slopes(s, h_idx)  # (Hi,)
        d = _distance(q_pos, k_pos, self.q_offset)  # (Tq, Tk)
        d = -d.abs() if self.symmetric else d
        return s + m[:, None, None] * d.to(s.dtype)  # (B, Hi, Tq, Tk); cost: Hi·Tq·Tk multiply-adds per tile

    def lower(self):
        if self.slopes is None:
            return None  # bind(num_heads) first
        return (LoweredMod("alibi", slopes=self.slopes, symmetric=self.symmetric, q_offset=self.q_offset),)

    def parameters(self):
        return (self.slopes,) if isinstance(self.slopes, Tensor) and self.slopes.requires_grad else ()

    def __repr__(self):
        what = "standard slopes" if self.slopes is None or getattr(self, "_standard", False) \
            else f"{self.slopes.numel()} slopes"
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

    per_head = True

    def check_call(self, num_heads, call_q_offset):
        super().check_call(num_heads, call_q_offset)
        if self.table.shape[1] != num_heads:
            raise ValueError(f"t5_relative table: holds values for {self.table.shape[1]} heads, but the call has "
                             f"Hq={num_heads} query heads")

    def apply(self, s, q_pos, k_pos, h_idx):
        if h_idx is None:
            _check_heads("t5_relative table", self.table.shape[1], s)
        d = _distance(q_pos, k_pos, self.q_offset)  # (Tq, Tk)
        Tq, Tk = d.shape
        if d.numel() == 0:  # no queries or no keys: nothing to add (a view keeps the table in the graph-free path)
            return s
        # a tile holds at most Tq + Tk − 1 distinct distances: bucket and look those up, then gather per entry
        # (one log per distance instead of per score; the gather's backward is an index_add into the table)
        dmin = int(d.min()) if d.numel() else 0
        dmax = int(d.max()) if d.numel() else -1
        dist = torch.arange(dmin, dmax + 1, device=d.device)  # (nd,)
        table = _heads(self.table.to(device=s.device, dtype=s.dtype), h_idx, 1)  # (num_buckets, Hi)
        per_dist = table.t().index_select(1, self.bucket(dist))  # (Hi, nd)
        bias = per_dist.index_select(1, (d - dmin).reshape(-1)).view(-1, Tq, Tk)  # (Hi, Tq, Tk)
        return s + bias

    def lower(self):
        return (LoweredMod("t5", table=self.table, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                           max_distance=self.max_distance, q_offset=self.q_offset),)

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

    per_head = True

    def apply(self, s, q_pos, k_pos, h_idx):
        return torch.tanh(s / self.cap) * self.cap  # 2 passes over the tile + tanh

    def lower(self):
        return (LoweredMod("softcap", cap=self.cap),)

    def __repr__(self):
        return f"softcap({self.cap})"


def softcap(cap: float) -> ScoreMod:
    """Logit softcapping (Gemma 2: 50.0 on attention scores): s ↦ cap · tanh(s / cap), after scaling and bias."""
    return Softcap(cap)
