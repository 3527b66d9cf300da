"""Declarative attention masks.

A mask answers three questions for a problem shape, never by building the N×N matrix unless asked:

Positions: every method also takes ``q_offset`` (None) and ``k_offset`` (0), the global positions of the call's
first query and key (``query_start``), so a KV cache, a shard of a sequence and a ring step use the same mask
objects; ``lower`` gives the atoms and parameters a compiled kernel reads.

* ``mask_mod(q_idx, k_idx, Nq, Nk)`` -- the allowed entries of one tile of scores, from the tile's indices
  (``q_idx: (Tq, 1)``, ``k_idx: (1, Tk)``, int64), as a bool tensor broadcastable to ``(B, H, Tq, Tk)``
  (True = may attend). Every kernel uses this one function, so the reference and the tiled kernel agree.
* ``block_classes(B, H, Nq, Nk, block_q, block_k)`` -- for each (q-block, k-block) tile, EMPTY (no allowed
  entry: the tile is skipped), FULL (no masked entry: no mask is applied) or PARTIAL, shape
  ``(Bm, Hm, nqb, nkb)`` int8 with Bm in {1, B} and Hm in {1, H}. Masks derive it analytically; the default
  evaluates ``mask_mod`` one block-row at a time (O(block_q · Nk) memory).
* ``to_string(...)`` -- a text picture of that tile pattern.

``dense(...)`` gives the full bool matrix, for the reference kernel and tests. ``check_shape(B, H, Nq, Nk)``
raises ValueError when the mask's own data (lengths, ids, a tensor) does not fit a call; ``attention`` calls it.

The masks: ``causal``, ``sliding_window``, ``key_padding``, ``document`` (with ``document_ids``), ``prefix_lm``,
``from_tensor``, and the combinators ``a & b``, ``a | b``, ``~a``. Masks that carry per-batch data (lengths,
ids) return tiles of shape (B, 1, Tq, Tk) from ``mask_mod`` and classes of shape (B, 1, nqb, nkb).

Causal alignment: ``"bottom_right"`` (default) puts query i at key position Nk − Nq + i, which is what decoding
with a KV cache needs; ``"top_left"`` puts it at i. They agree when Nq == Nk.

Shape legend: B batch, H heads, Nq queries, Nk keys, Tq/Tk tile sizes, nqb/nkb tile counts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

EMPTY, PARTIAL, FULL = 0, 1, 2
_ALIGNS = ("bottom_right", "top_left")
# the most (q block, k block) tiles a class grid may hold (int8: 64 MiB); counts at any size use tile_counts
MAX_TILES = 1 << 26

__all__ = ["EMPTY", "PARTIAL", "FULL", "Mask", "causal", "sliding_window", "key_padding", "document",
           "document_ids", "prefix_lm", "from_tensor", "summarize_classes", "Causal", "SlidingWindow",
           "KeyPadding", "Document", "PrefixLM", "FromTensor", "AndMask", "OrMask", "NotMask", "Atom", "Lowered",
           "query_start", "MAX_TILES"]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _block_bounds(n: int, block: int, device=None) -> Tuple[Tensor, Tensor]:
    """First and last (inclusive) index of each block along a length-n axis: two (nblocks,) int64 tensors."""
    starts = torch.arange(0, n, block, dtype=torch.int64, device=device)
    ends = torch.clamp(starts + block, max=n) - 1
    return starts, ends


class Mask:
    """Base class. Subclasses implement ``mask_mod`` and, where they can, an analytic ``block_classes``."""

    def mask_mod(self, q_idx: Tensor, k_idx: Tensor, Nq: int, Nk: int, q_offset: Optional[int] = None,
                 k_offset: int = 0) -> Tensor:
        raise NotImplementedError

    def check_shape(self, B: int, H: int, Nq: int, Nk: int, q_offset: Optional[int] = None,
                    k_offset: int = 0) -> None:
        """Raise ValueError if the mask's own data does not fit a (B, H, Nq, Nk) call at these offsets.
        Shape-free masks fit all."""

    def lower(self, Nq: int, Nk: int, q_offset: Optional[int] = None, k_offset: int = 0) -> "Lowered":
        """The mask as atoms with integer parameters and a postfix program (see ``Lowered``): what a compiled
        kernel reads instead of calling Python per tile. Masks without a lowering raise NotImplementedError."""
        raise NotImplementedError(f"{self!r} has no lowering")

    @property
    def batch_size(self) -> int:
        """Rows of per-batch data the mask carries (1 when it is the same for every batch row)."""
        return 1

    # -- the generic, always-correct tile classification -------------------------------------------------
    def _classes_by_evaluation(self, B: int, H: int, Nq: int, Nk: int, block_q: int, block_k: int,
                               device=None, q_offset=None, k_offset=0) -> Tensor:
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        k_idx = torch.arange(Nk, device=device)[None, :]
        rows = []
        for qb in range(nqb):
            q_idx = torch.arange(qb * block_q, min(Nq, (qb + 1) * block_q), device=device)[:, None]
            m = eval_mask(self, q_idx, k_idx, Nq, Nk, q_offset, k_offset)  # (Bm, Hm, Tq, Nk) or fewer dims
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

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0) -> Tensor:
        return self._classes_by_evaluation(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset)

    def _version(self):
        """Changes when data the mask reads is edited in place (tensors keep a version counter)."""
        return 0

    def block_classes(self, B: int, H: int, Nq: int, Nk: int, block_q: int, block_k: int,
                      device=None, q_offset: Optional[int] = None, k_offset: int = 0) -> Tensor:
        """Tile classes (Bm, Hm, nqb, nkb) int8, cached per shape, offsets and data version. Refuses grids of
        more than MAX_TILES tiles (use ``tile_counts`` for counts at any length)."""
        block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        if nqb * nkb > MAX_TILES:
            raise ValueError(f"block_classes: {nqb}x{nkb} tiles for Nq={Nq}, Nk={Nk} at {block_q}x{block_k} "
                             f"exceeds {MAX_TILES}; use larger blocks")
        key = (B, H, Nq, Nk, block_q, block_k, str(device), q_offset, k_offset, self._version())
        cache = self.__dict__.setdefault("_class_cache", {})
        if key not in cache:
            if len(cache) > 32:
                cache.clear()
            cache[key] = self._block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset)
        return cache[key]

    def tile_counts(self, B: int, H: int, Nq: int, Nk: int, block_q: int, block_k: int,
                    q_offset: Optional[int] = None, k_offset: int = 0) -> Tuple[int, int, int]:
        """(total, computed, partial) tiles of the batched grid (``summarize_classes``). Masks whose classes are
        analytic per q block (causal, window, padding by lengths) answer in O(Nq / block_q) time and memory, at
        any length; others classify block rows in chunks (O(rows · Nk / block_k) memory per chunk)."""
        block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        ranges = self._row_ranges(B, H, Nq, Nk, block_q, block_k, q_offset, k_offset)
        if ranges is not None:
            lo, hi, flo, fhi = ranges  # per q block: non-empty k blocks [lo, hi), full ones [flo, fhi)
            comp = (hi - lo).clamp_(min=0)
            full = (fhi - flo).clamp_(min=0)
            return nqb * nkb, int(comp.sum()), int((comp - full).sum())
        if nqb * nkb > MAX_TILES:
            raise ValueError(f"tile_counts: {nqb}x{nkb} tiles for {self!r} at Nq={Nq}, Nk={Nk} exceeds {MAX_TILES} "
                             f"(this mask has no analytic tile count); use larger blocks")
        kinds = summarize_classes(self.block_classes(B, H, Nq, Nk, block_q, block_k, None, q_offset, k_offset))
        return nqb * nkb, int((kinds != EMPTY).sum()), int((kinds == PARTIAL).sum())

    def _row_ranges(self, B, H, Nq, Nk, block_q, block_k, q_offset, k_offset):
        """Per q block, the non-empty and the full k-block ranges as four (nqb,) int64 tensors, when the batched
        tile pattern of every block row is one interval of non-empty tiles with one interval of full ones
        inside; None when the mask cannot say so analytically."""
        return None

    def dense(self, B: int, H: int, Nq: int, Nk: int, device=None, q_offset: Optional[int] = None,
              k_offset: int = 0) -> Tensor:
        """The full bool matrix, broadcastable to (B, H, Nq, Nk). O(Nq·Nk) memory: reference and tests only."""
        q_idx = torch.arange(Nq, device=device)[:, None]
        k_idx = torch.arange(Nk, device=device)[None, :]
        m = eval_mask(self, q_idx, k_idx, Nq, Nk, q_offset, k_offset)
        while m.dim() < 4:
            m = m.unsqueeze(0)
        return m

    def to_string(self, Nq: int, Nk: int, block_q: int = 128, block_k: int = 128, B: Optional[int] = None,
                  H: int = 1, max_cols: int = 64, max_batches: int = 4) -> str:
        """Text picture of the tile pattern: '█' full, '░' partial, '·' empty. The first picture is what a
        kernel batched over B and H sees (full only if full for every row and head, empty only if empty for
        all); masks with per-batch data add one picture per batch row (up to ``max_batches``). B defaults to
        the mask's own batch size. Large grids are drawn every ``step``-th tile both ways."""
        B = self.batch_size if B is None else B
        cls = self.block_classes(B, H, Nq, Nk, block_q, block_k)
        kinds = summarize_classes(cls)  # (nqb, nkb)
        nqb, nkb = kinds.shape
        step = max(1, _ceil_div(max(nqb, nkb), max_cols))
        glyph = {EMPTY: "·", PARTIAL: "░", FULL: "█"}

        def picture(k: Tensor):
            return ["".join(glyph[c] for c in row[::step]) for row in k.tolist()[::step]]

        drawn = f", 1 in {step} tiles drawn each way" if step > 1 else ""
        lines = [f"{self!r} Nq={Nq} Nk={Nk} tiles {block_q}x{block_k}: {nqb}x{nkb}, "
                 f"computed {int((kinds != EMPTY).sum())}/{nqb * nkb} "
                 f"(full {int((kinds == FULL).sum())}, partial {int((kinds == PARTIAL).sum())}){drawn}"]
        lines += picture(kinds)
        if cls.shape[0] > 1:
            for b in range(min(cls.shape[0], max_batches)):
                lines.append(f"batch row {b}:")
                lines += picture(summarize_classes(cls[b:b + 1]))
        return "\n".join(lines)

    def __and__(self, other: "Mask") -> "Mask":
        return AndMask(self, _as_mask(other, "other"))

    def __or__(self, other: "Mask") -> "Mask":
        return OrMask(self, _as_mask(other, "other"))

    def __invert__(self) -> "Mask":
        return NotMask(self)

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


