"""Exact attention weights recomputed from the fast kernel's log-sum-exp, tile by tile over keys.

The tiled kernel never forms the weights, but it returns lse (B, Hq, Nq) = log Σ_j exp(s_ij). Any weight is then
one exp away: w_ij = exp(s_ij − lse_i), with s_ij recomputed from q_i and k_j exactly as the kernels compute it
(scale, bias, score modifier, mask). So any set of rows of any heads can be read back at any sequence length,
holding only one (B, h, r, Tk) tile of scores at a time plus the (B, h, r, Nk) result that was asked for.

Shape legend: B batch, Hq query heads, Hkv key/value heads (G = Hq // Hkv), Nq queries, Nk keys, D head dim,
h selected heads, r selected query rows, Tq/Tk tile sizes.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..validation import validate
from ..kernels.common import as_4d, compute_dtype
from ..kernels.reference import max_bytes

__all__ = ["attention_weights", "ScoreTiles", "as_index"]

DEFAULT_BLOCK_K = 512

Index = Union[None, int, slice, Sequence[int], Tensor]


def as_index(name: str, sel: Index, n: int, device=None) -> Tensor:
    """A head or row selection (None = all, an int, a slice, a list or a 1-D int tensor) -> (m,) int64 indices."""
    if sel is None:
        return torch.arange(n, device=device)
    if isinstance(sel, bool):
        raise TypeError(f"{name}: expected None, an int, a slice or a sequence of ints, got bool")
    if isinstance(sel, int):
        sel = [sel]
    if isinstance(sel, slice):
        return torch.arange(n, device=device)[sel]
    if isinstance(sel, Tensor):
        if sel.dim() != 1 or sel.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name}: expected a 1-D integer tensor, got shape {tuple(sel.shape)}, dtype "
                            f"{sel.dtype}")
        idx = sel.to(device=device, dtype=torch.int64)
    else:
        try:
            items = list(sel)
        except TypeError:
            raise TypeError(f"{name}: expected None, an int, a slice or a sequence of ints, got "
                            f"{type(sel).__name__}") from None
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise TypeError(f"{name}: expected a sequence of ints, got {items!r}")
        idx = torch.tensor(items, dtype=torch.int64, device=device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{name}: indices must lie in [0, {n}), got min {int(idx.min())}, max {int(idx.max())}")
    return idx


class ScoreTiles:
    """Recomputes tiles of scores for selected heads and query rows exactly as the kernels do.

    One tile: s = (q_sel · k_tileᵀ) · scale (+ bias) → score modifier → mask (−inf where not allowed), shape
    (B, h, r, Tk) in the compute dtype (float32 for half inputs, float64 for float64). A score modifier sees a
    tile of every head (its parameters may be per head, an ALiBi slope say), so with a modifier a tile costs
    Hq/h times more than without; the selection is taken after it.
    """

    def __init__(self, q: Tensor, k: Tensor, mask=None, bias=None, scale: Optional[float] = None,
                 heads: Index = None, rows: Index = None):
        mask, bias_t, mod, scale, _ = validate(q, k, k, mask, bias, scale, 0.0)
        self.B, self.Hq, self.Nq, self.D = q.shape
        self.Hkv, self.Nk = k.shape[1], k.shape[2]
        self.G = self.Hq // self.Hkv
        self.cdt = compute_dtype(q.dtype)
        self.mask, self.mod, self.scale = mask, mod, scale
        self.heads = as_index("heads", heads, self.Hq, q.device)  # (h,)
        self.rows = as_index("rows", rows, self.Nq, q.device)  # (r,)
        self.device = q.device
        # with a modifier every head is computed (see the class docstring); otherwise only the selected ones
        self.calc_heads = torch.arange(self.Hq, device=q.device) if mod is not None else self.heads
        self.k = k
        # (B, hc, r, D): the selected query rows of the heads we compute, in the compute dtype. Memory h·r·D.
        self.q_sel = q.index_select(1, self.calc_heads).index_select(2, self.rows).to(self.cdt)
        self.kv_of = torch.div(self.calc_heads, self.G, rounding_mode="floor")  # (hc,) KV head of each q head
        # q heads that share a KV head read the same K tile: group them when every head is computed
        # (decided from the arguments under tracing, where comparing index values would read tensor data: an
        # explicit list of every head then takes the per-head path, the same values by another grouping)
        if torch.compiler.is_compiling():
            self.grouped = heads is None or mod is not None
        else:
            self.grouped = bool(torch.equal(self.calc_heads, torch.arange(self.Hq, device=q.device)))
        self.bias4 = as_4d(bias_t) if bias_t is not None else None
        self.q_idx = self.rows[:, None]  # (r, 1) absolute query positions for masks and modifiers

    def _sel_heads(self, t: Tensor, heads: Tensor) -> Tensor:
        """Select heads of a (Bm, Hm, ..) tensor that broadcasts over heads when Hm == 1."""
        return t if t.shape[1] == 1 else t.index_select(1, heads)

    def tile(self, ks: int, ke: int, apply_mask: bool = True) -> Tensor:
        """Scores of keys [ks, ke) for the selected heads and rows: (B, h, r, Tk), −inf where masked.
        apply_mask=False skips the mask for a tile its block classes call FULL."""
        B, r, Tk = self.B, self.rows.numel(), ke - ks
        kt = self.k[:, :, ks:ke].to(self.cdt)  # (B, Hkv, Tk, D)
        if self.grouped:
            qg = self.q_sel.view(B, self.Hkv, self.G * r, self.D)  # (B, Hkv, G·r, D): K read once per KV head
            s = (qg @ kt.transpose(-1, -2)).view(B, self.Hq, r, Tk) * self.scale  # (B, Hq, r, Tk)
        else:
            kh = kt.index_select(1, self.kv_of)  # (B, h, Tk, D): a copy of one tile of K per selected head
            s = (self.q_sel @ kh.transpose(-1, -2)) * self.scale  # (B, h, r, Tk)
        heads_now = self.calc_heads
        if self.bias4 is not None:
            b = self.bias4
            b = b if b.shape[2] == 1 else b.index_select(2, self.rows)
            b = b if b.shape[3] == 1 else b[..., ks:ke]
            s = s + self._sel_heads(b, heads_now).to(self.cdt)
        k_idx = torch.arange(ks, ke, device=self.device)[None, :]  # (1, Tk)
        if self.mod is not None:
            s = self.mod(s, self.q_idx, k_idx).expand(B, self.Hq, r, Tk)
            s = s.index_select(1, self.heads)  # (B, h, r, Tk)
            heads_now = self.heads
        if self.mask is not None and apply_mask:
            allowed = as_4d(self.mask.mask_mod(self.q_idx, k_idx, self.Nq, self.Nk))  # (Bm, Hm, r, Tk)
            s = s.masked_fill(~self._sel_heads(allowed, heads_now), float("-inf"))
        return s

    def lse_sel(self, lse: Tensor) -> Tensor:
        """lse (B, Hq, Nq) -> (B, h, r, 1) in the compute dtype, with +inf for empty rows so exp(s − lse) = 0."""
        if lse.shape != (self.B, self.Hq, self.Nq):
            raise ValueError(f"lse: expected shape (B, Hq, Nq) = {(self.B, self.Hq, self.Nq)}, got "
                             f"{tuple(lse.shape)}")
        l = lse.index_select(1, self.heads).index_select(2, self.rows).to(self.cdt)
        return torch.where(torch.isneginf(l), torch.full_like(l, float("inf")), l)[..., None]


def attention_weights(q: Tensor, k: Tensor, lse: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
                      heads: Index = None, rows: Index = None, block_k: int = DEFAULT_BLOCK_K) -> Tensor:
    """Exact softmax weights of the selected heads and query rows, recomputed from the kernel's LSE.

    q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D), lse: (B, Hq, Nq) as returned by ``attention(..., return_lse=True)``
    for the same q, k, mask, bias and scale (arguments mean what they mean for ``attention``).
    heads, rows: None (all), an int, a slice, a list or a 1-D int tensor.
    Returns (B, h, r, Nk) in float32 (float64 for float64 inputs); rows with no allowed key are all 0.
    Memory: the result plus one (B, h, r, block_k) tile (Hq instead of h with a score modifier).
    """
    if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 1:
        raise ValueError(f"block_k: expected a positive int, got {block_k!r}")
    st = ScoreTiles(q, k, mask, bias, scale, heads, rows)
    h, r = st.heads.numel(), st.rows.numel()
    need = st.B * h * r * st.Nk * torch.empty((), dtype=st.cdt).element_size()
    if need > max_bytes():
        raise ValueError(f"heads, rows: the weights asked for need {need / 2**30:.1f} GiB for (B, h, r, Nk) = "
                         f"{(st.B, h, r, st.Nk)}, above SELFATTN_REFERENCE_MAX_BYTES={max_bytes()}; ask for "
                         f"fewer heads or rows, or use selfattn.inspect.head_stats for every row")
    l = st.lse_sel(lse)  # (B, h, r, 1)
    out = torch.empty(st.B, h, r, st.Nk, dtype=st.cdt, device=q.device)
    for ks in range(0, st.Nk, block_k):
        ke = min(st.Nk, ks + block_k)
        out[..., ks:ke] = torch.exp(st.tile(ks, ke) - l)  # w = exp(s − lse): masked s = −inf gives 0
    return out
