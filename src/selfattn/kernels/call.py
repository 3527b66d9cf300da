"""The call description: what ``selfattn.attention`` hands to a kernel, validated once and frozen.

Every kernel declares what it serves and answers ``why_not(call) -> reason | None``, ``forward(call) -> (out,
lse)`` and ``backward(call, grad_out, out, lse, needs) -> (dq, dk, dv, dbias, dparams)`` (the ``Kernel``
protocol in kernels/registry.py, which also chooses). One ``torch.autograd.Function`` in functional.py wraps
whichever kernel runs eagerly; it saves only q, k, v, out and lse (the dropout seed lives on the call); traced,
the compiled kernels run behind the ``torch.ops.selfattn`` ops of kernels/op.py. Kernels read the call, never the
user's arguments; ``why_not`` reads shapes and lowerings only, never tensor data.

Positions (the one convention): key j of the call sits at global position ``k_offset + j``; query i at
``q_offset + i`` when q_offset is given. Without it, masks place queries by their alignment
(``masks.query_start``) and modifiers and dropout at ``k_offset + i`` (modifiers add their own ``q_offset``).
So a slice of a longer call, a KV cache step and a ring step use the same mask and modifier objects and get
exactly the rows of the full call.

Shape legend: B batch, Hq query heads, Hkv KV heads, G = Hq // Hkv, Nq queries, Nk keys, D, Dv head dims.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import masks as _masks

__all__ = ["Call"]


@dataclass(frozen=True, eq=False)
class Call:
    q: Tensor  # (B, Hq, Nq, D)
    k: Tensor  # (B, Hkv, Nk, D)
    v: Tensor  # (B, Hkv, Nk, Dv)
    mask: Optional[_masks.Mask] = None
    bias: Optional[Tensor] = None  # 4-D, broadcastable to (B, Hq, Nq, Nk)
    bias_shape: Optional[Tuple[int, ...]] = None  # the caller's shape (the gradient is returned in it)
    score_mod: Optional[object] = None  # a selfattn.scores.ScoreMod, bound to Hq
    scale: float = 1.0
    dropout_p: float = 0.0
    seed: object = 0  # an int, or the 0-d int64 tensor attention() draws (the op takes it untouched; int(seed))
    q_offset: Optional[int] = None
    k_offset: int = 0
    return_lse: bool = False
    block_q: Optional[int] = None
    block_k: Optional[int] = None
    shape_only: bool = False  # plan(): the tensors stand for shapes (one stored element): kernels skip data checks
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    # -- shape -------------------------------------------------------------------------------------------
    @property
    def B(self) -> int:
        return self.q.shape[0]

    @property
    def Hq(self) -> int:
        return self.q.shape[1]

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]

    @property
    def G(self) -> int:
        return self.Hq // self.Hkv

    @property
    def Nq(self) -> int:
        return self.q.shape[2]

    @property
    def Nk(self) -> int:
        return self.k.shape[2]

    @property
    def D(self) -> int:
        return self.q.shape[3]

    @property
    def Dv(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def has_bias(self) -> bool:
        return self.bias is not None or self.score_mod is not None

    @property
    def mod_params(self) -> Tuple[Tensor, ...]:
        return tuple(self.score_mod.parameters()) if self.score_mod is not None else ()

    def with_tensors(self, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor]) -> "Call":
        """The same call on other tensors of the same shapes (the reference backward recomputes on leaves)."""
        return replace(self, q=q, k=k, v=v, bias=bias)

    # -- positions ---------------------------------------------------------------------------------------
    @property
    def q_base(self) -> int:
        """Global position of query row 0 for modifiers and dropout (masks use ``masks.query_start``)."""
        return self.q_offset if self.q_offset is not None else self.k_offset

    def q_pos(self, qs: int, qe: int) -> Tensor:
        """(Tq, 1) global query positions of local rows qs:qe, for modifiers and dropout."""
        return torch.arange(qs + self.q_base, qe + self.q_base, device=self.device)[:, None]

    def k_pos(self, ks: int, ke: int) -> Tensor:
        """(1, Tk) global key positions of local keys ks:ke."""
        return torch.arange(ks + self.k_offset, ke + self.k_offset, device=self.device)[None, :]

    # -- the mask, as the kernels read it ----------------------------------------------------------------
    def mask_tile(self, qs: int, qe: int, ks: int, ke: int) -> Tensor:
        """Allowed entries of the tile rows qs:qe, keys ks:ke (local), broadcastable to (B, Hq, Tq, Tk)."""
        q_idx = torch.arange(qs, qe, device=self.device)[:, None]
        k_idx = torch.arange(ks, ke, device=self.device)[None, :]
        return _masks.eval_mask(self.mask, q_idx, k_idx, self.Nq, self.Nk, self.q_offset, self.k_offset)

    def dense_mask(self) -> Optional[Tensor]:
        """The whole bool mask, broadcastable to (B, Hq, Nq, Nk) (reference kernel only: O(Nq·Nk))."""
        if self.mask is None:
            return None
        return self.mask.dense(self.B, self.Hq, self.Nq, self.Nk, self.device, self.q_offset, self.k_offset)

    def block_classes(self, block_q: int, block_k: int) -> Tensor:
        """(Bm, Hm, nqb, nkb) int8 EMPTY / PARTIAL / FULL per tile at these block sizes (all FULL without a
        mask)."""
        if self.mask is None:
            nqb, nkb = -(-self.Nq // block_q), -(-self.Nk // block_k)
            return torch.full((1, 1, nqb, nkb), _masks.FULL, dtype=torch.int8)
        return self.mask.block_classes(self.B, self.Hq, self.Nq, self.Nk, block_q, block_k, None,
                                       self.q_offset, self.k_offset)

    def tile_kinds(self, block_q: int, block_k: int) -> list:
        """(nqb, nkb) nested list of what a kernel batched over B and H may skip (``summarize_classes``)."""
        key = ("kinds", block_q, block_k)
        if key not in self._memo:
            if self.mask is None:
                nqb, nkb = -(-self.Nq // block_q), -(-self.Nk // block_k)
                self._memo[key] = [[_masks.FULL] * nkb for _ in range(nqb)]
            else:
                self._memo[key] = _masks.summarize_classes(self.block_classes(block_q, block_k)).tolist()
        return self._memo[key]

    def allows_everything(self) -> bool:
        """True when the mask (if any) allows every entry of the call."""
        return self.mask is None or self.mask.allows_everything(self.Nq, self.Nk, self.q_offset, self.k_offset)

    def lowered_mask(self) -> Optional[_masks.Lowered]:
        """The mask as atoms + a postfix program (``masks.Lowered``); None without a mask. Raises
        NotImplementedError for a mask with no lowering."""
        if self.mask is None:
            return None
        if "lowered" not in self._memo:  # asked by why_not and by the run: lowered once per call
            self._memo["lowered"] = self.mask.lower(self.Nq, self.Nk, self.q_offset, self.k_offset)
        return self._memo["lowered"]

    def lowered_mods(self):
        """The modifiers as ``scores.LoweredMod`` ops applied in order, None without modifiers; raises
        NotImplementedError when a modifier has no lowering (a custom Python modifier)."""
        if self.score_mod is None:
            return None
        if "lowered_mods" not in self._memo:
            self._memo["lowered_mods"] = self.score_mod.lower()
        ops = self._memo["lowered_mods"]
        if ops is None:
            raise NotImplementedError(f"{self.score_mod!r} has no lowering (a custom Python modifier)")
        return ops

    def lowered_mods_reason(self, who: str, max_ops: int, kinds=("alibi", "t5", "softcap")) -> Optional[str]:
        """Why a compiled kernel (``who``) cannot apply this call's modifiers from their lowering, or None: no
        lowering (a custom Python modifier), more than ``max_ops`` ops, an op kind it lacks, or ALiBi slopes that
        require grad (compiled backwards return gradients to T5 tables only)."""
        if self.score_mod is None:
            return None
        try:
            ops = self.lowered_mods()
        except NotImplementedError as e:
            return str(e)
        if len(ops) > max_ops:
            return f"{len(ops)} lowered score-modifier ops; the {who} applies at most {max_ops}"
        for op in ops:
            if op.kind not in kinds:
                return f"score modifier op {op.kind!r} has no lowering in the {who}"
            if op.kind == "alibi" and isinstance(op.slopes, Tensor) and op.slopes.requires_grad:
                return f"ALiBi slopes that require grad (the {who}'s backward returns gradients to T5 tables only)"
        return None

    def apply_mod(self, s: Tensor, qs: int, qe: int, ks: int, ke: int, h_idx: Optional[Tensor]) -> Tensor:
        """Modified scores of a tile: s (Bi, Hi, Tq, Tk) natural-log units, local rows qs:qe, keys ks:ke."""
        return self.score_mod.apply(s, self.q_pos(qs, qe), self.k_pos(ks, ke), h_idx)