def _check_align(align) -> str:
    if align not in _ALIGNS:
        raise ValueError(f"align: expected one of {_ALIGNS}, got {align!r}")
    return align


def query_start(align: str, Nq: int, Nk: int, q_offset: Optional[int] = None, k_offset: int = 0) -> int:
    """Global position of local query row 0 for a mask of this alignment (the one position convention).

    Key j sits at ``k_offset + j``. Query i sits at ``q_offset + i`` when the call gives q_offset; otherwise the
    mask's alignment places it: ``k_offset + Nk − Nq + i`` bottom-right (the last query sees the last key),
    ``k_offset + i`` top-left. Data masks (padding, documents, tensors) index their data at these positions."""
    if q_offset is not None:
        return q_offset
    return k_offset + (Nk - Nq if align == "bottom_right" else 0)


def eval_mask(mask: "Mask", q_idx: Tensor, k_idx: Tensor, Nq: int, Nk: int, q_offset: Optional[int] = None,
              k_offset: int = 0) -> Tensor:
    """``mask.mask_mod`` at these positions; without offsets it is called with four arguments, so masks written
    against the older ``mask_mod(q_idx, k_idx, Nq, Nk)`` keep working where no offset is asked for."""
    if q_offset is None and k_offset == 0:
        return mask.mask_mod(q_idx, k_idx, Nq, Nk)
    return mask.mask_mod(q_idx, k_idx, Nq, Nk, q_offset, k_offset)


