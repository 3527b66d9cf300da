"""Declarative attention masks.

A mask answers three questions for a problem shape, never by building the N×N matrix unless asked:

* ``mask_mod(q_idx, k_idx, Nq, Nk)`` -- the allowed entries of one tile of scores, from the tile's indices
  (``q_idx: (Tq, 1)``, ``k_idx: (1, Tk)``, int64), as a bool tensor broadcastable to ``(B, H, Tq, Tk)``
  (True = may attend). Every kernel uses this one function, so the reference and the tiled kernel agree.
* ``block_classes(B, H, Nq, Nk, block_q, block_k)`` -- for each (q-block, k-block) tile, EMPTY (no allowed
  entry: the tile is skipped), FULL (no masked entry: no mask is applied) or PARTIAL, shape
  ``(Bm, Hm, nqb, nkb)`` int8 with Bm in {1, B} and Hm in {1, H}. Masks derive it analytically; the default
  evaluates ``mask_mod`` one block-row at a time (O(block_q · Nk) memory).
* ``to_string(...)`` -- a text picture of that tile pattern.

``dense(...)`` gives the full bool matrix, for the reference kernel and tests.

Causal alignment: ``"bottom_right"`` (default) puts query i at key position Nk − Nq + i, which is what decoding
with a KV cache needs; ``"top_left"`` puts it at i. They agree when Nq == Nk.

Shape legend: B batch, H heads, Nq queries, Nk keys, Tq/Tk tile sizes, nqb/nkb tile counts.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
_ALIGNS = ("bottom_right", "top_left")

__all__ = ["EMPTY", "PARTIAL", "FULL", "Mask", "causal", "from_tensor", "AndMask", "OrMask"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _block_bounds(n: int, block: int, device=None) -> Tuple[Tensor, Tensor]:
    """First and last (inclusive) index of each block along a length-n axis: two (nblocks,) int64 tensors."""
    starts = torch.arange(0, n, block, dtype=torch.int64, device=device)
    ends = torch.clamp(starts + block, max=n) - 1
    return starts, ends


class Mask:
    """Base class. Subclasses implement ``mask_mod`` and, where they can, an analytic ``block_classes``."""

    def mask_mod(self, q_idx: Tensor, k_idx: Tensor, Nq: int, Nk: int) -> Tensor:
        raise NotImplementedError

    # -- the generic, always-correct tile classification -------------------------------------------------
    def _classes_by_evaluation(self, B: int, H: int, Nq: int, Nk: int, block_q: int, block_k: int,
                               device=None) -> Tensor:
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        k_idx = torch.arange(Nk, device=device)[None, :]
        rows = []
        for qb in range(nqb):
            q_idx = torch.arange(qb * block_q, min(Nq, (qb + 1) * block_q), device=device)[:, None]
            m = self.mask_mod(q_idx, k_idx, Nq, Nk)  # (Bm, Hm, Tq, Nk) or fewer dims
            while m.dim() < 4:
                m = m.unsqueeze(0)
            m = m.expand(m.shape[0], m.shape[1], q_idx.shape[0], Nk)
            pad = nkb * block_k - Nk
            if pad:
                # padded keys count as neither allowed nor masked: pad with the row's own verdicts
                anyv = torch.nn.functional.pad(m, (0, pad), value=False)
                allv = torch.nn.functional.pad(m, (0, pad), value=True)
            else:
                anyv = allv = m
            anyb = anyv.reshape(*m.shape[:3], nkb, block_k).any(-1).any(2)  # (Bm, Hm, nkb)
            allb = allv.reshape(*m.shape[:3], nkb, block_k).all(-1).all(2)
            rows.append(torch.where(allb, FULL, torch.where(anyb, PARTIAL, EMPTY)).to(torch.int8))
        if not rows:
            return torch.zeros(1, 1, 0, nkb, dtype=torch.int8, device=device)
        return torch.stack(rows, dim=2)  # (Bm, Hm, nqb, nkb)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None) -> Tensor:
        return self._classes_by_evaluation(B, H, Nq, Nk, block_q, block_k, device)

    def block_classes(self, B: int, H: int, Nq: int, Nk: int, block_q: int, block_k: int,
                      device=None) -> Tensor:
        """Tile classes (Bm, Hm, nqb, nkb) int8, cached per shape (masks are immutable once built)."""
        key = (B, H, Nq, Nk, block_q, block_k, str(device))
        cache = self.__dict__.setdefault("_class_cache", {})
        if key not in cache:
            if len(cache) > 32:
                cache.clear()
            cache[key] = self._block_classes(B, H, Nq, Nk, block_q, block_k, device)
        return cache[key]

    def dense(self, B: int, H: int, Nq: int, Nk: int, device=None) -> Tensor:
        """The full bool matrix, broadcastable to (B, H, Nq, Nk). O(Nq·Nk) memory: reference and tests only."""
        q_idx = torch.arange(Nq, device=device)[:, None]
        k_idx = torch.arange(Nk, device=device)[None, :]
        m = self.mask_mod(q_idx, k_idx, Nq, Nk)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        return m

    def to_string(self, Nq: int, Nk: int, block_q: int = 128, block_k: int = 128, B: int = 1, H: int = 1,
                  max_cols: int = 64) -> str:
        """Text picture of the tile pattern: '█' full, '░' partial, '·' empty (a tile's class over batch and
        heads: full only if full everywhere, empty only if empty everywhere)."""
        cls = self.block_classes(B, H, Nq, Nk, block_q, block_k)
        kinds = summarize_classes(cls)
        nqb, nkb = kinds.shape
        glyph = {EMPTY: "·", PARTIAL: "░", FULL: "█"}
        lines = [f"{type(self).__name__} Nq={Nq} Nk={Nk} tiles {block_q}x{block_k}: {nqb}x{nkb}, "
                 f"computed {int((kinds != EMPTY).sum())}/{nqb * nkb} "
                 f"(full {int((kinds == FULL).sum())}, partial {int((kinds == PARTIAL).sum())})"]
        step = max(1, _ceil_div(nkb, max_cols))
        for row in kinds.tolist():
            lines.append("".join(glyph[c] for c in row[::step]))
        return "\n".join(lines)

    def __and__(self, other: "Mask") -> "Mask":
        return AndMask(self, _as_mask(other, "other"))

    def __or__(self, other: "Mask") -> "Mask":
        return OrMask(self, _as_mask(other, "other"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def summarize_classes(cls: Tensor) -> Tensor:
    """(Bm, Hm, nqb, nkb) classes -> (nqb, nkb): EMPTY if empty for every batch row and head, FULL if full for
    all, else PARTIAL. This is what a kernel batched over B and H can skip or run unmasked."""
    if cls.numel() == 0:
        return torch.zeros(cls.shape[-2:], dtype=torch.int8)
    flat = cls.reshape(-1, *cls.shape[-2:])
    all_empty = (flat == EMPTY).all(0)
    all_full = (flat == FULL).all(0)
    return torch.where(all_full, FULL, torch.where(all_empty, EMPTY, PARTIAL)).to(torch.int8).cpu()


def _as_mask(m, name: str) -> Mask:
    if isinstance(m, Mask):
        return m
    if isinstance(m, Tensor):
        return from_tensor(m)
    raise TypeError(f"{name}: expected a selfattn.masks.Mask or a bool tensor, got {type(m).__name__}")


class Causal(Mask):
    """Key j is allowed for query i when j <= i + offset (offset = Nk − Nq bottom-right, 0 top-left)."""

    def __init__(self, align: str = "bottom_right"):
        if align not in _ALIGNS:
            raise ValueError(f"align: expected one of {_ALIGNS}, got {align!r}")
        self.align = align

    def offset(self, Nq: int, Nk: int) -> int:
        return Nk - Nq if self.align == "bottom_right" else 0

    def mask_mod(self, q_idx, k_idx, Nq, Nk):
        return k_idx <= q_idx + self.offset(Nq, Nk)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None):
        off = self.offset(Nq, Nk)
        qs, qe = _block_bounds(Nq, block_q, device)
        ks, ke = _block_bounds(Nk, block_k, device)
        # empty: even the last query of the block cannot see the first key; full: the first query sees the last
        empty = ks[None, :] > (qe[:, None] + off)
        full = ke[None, :] <= (qs[:, None] + off)
        return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)[None, None]

    def __repr__(self):
        return f"causal(align={self.align!r})"


def causal(align: str = "bottom_right") -> Mask:
    """Causal mask; bottom-right aligned by default (query i sits at key position Nk − Nq + i)."""
    return Causal(align)


class FromTensor(Mask):
    """A dense bool mask given by the caller, broadcastable to (B, H, Nq, Nk)."""

    def __init__(self, t: Tensor):
        if not isinstance(t, Tensor):
            raise TypeError(f"mask: expected a bool tensor, got {type(t).__name__}")
        if t.dtype != torch.bool:
            raise TypeError(f"mask: expected a bool tensor (True = may attend), got dtype {t.dtype}")
        if t.dim() > 4 or t.dim() < 2:
            raise ValueError(f"mask: expected 2 to 4 dims broadcastable to (B, H, Nq, Nk), got shape "
                             f"{tuple(t.shape)}")
        while t.dim() < 4:
            t = t.unsqueeze(0)
        self.t = t

    def check_shape(self, B, H, Nq, Nk):
        target = (B, H, Nq, Nk)
        for got, want in zip(self.t.shape, target):
            if got != 1 and got != want:
                raise ValueError(f"mask: shape {tuple(self.t.shape)} is not broadcastable to (B, H, Nq, Nk) = "
                                 f"{target}")

    def mask_mod(self, q_idx, k_idx, Nq, Nk):
        t = self.t
        qi = q_idx[:, 0] if t.shape[2] != 1 else q_idx[:1, 0] * 0
        ki = k_idx[0] if t.shape[3] != 1 else k_idx[0, :1] * 0
        return t.index_select(2, qi.to(t.device)).index_select(3, ki.to(t.device))

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None):
        t = self.t.expand(self.t.shape[0], self.t.shape[1], Nq, Nk)
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        pq, pk = nqb * block_q - Nq, nkb * block_k - Nk
        anyv = torch.nn.functional.pad(t, (0, pk, 0, pq), value=False)
        allv = torch.nn.functional.pad(t, (0, pk, 0, pq), value=True)
        shp = (t.shape[0], t.shape[1], nqb, block_q, nkb, block_k)
        anyb = anyv.reshape(shp).any(5).any(3)
        allb = allv.reshape(shp).all(5).all(3)
        return torch.where(allb, FULL, torch.where(anyb, PARTIAL, EMPTY)).to(torch.int8)

    def __repr__(self):
        return f"from_tensor(shape={tuple(self.t.shape)})"


def from_tensor(t: Tensor) -> Mask:
    """Wrap a dense bool tensor (True = may attend) broadcastable to (B, H, Nq, Nk)."""
    return FromTensor(t)


def _combine_classes(a: Tensor, b: Tensor, op: str) -> Tensor:
    bm = max(a.shape[0], b.shape[0])
    hm = max(a.shape[1], b.shape[1])
    a = a.expand(bm, hm, *a.shape[2:])
    b = b.expand(bm, hm, *b.shape[2:])
    if op == "and":  # empty if either is empty, full only if both are full
        return torch.where((a == EMPTY) | (b == EMPTY), EMPTY,
                           torch.where((a == FULL) & (b == FULL), FULL, PARTIAL)).to(torch.int8)
    return torch.where((a == FULL) | (b == FULL), FULL,
                       torch.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL)).to(torch.int8)


class AndMask(Mask):
    """Allowed where both masks allow."""
    _op = "and"

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def mask_mod(self, q_idx, k_idx, Nq, Nk):
        ma, mb = self.a.mask_mod(q_idx, k_idx, Nq, Nk), self.b.mask_mod(q_idx, k_idx, Nq, Nk)
        return (ma & mb) if self._op == "and" else (ma | mb)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None):
        return _combine_classes(self.a.block_classes(B, H, Nq, Nk, block_q, block_k, device),
                                self.b.block_classes(B, H, Nq, Nk, block_q, block_k, device), self._op)

    def check_shape(self, B, H, Nq, Nk):
        for m in (self.a, self.b):
            if hasattr(m, "check_shape"):
                m.check_shape(B, H, Nq, Nk)

    def __repr__(self):
        sym = "&" if self._op == "and" else "|"
        return f"({self.a!r} {sym} {self.b!r})"


class OrMask(AndMask):
    """Allowed where either mask allows."""
    _op = "or"