def _check_block(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected a positive int, got {type(x).__name__} {x!r}")
    if x <= 0:
        raise ValueError(f"{name}: expected a positive int, got {x}")
    return x


class Atom:
    """One lowered mask atom: ``kind`` with integer parameters and data tensors, evaluated at global positions
    qp = q0 + i, kp = k0 + j (i, j local). Kinds and their rule:

    * ``causal``: kp <= qp;  ``window`` (left, right): qp − left <= kp <= qp + right;
    * ``pad_len`` (lengths (Bm,) int64): kp < lengths[b];  ``pad_keep`` (keep (Bm, Ktot) bool): keep[b, kp];
    * ``document`` (ids_q (Bq, Qtot), ids_k (Bk, Ktot) int64): ids_q[b, qp] == ids_k[b, kp];
    * ``prefix`` (prefix (Bp,) int64): kp < prefix[b] or kp <= qp;
    * ``dense`` (t (Bm, Hm, Qt, Kt) bool): t[b, h, qp, kp].

    Batch (and head) dims of size 1 broadcast; dense dims of size 1 are read at index 0."""
    __slots__ = ("kind", "q0", "k0", "left", "right", "lengths", "keep", "ids_q", "ids_k", "prefix", "t")

    def __init__(self, kind: str, q0: int, k0: int, **fields):
        self.kind, self.q0, self.k0 = kind, int(q0), int(k0)
        for name in self.__slots__[3:]:
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError(f"Atom: unknown fields {sorted(fields)}")

    def __repr__(self):
        extra = {n: getattr(self, n) for n in ("left", "right") if getattr(self, n) is not None}
        return f"Atom({self.kind}, q0={self.q0}, k0={self.k0}{''.join(f', {k}={v}' for k, v in extra.items())})"


class Lowered:
    """A mask as ``atoms`` and a postfix ``program`` over them (ints index atoms; "and", "or", "not" combine the
    top of the stack), e.g. causal & ~document -> program (0, 1, "not", "and")."""
    __slots__ = ("atoms", "program")

    def __init__(self, atoms, program):
        self.atoms, self.program = tuple(atoms), tuple(program)

    def __repr__(self):
        return f"Lowered(atoms={list(self.atoms)}, program={list(self.program)})"


def _atom(kind, q0, k0, **fields) -> Lowered:
    return Lowered([Atom(kind, q0, k0, **fields)], [0])


def _check_positions(who: str, q0: int, Nq: int, qtot: Optional[int], k0: int, Nk: int, ktot: Optional[int]):
    """Data masks index their data at global positions: they must lie inside it."""
    if qtot is not None and Nq and (q0 < 0 or q0 + Nq > qtot):
        raise ValueError(f"{who}: holds {qtot} query positions, but the call's queries sit at positions "
                         f"{q0}..{q0 + Nq - 1}")
    if ktot is not None and Nk and (k0 < 0 or k0 + Nk > ktot):
        raise ValueError(f"{who}: holds {ktot} key positions, but the call's keys sit at positions "
                         f"{k0}..{k0 + Nk - 1}")


def _check_nonneg_int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected a non-negative int, got {type(x).__name__} {x!r}")
    if x < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {x}")
    return x


def _int_tensor(name: str, x, dims: Tuple[int, ...], nonneg: bool) -> Tensor:
    """An int sequence or int tensor with one of ``dims`` dimensions -> int64 tensor (same device)."""
    if isinstance(x, (list, tuple)):
        flat = x
        while flat and isinstance(flat[0], (list, tuple)):
            flat = [e for row in flat for e in row]
        bad = next((e for e in flat if isinstance(e, bool) or not isinstance(e, int)), None)
        if bad is not None:
            raise TypeError(f"{name}: expected ints, got an element {bad!r} of type {type(bad).__name__}")
        try:
            x = torch.tensor(x, dtype=torch.int64)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{name}: expected a rectangular nested list of ints ({e})") from None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a list of ints or an integer tensor, got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    if x.dim() not in dims:
        want = " or ".join(f"{d}" for d in dims)
        raise ValueError(f"{name}: expected {want} dims, got shape {tuple(x.shape)}")
    x = x.detach().to(torch.int64, copy=True)  # a snapshot: later in-place edits of the caller's tensor change nothing
    if nonneg and x.numel() and int(x.min()) < 0:
        raise ValueError(f"{name}: expected non-negative values, got min {int(x.min())}")
    return x


def _classes(full: Tensor, empty: Tensor) -> Tensor:
    return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)


def _block_minmax(x: Tensor, block: int) -> Tuple[Tensor, Tensor]:
    """Per-block min and max of x (R, N) along N: two (R, nblocks) tensors. The ragged last block is padded
    with its own last value, which changes neither. O(R·N)."""
    R, N = x.shape
    nb = _ceil_div(N, block)
    pad = nb * block - N
    if pad:
        x = torch.cat([x, x[:, -1:].expand(R, pad)], dim=1)
    x = x.reshape(R, nb, block)  # (R, nb, block)
    return x.amin(-1), x.amax(-1)


def _block_anyall(x: Tensor, block: int) -> Tuple[Tensor, Tensor]:
    """Per-block any and all of bool x (R, N): two (R, nblocks) bool tensors (padding is neutral)."""
    R, N = x.shape
    nb = _ceil_div(N, block)
    pad = nb * block - N
    anyv = torch.nn.functional.pad(x, (0, pad), value=False).reshape(R, nb, block)
    allv = torch.nn.functional.pad(x, (0, pad), value=True).reshape(R, nb, block)
    return anyv.any(-1), allv.all(-1)


def _check_batch(name: str, rows: int, B: int):
    if rows != 1 and rows != B:
        raise ValueError(f"{name}: carries data for {rows} batch rows, but the call has B={B} (expected {rows} "
                         f"or data for a single row)")


class Causal(Mask):
    """Key j is allowed for query i when kp <= qp (global positions, ``query_start``): j <= i + Nk − Nq
    bottom-right, j <= i top-left, when no offsets are given."""

    def __init__(self, align: str = "bottom_right"):
        self.align = _check_align(align)

    def offset(self, Nq: int, Nk: int, q_offset: Optional[int] = None, k_offset: int = 0) -> int:
        """Local diagonal: key j is allowed for query i when j <= i + offset."""
        return query_start(self.align, Nq, Nk, q_offset, k_offset) - k_offset

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        return k_idx <= q_idx + self.offset(Nq, Nk, q_offset, k_offset)

    def _row_ranges(self, B, H, Nq, Nk, block_q, block_k, q_offset, k_offset):
        return _band_ranges(Nq, Nk, block_q, block_k, self.offset(Nq, Nk, q_offset, k_offset), None, 0)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        off = self.offset(Nq, Nk, q_offset, k_offset)
        qs, qe = _block_bounds(Nq, block_q, device)
        ks, ke = _block_bounds(Nk, block_k, device)
        # empty: even the last query of the block cannot see the first key; full: the first query sees the last
        empty = ks[None, :] > (qe[:, None] + off)
        full = ke[None, :] <= (qs[:, None] + off)
        return torch.where(full, FULL, torch.where(empty, EMPTY, PARTIAL)).to(torch.int8)[None, None]

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        return _atom("causal", query_start(self.align, Nq, Nk, q_offset, k_offset), k_offset)

    def __repr__(self):
        return f"causal(align={self.align!r})"


def causal(align: str = "bottom_right") -> Mask:
    """Causal mask; bottom-right aligned by default (query i sits at key position Nk − Nq + i)."""
    return Causal(align)


def _band_ranges(Nq, Nk, block_q, block_k, off, left, right):
    """Per q block, the k blocks a band ``j − i − off ∈ [−left, right]`` (left None: unbounded, the causal
    band is left=None, right=0) touches and fully covers: (lo, hi, flo, fhi), four (nqb,) int64 tensors.
    O(nqb): what plan and the kernels' schedules use at any length."""
    qs, qe = _block_bounds(Nq, block_q)
    nkb = _ceil_div(Nk, block_k)
    # keys a row range may see: j ∈ [qs + off − left, qe + off + right] for some row; all rows: [qe+off−left, qs+off+right]
    far = torch.full_like(qs, -(1 << 62))
    any_lo = far if left is None else qs + off - left
    any_hi = qe + off + right
    all_lo = far if left is None else qe + off - left
    all_hi = qs + off + right
    lo = torch.clamp(torch.div(any_lo.clamp(min=0), block_k, rounding_mode="floor"), max=nkb)
    hi = torch.clamp(torch.div(any_hi, block_k, rounding_mode="floor") + 1, min=0, max=nkb)
    hi = torch.where(any_hi < 0, torch.zeros_like(hi), hi)
    lo = torch.where(any_lo > Nk - 1, torch.full_like(lo, nkb), lo)
    # a k block [kb·bk, min(Nk, (kb+1)·bk) − 1] is full when it lies inside [all_lo, all_hi]
    flo = torch.clamp(-torch.div(-all_lo.clamp(min=0), block_k, rounding_mode="floor"), max=nkb)  # ceil
    last_full = torch.div(all_hi + 1, block_k, rounding_mode="floor")  # blocks ending at or before all_hi
    ends_ok = torch.where(all_hi >= Nk - 1, torch.full_like(last_full, nkb), last_full)
    fhi = torch.clamp(ends_ok, min=0, max=nkb)
    fhi = torch.maximum(fhi, flo)
    empty_rows = all_lo > all_hi
    fhi = torch.where(empty_rows, flo, fhi)
    return lo, torch.maximum(hi, lo), flo, fhi


class SlidingWindow(Mask):
    """Key j is allowed for query i when qp − left <= kp <= qp + right (global positions, ``query_start``:
    qp − kp = i + Nk − Nq − j bottom-right, i − j top-left, when no offsets are given). ``right=0`` is causal."""

    def __init__(self, left: int, right: int = 0, align: str = "bottom_right"):
        self.left = _check_nonneg_int("left", left)
        self.right = _check_nonneg_int("right", right)
        self.align = _check_align(align)

    def _off(self, Nq, Nk, q_offset, k_offset):
        return query_start(self.align, Nq, Nk, q_offset, k_offset) - k_offset

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        off = self._off(Nq, Nk, q_offset, k_offset)
        # two broadcast compares write bool tiles directly: no (Tq, Tk) int64 distance tensor (8x the bytes)
        return (k_idx >= q_idx + (off - self.left)) & (k_idx <= q_idx + (off + self.right))  # (Tq, Tk)

    def _row_ranges(self, B, H, Nq, Nk, block_q, block_k, q_offset, k_offset):
        return _band_ranges(Nq, Nk, block_q, block_k, self._off(Nq, Nk, q_offset, k_offset), self.left,
                            self.right)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        off = self._off(Nq, Nk, q_offset, k_offset)
        qs, qe = _block_bounds(Nq, block_q, device)
        ks, ke = _block_bounds(Nk, block_k, device)
        # d = j − pos(i) takes every integer between its extremes over a rectangular tile, so both tests are exact
        dmin = ks[None, :] - (qe[:, None] + off)  # (nqb, nkb)
        dmax = ke[None, :] - (qs[:, None] + off)
        empty = (dmax < -self.left) | (dmin > self.right)
        full = (dmin >= -self.left) & (dmax <= self.right)
        return _classes(full, empty)[None, None]

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        return _atom("window", query_start(self.align, Nq, Nk, q_offset, k_offset), k_offset, left=self.left,
                     right=self.right)

    def __repr__(self):
        return f"sliding_window(left={self.left}, right={self.right}, align={self.align!r})"


def sliding_window(left: int, right: int = 0, align: str = "bottom_right") -> Mask:
    """Local attention: query i sees keys pos(i) − left … pos(i) + right (inclusive), pos aligned like
    ``causal``. ``sliding_window(256)`` is a causal window of 257 keys; ``sliding_window(w, w)`` is symmetric.
    ``sliding_window(w, r) & causal()`` clips the right side to the causal limit."""
    return SlidingWindow(left, right, align)


class KeyPadding(Mask):
    """Per batch row, only the kept keys may be attended: kp < lengths[b], or keep[b, kp] for a bool mask
    (kp = k_offset + j, the key's global position)."""

    def __init__(self, lengths_or_bool):
        x = lengths_or_bool
        if isinstance(x, Tensor) and x.dtype == torch.bool:
            if x.dim() != 2:
                raise ValueError(f"key_padding: a bool keep-mask must have shape (B, Nk), got {tuple(x.shape)}")
            self.keep, self.lengths = x.detach().clone(), None  # a snapshot: later edits of x change nothing
        else:
            self.keep = None
            self.lengths = _int_tensor("key_padding lengths", x, (1,), nonneg=True)  # (B,)

    @property
    def batch_size(self):
        return (self.keep if self.keep is not None else self.lengths).shape[0]

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        _check_batch("key_padding", self.batch_size, B)
        if self.keep is not None:
            if q_offset is None and k_offset == 0 and self.keep.shape[1] != Nk:
                raise ValueError(f"key_padding: keep-mask has {self.keep.shape[1]} keys per row, but the call "
                                 f"has Nk={Nk}")
            _check_positions("key_padding keep-mask", 0, 0, None, k_offset, Nk, self.keep.shape[1])
        elif q_offset is None and k_offset == 0 and self.lengths.numel() and int(self.lengths.max()) > Nk:
            raise ValueError(f"key_padding: a length {int(self.lengths.max())} exceeds the call's Nk={Nk}")

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        kp = k_idx + k_offset
        if self.keep is not None:
            keep = self.keep.to(k_idx.device)
            return keep.index_select(1, kp[0])[:, None, None, :]  # (B, 1, 1, Tk)
        return kp[None, None] < self.lengths.to(k_idx.device)[:, None, None, None]  # (B, 1, 1, Tk)

    def _row_ranges(self, B, H, Nq, Nk, block_q, block_k, q_offset, k_offset):
        if self.keep is not None:
            return None
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        L = self.lengths - k_offset  # local lengths (B,)
        lmin, lmax = (int(L.min()), int(L.max())) if L.numel() else (0, 0)
        # batched: a k block is non-empty if some row keeps a key of it, full if every row keeps all of it
        hi = min(nkb, max(0, _ceil_div(lmax, block_k)))
        fhi = nkb if lmin >= Nk else min(nkb, max(0, lmin // block_k))
        z = torch.zeros(nqb, dtype=torch.int64)
        return z, z + hi, z, z + min(fhi, hi)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        nqb = _ceil_div(Nq, block_q)
        if self.keep is not None:
            anyb, allb = _block_anyall(self.keep[:, k_offset:k_offset + Nk].to(device), block_k)  # (B, nkb)
            full, empty = allb, ~anyb
        else:
            ks, ke = _block_bounds(Nk, block_k, device)
            L = self.lengths.to(device)[:, None] - k_offset  # (B, 1) local lengths
            full, empty = ke[None, :] < L, ks[None, :] >= L  # (B, nkb)
        cls = _classes(full, empty)  # (B, nkb): padding does not depend on the query
        return cls[:, None, None, :].expand(cls.shape[0], 1, nqb, cls.shape[1]).contiguous()

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        q0 = query_start("top_left", Nq, Nk, q_offset, k_offset)
        if self.keep is not None:
            return _atom("pad_keep", q0, k_offset, keep=self.keep)
        return _atom("pad_len", q0, k_offset, lengths=self.lengths)

    def __repr__(self):
        if self.keep is not None:
            return f"key_padding(keep-mask of shape {tuple(self.keep.shape)})"
        return f"key_padding(lengths={self.lengths.tolist()})"


def key_padding(lengths_or_bool) -> Mask:
    """Padded batches: ``(B,)`` lengths (keys ``j < lengths[b]`` kept) or a ``(B, Nk)`` bool keep-mask (True =
    real token). A row with length 0 sees no key: its output is 0."""
    return KeyPadding(lengths_or_bool)


def document_ids(lengths) -> Tensor:
    """Document ids of packed sequences from their lengths: ``[3, 0, 2] -> tensor([0, 0, 0, 2, 2])``
    (document 1 has no token). A list of lists gives a (B, N) tensor; every row must sum to the same N."""
    if isinstance(lengths, (list, tuple)) and lengths and isinstance(lengths[0], (list, tuple, Tensor)):
        rows = [document_ids(r) for r in lengths]
        if len({r.shape[0] for r in rows}) > 1:
            raise ValueError(f"document_ids: every row must sum to the same N, got row sums "
                             f"{[r.shape[0] for r in rows]}")
        return torch.stack(rows)  # (B, N)
    L = _int_tensor("document_ids lengths", lengths, (1,), nonneg=True)  # (ndocs,)
    return torch.repeat_interleave(torch.arange(L.shape[0], dtype=torch.int64, device=L.device), L)  # (N,)


class Document(Mask):
    """Packed sequences: key j is allowed for query i when ids_q[b, qp] == ids_k[b, kp] (global positions;
    top-left, qp = i and kp = j, when no offsets are given)."""

    def __init__(self, ids_q, ids_k=None):
        iq = _int_tensor("document ids_q", ids_q, (1, 2), nonneg=False)
        ik = iq if ids_k is None else _int_tensor("document ids_k", ids_k, (1, 2), nonneg=False)
        self.self_ids = ids_k is None
        self.ids_q = iq if iq.dim() == 2 else iq[None]  # (Bq, Nq), Bq in {1, B}
        self.ids_k = ik if ik.dim() == 2 else ik[None]  # (Bk, Nk)
        if self.ids_q.shape[0] != self.ids_k.shape[0] and 1 not in (self.ids_q.shape[0], self.ids_k.shape[0]):
            raise ValueError(f"document: ids_q has {self.ids_q.shape[0]} batch rows and ids_k "
                             f"{self.ids_k.shape[0]}; expected equal counts or one of them 1")

    @property
    def batch_size(self):
        return max(self.ids_q.shape[0], self.ids_k.shape[0])

    def _q0(self, Nq, Nk, q_offset, k_offset):
        return query_start("top_left", Nq, Nk, q_offset, k_offset)

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        _check_batch("document", self.batch_size, B)
        if q_offset is None and k_offset == 0:
            if self.ids_q.shape[1] != Nq:
                raise ValueError(f"document: ids_q holds {self.ids_q.shape[1]} positions, but the call has "
                                 f"Nq={Nq}")
            if self.ids_k.shape[1] != Nk:
                hint = " (pass ids_k when Nq != Nk)" if self.self_ids else ""
                raise ValueError(f"document: ids_k holds {self.ids_k.shape[1]} positions, but the call has "
                                 f"Nk={Nk}{hint}")
        _check_positions("document ids", self._q0(Nq, Nk, q_offset, k_offset), Nq, self.ids_q.shape[1],
                         k_offset, Nk, self.ids_k.shape[1])

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        q0 = self._q0(Nq, Nk, q_offset, k_offset)
        iq = self.ids_q.to(q_idx.device).index_select(1, q_idx[:, 0] + q0)  # (Bq, Tq)
        ik = self.ids_k.to(k_idx.device).index_select(1, k_idx[0] + k_offset)  # (Bk, Tk)
        return (iq[:, :, None] == ik[:, None, :])[:, None]  # (B|1, 1, Tq, Tk)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        q0 = self._q0(Nq, Nk, q_offset, k_offset)
        qmin, qmax = _block_minmax(self.ids_q[:, q0:q0 + Nq].to(device), block_q)  # (Bq, nqb)
        kmin, kmax = _block_minmax(self.ids_k[:, k_offset:k_offset + Nk].to(device), block_k)  # (Bk, nkb)
        qmin, qmax = qmin[:, :, None], qmax[:, :, None]  # (Bq, nqb, 1)
        kmin, kmax = kmin[:, None, :], kmax[:, None, :]  # (Bk, 1, nkb)
        # empty when the id ranges do not overlap (exact for sorted, packed ids; unsorted ids may leave an empty
        # tile PARTIAL, which costs time, never correctness); full when both tiles hold one and the same id
        empty = (qmax < kmin) | (qmin > kmax)
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return _classes(full, empty)[:, None]  # (B|1, 1, nqb, nkb)

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        return _atom("document", self._q0(Nq, Nk, q_offset, k_offset), k_offset, ids_q=self.ids_q,
                     ids_k=self.ids_k)

    def __repr__(self):
        return f"document(ids_q of shape {tuple(self.ids_q.shape)}, ids_k of shape {tuple(self.ids_k.shape)})"


def document(ids_q, ids_k=None) -> Mask:
    """Packed sequences: attend only within the same document id. ids: (B, N) or (N,) ints (see
    ``document_ids``); ``ids_k`` defaults to ``ids_q`` (self-attention, Nq == Nk). Any ints work; tiles are
    skipped best when ids are sorted along the sequence, as packing makes them."""
    return Document(ids_q, ids_k)


class PrefixLM(Mask):
    """Key j is allowed for query i when kp < prefix[b] (the bidirectional prefix) or kp <= qp (causal)."""

    def __init__(self, prefix_lengths, align: str = "bottom_right"):
        if isinstance(prefix_lengths, int) and not isinstance(prefix_lengths, bool):
            prefix_lengths = [prefix_lengths]
        self.prefix = _int_tensor("prefix_lm prefix_lengths", prefix_lengths, (1,), nonneg=True)  # (Bp,)
        self.align = _check_align(align)

    @property
    def batch_size(self):
        return self.prefix.shape[0]

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        _check_batch("prefix_lm", self.batch_size, B)
        if q_offset is None and k_offset == 0 and self.prefix.numel() and int(self.prefix.max()) > Nk:
            raise ValueError(f"prefix_lm: a prefix length {int(self.prefix.max())} exceeds the call's Nk={Nk}")

    def _off(self, Nq, Nk, q_offset, k_offset):
        return query_start(self.align, Nq, Nk, q_offset, k_offset) - k_offset

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        p = self.prefix.to(k_idx.device)[:, None, None, None] - k_offset  # (Bp, 1, 1, 1) local prefix end
        return (k_idx <= q_idx + self._off(Nq, Nk, q_offset, k_offset)) | (k_idx < p)  # (Bp, 1, Tq, Tk)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        off = self._off(Nq, Nk, q_offset, k_offset)
        qs, qe = _block_bounds(Nq, block_q, device)
        ks, ke = _block_bounds(Nk, block_k, device)
        p = self.prefix.to(device)[:, None, None] - k_offset  # (Bp, 1, 1)
        # exact: the tile's first query sees least, its last query most; full if the first query sees the last key
        full = ke[None, :] <= torch.maximum(p - 1, qs[:, None] + off)  # (Bp, nqb, nkb)
        empty = (ks[None, :] >= p) & (ks[None, :] > qe[:, None] + off)
        return _classes(full, empty)[:, None]  # (Bp, 1, nqb, nkb)

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        return _atom("prefix", query_start(self.align, Nq, Nk, q_offset, k_offset), k_offset, prefix=self.prefix)

    def __repr__(self):
        return f"prefix_lm(prefix_lengths={self.prefix.tolist()}, align={self.align!r})"


def prefix_lm(prefix_lengths, align: str = "bottom_right") -> Mask:
    """Prefix LM (T5/UL2, PaliGemma): the first ``prefix_lengths[b]`` keys are visible to every query (a
    bidirectional prefix), the rest causally. An int applies to every batch row; ``(B,)`` ints per row."""
    return PrefixLM(prefix_lengths, align)


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

    def _version(self):
        return self.t._version  # the caller's tensor is read, not copied: classes follow its in-place edits

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        target = (B, H, Nq, Nk)
        if q_offset is None and k_offset == 0:
            for got, want in zip(self.t.shape, target):
                if got != 1 and got != want:
                    raise ValueError(f"mask: shape {tuple(self.t.shape)} is not broadcastable to (B, H, Nq, Nk) "
                                     f"= {target}")
            return
        for d in (0, 1):
            if self.t.shape[d] not in (1, target[d]):
                raise ValueError(f"mask: shape {tuple(self.t.shape)} is not broadcastable to (B, H, Nq, Nk) = "
                                 f"{target} in dim {d}")
        q0 = query_start("top_left", Nq, Nk, q_offset, k_offset)
        _check_positions("mask tensor", q0, Nq, None if self.t.shape[2] == 1 else self.t.shape[2],
                         k_offset, Nk, None if self.t.shape[3] == 1 else self.t.shape[3])

    def _window(self, Nq, Nk, q_offset, k_offset) -> Tensor:
        """The part of the tensor the call's positions read, (Bm, Hm, Nq|1, Nk|1): a view."""
        q0 = query_start("top_left", Nq, Nk, q_offset, k_offset)
        t = self.t
        if t.shape[2] != 1:
            t = t[:, :, q0:q0 + Nq]
        if t.shape[3] != 1:
            t = t[:, :, :, k_offset:k_offset + Nk]
        return t

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        t = self._window(Nq, Nk, q_offset, k_offset)
        qi = q_idx[:, 0] if t.shape[2] != 1 else q_idx[:1, 0] * 0
        ki = k_idx[0] if t.shape[3] != 1 else k_idx[0, :1] * 0
        return t.index_select(2, qi.to(t.device)).index_select(3, ki.to(t.device))

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        w = self._window(Nq, Nk, q_offset, k_offset)
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        pq, pk = nqb * block_q - Nq, nkb * block_k - Nk
        rows = []
        # a chunk of block rows at a time: the padded copies stay O(chunk · Nk), not O(Nq · Nk)
        step = max(1, (1 << 24) // max(1, w.shape[0] * w.shape[1] * block_q * (Nk + pk)))
        for qb0 in range(0, nqb, step):
            qb1 = min(nqb, qb0 + step)
            r0, r1 = qb0 * block_q, min(Nq, qb1 * block_q)
            t = w if w.shape[2] == 1 else w[:, :, r0:r1]
            t = t.expand(w.shape[0], w.shape[1], r1 - r0, Nk)
            pad_q = (qb1 - qb0) * block_q - (r1 - r0)
            anyv = torch.nn.functional.pad(t, (0, pk, 0, pad_q), value=False)
            allv = torch.nn.functional.pad(t, (0, pk, 0, pad_q), value=True)
            shp = (t.shape[0], t.shape[1], qb1 - qb0, block_q, nkb, block_k)
            anyb = anyv.reshape(shp).any(5).any(3)
            allb = allv.reshape(shp).all(5).all(3)
            rows.append(torch.where(allb, FULL, torch.where(anyb, PARTIAL, EMPTY)).to(torch.int8))
        if not rows:
            return torch.zeros(w.shape[0], w.shape[1], 0, nkb, dtype=torch.int8, device=device)
        return torch.cat(rows, dim=2)

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        return _atom("dense", query_start("top_left", Nq, Nk, q_offset, k_offset), k_offset, t=self.t)

    def __repr__(self):
        return f"from_tensor(shape={tuple(self.t.shape)})"


def from_tensor(t: Tensor) -> Mask:
    """Wrap a dense bool tensor (True = may attend) broadcastable to (B, H, Nq, Nk)."""
    return FromTensor(t)


def _combine_classes(a: Tensor, b: Tensor, op: str) -> Tensor:
    bm, hm = torch.broadcast_shapes(a.shape[:2], b.shape[:2])  # (1 or B, 1 or H); B may be 0
    a = a.expand(bm, hm, *a.shape[2:])
    b = b.expand(bm, hm, *b.shape[2:])
    if op == "and":  # empty if either is empty, full only if both are full
        return torch.where((a == EMPTY) | (b == EMPTY), EMPTY,
                           torch.where((a == FULL) & (b == FULL), FULL, PARTIAL)).to(torch.int8)
    return torch.where((a == FULL) | (b == FULL), FULL,
                       torch.where((a == EMPTY) & (b == EMPTY), EMPTY, PARTIAL)).to(torch.int8)


def _fuse(a: Mask, b: Mask, op: str) -> Optional[Mask]:
    """One mask equal to ``a op b`` that is cheaper per tile, or None. ``sliding_window(l, r) & causal()``, the
    common spelling of a causal window, becomes ``sliding_window(l, 0)``: one tile of compares fewer per
    partial tile."""
    if op != "and":
        return None
    for w, c in ((a, b), (b, a)):
        if isinstance(w, SlidingWindow) and isinstance(c, Causal) and w.align == c.align:
            return SlidingWindow(w.left, 0, w.align)
    return None


def _lower_combined(parts, op):
    atoms, prog = [], []
    for lw in parts:
        prog += [x + len(atoms) if isinstance(x, int) else x for x in lw.program]
        atoms += lw.atoms
    return Lowered(atoms, prog + [op])


class AndMask(Mask):
    """Allowed where both masks allow."""
    _op = "and"

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self._fused = _fuse(a, b, self._op)

    def _version(self):
        return (self.a._version(), self.b._version())

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        if self._fused is not None:
            return self._fused.mask_mod(q_idx, k_idx, Nq, Nk, q_offset, k_offset)
        ma = eval_mask(self.a, q_idx, k_idx, Nq, Nk, q_offset, k_offset)
        mb = eval_mask(self.b, q_idx, k_idx, Nq, Nk, q_offset, k_offset)
        return (ma & mb) if self._op == "and" else (ma | mb)

    def _row_ranges(self, B, H, Nq, Nk, block_q, block_k, q_offset, k_offset):
        if self._fused is not None:
            return self._fused._row_ranges(B, H, Nq, Nk, block_q, block_k, q_offset, k_offset)
        if self._op != "and":
            return None
        ra = self.a._row_ranges(B, H, Nq, Nk, block_q, block_k, q_offset, k_offset)
        rb = self.b._row_ranges(B, H, Nq, Nk, block_q, block_k, q_offset, k_offset)
        if ra is None or rb is None:
            return None
        # intersection of intervals: non-empty where both are non-empty, full where both are full
        lo, hi = torch.maximum(ra[0], rb[0]), torch.minimum(ra[1], rb[1])
        flo, fhi = torch.maximum(ra[2], rb[2]), torch.minimum(ra[3], rb[3])
        return lo, torch.maximum(hi, lo), flo, torch.maximum(fhi, flo)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        if self._fused is not None:
            return self._fused.block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset)
        return _combine_classes(self.a.block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset),
                                self.b.block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset),
                                self._op)

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        if self._fused is not None:
            return self._fused.lower(Nq, Nk, q_offset, k_offset)
        return _lower_combined([self.a.lower(Nq, Nk, q_offset, k_offset), self.b.lower(Nq, Nk, q_offset, k_offset)],
                               self._op)

    @property
    def batch_size(self):
        return max(self.a.batch_size, self.b.batch_size)

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        self.a.check_shape(B, H, Nq, Nk, q_offset, k_offset)
        self.b.check_shape(B, H, Nq, Nk, q_offset, k_offset)

    def __repr__(self):
        sym = "&" if self._op == "and" else "|"
        return f"({self.a!r} {sym} {self.b!r})"


class OrMask(AndMask):
    """Allowed where either mask allows."""
    _op = "or"


class NotMask(Mask):
    """Allowed where the inner mask masks (``~m``)."""

    def __init__(self, inner: Mask):
        self.inner = _as_mask(inner, "inner")

    def _version(self):
        return self.inner._version()

    @property
    def batch_size(self):
        return self.inner.batch_size

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        self.inner.check_shape(B, H, Nq, Nk, q_offset, k_offset)

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        return ~eval_mask(self.inner, q_idx, k_idx, Nq, Nk, q_offset, k_offset)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        c = self.inner.block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset)
        return (FULL - c).to(torch.int8)  # EMPTY <-> FULL, PARTIAL stays (EMPTY=0, PARTIAL=1, FULL=2)

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        lw = self.inner.lower(Nq, Nk, q_offset, k_offset)
        return Lowered(lw.atoms, list(lw.program) + ["not"])

    def __repr__(self):
        return f"~{self.inner!r}"
