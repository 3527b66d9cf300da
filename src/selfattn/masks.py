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
raises ValueError when the mask's own data (lengths, ids, a tensor) does not fit a call, and ``check_device``
when that data sits on a device the call cannot read; ``attention`` calls both. Neither reads tensor data (the
traced path of ``attention`` must not): shapes, devices and host-side numbers captured at construction (lengths
given as a list, or as a CPU tensor outside tracing) only. The checks that need values the host never saw
(lengths of a CUDA tensor) are ``check_data``, which the kernel op runs inside its implementation.

Hardening: offsets beyond ±MAX_OFFSET are refused and window sides, lengths and prefix lengths beyond UNBOUNDED
clamped, so position arithmetic stays inside int64 on every kernel; every walk over a tree of ``&``, ``|``, ``~``
is iterative (any depth) and its lowering orders operands to need a shallow evaluation stack; ``tile_counts``
of causal, window and length-padding masks and their ``&`` is closed-form (O(1) memory at any length).

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
# Position arithmetic stays inside int64 on every kernel (the C and Triton ones included): offsets are refused
# beyond ±MAX_OFFSET, and window sides, lengths and prefix lengths at or above UNBOUNDED are clamped to it (a side
# or length that reaches past every position is "no limit"). Then |position ± side| < 2**60 + N + 2**62 < 2**63.
MAX_OFFSET = 1 << 60
UNBOUNDED = 1 << 62

__all__ = ["EMPTY", "PARTIAL", "FULL", "Mask", "causal", "sliding_window", "key_padding", "document",
           "document_ids", "prefix_lm", "from_tensor", "summarize_classes", "Causal", "SlidingWindow",
           "KeyPadding", "Document", "PrefixLM", "FromTensor", "AndMask", "OrMask", "NotMask", "Atom", "Lowered",
           "query_start", "check_offsets", "MAX_TILES", "MAX_OFFSET", "UNBOUNDED"]


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
        Shapes, offsets and host-side summaries only (never a read of tensor data): ``attention`` calls it on
        its traced path. Shape-free masks fit all."""
        check_offsets(q_offset, k_offset)

    def check_data(self, B: int, H: int, Nq: int, Nk: int, q_offset: Optional[int] = None,
                   k_offset: int = 0) -> None:
        """Raise ValueError if the values of the mask's data do not fit the call (a length above Nk, a negative
        length given as a tensor whose values were not read at construction). Reads tensor data: the kernel op
        calls it inside its implementation, never on the traced path. Masks without data fit all."""

    def check_device(self, device) -> None:
        """Raise ValueError if a tensor the mask carries sits on a device the call's kernels cannot read: it must
        be on ``device`` (q's) or on the CPU (host data, which the lowering copies over). Shapes and devices
        only: a meta tensor or data on another accelerator is refused here, before any kernel sees it."""
        device = torch.device(device)
        for leaf in _leaves(self):
            for name, t in leaf._data():
                if t.device != device and t.device.type != "cpu":
                    raise ValueError(f"mask: {name} is on {t.device}, but the call's q is on {device} (expected "
                                     f"q's device or the CPU)")

    def _data(self) -> Tuple[Tuple[str, Tensor], ...]:
        """(argument name, tensor) for each tensor the mask reads."""
        return ()

    @property
    def cacheable(self) -> bool:
        """True when everything the mask reads is its own snapshot, so what is derived from it (tile classes)
        may be cached across calls; False when it reads a caller's tensor at each call (``from_tensor``)."""
        return all(leaf._own_data for leaf in _leaves(self))

    _own_data = True  # leaves: data copied at construction (or none); FromTensor says False

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
        if not self.cacheable:  # the caller's tensor may have changed since the last call, however it was edited
            return self._block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset)
        key = (B, H, Nq, Nk, block_q, block_k, str(device), q_offset, k_offset, self._version())
        cache = self.__dict__.setdefault("_class_cache", {})
        if key not in cache:
            if len(cache) > 32:
                cache.clear()
            cache[key] = self._block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset)
        return cache[key]

    def tile_counts(self, B: int, H: int, Nq: int, Nk: int, block_q: int, block_k: int,
                    q_offset: Optional[int] = None, k_offset: int = 0) -> Tuple[int, int, int]:
        """(total, computed, partial) tiles of the batched grid (``summarize_classes``). Masks whose block rows
        are analytic (causal, window, padding by lengths known on the host, and their &) answer in closed form:
        O(log) time and O(1) memory at any length. Others classify the grid (at most MAX_TILES tiles)."""
        block_q, block_k = _check_block("block_q", block_q), _check_block("block_k", block_k)
        nqb, nkb = _ceil_div(Nq, block_q), _ceil_div(Nk, block_k)
        spec = self._band(Nq, Nk, q_offset, k_offset)
        if spec is not None:
            computed, full = _band_counts(spec, Nq, Nk, block_q, block_k)
            return nqb * nkb, computed, computed - full
        if nqb * nkb > MAX_TILES:
            raise ValueError(f"tile_counts: {nqb}x{nkb} tiles for {self!r} at Nq={Nq}, Nk={Nk} exceeds {MAX_TILES} "
                             f"(this mask has no analytic tile count); use larger blocks")
        kinds = summarize_classes(self.block_classes(B, H, Nq, Nk, block_q, block_k, None, q_offset, k_offset))
        return nqb * nkb, int((kinds != EMPTY).sum()), int((kinds == PARTIAL).sum())

    def _band(self, Nq: int, Nk: int, q_offset: Optional[int], k_offset: int) -> Optional["_Band"]:
        """The mask's batched block rows in closed form (``_Band``), or None when it cannot say so from shapes
        and host-side numbers alone."""
        return None

    def _row_ranges(self, B, H, Nq, Nk, block_q, block_k, q_offset, k_offset):
        """Per q block, the non-empty and the full k-block ranges [lo, hi), [flo, fhi) as four lists of python
        ints (nqb each: for few blocks; counts at any size use ``tile_counts``), or None when the mask has no
        analytic block rows. Reads no tensor data."""
        spec = self._band(Nq, Nk, q_offset, k_offset)
        if spec is None:
            return None
        nkb = _ceil_div(Nk, block_k)
        rows = [spec.row(qs, min(Nq, qs + block_q) - 1, Nk, block_k, nkb) for qs in range(0, Nq, block_q)]
        return tuple([r[i] for r in rows] for i in range(4))

    def allows_everything(self, Nq: int, Nk: int, q_offset: Optional[int] = None, k_offset: int = 0) -> bool:
        """True when the mask is known, from shapes and host-side numbers alone, to allow every entry of a
        non-empty call (a decode step's causal mask): one tile covering the call is FULL. O(1), no data read."""
        if Nq == 0 or Nk == 0:
            return False
        spec = self._band(Nq, Nk, q_offset, k_offset)
        return spec is not None and spec.row(0, Nq - 1, Nk, Nk, 1)[2:] == (0, 1)

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
    check_offsets(q_offset, k_offset)
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

    @property
    def stack_depth(self) -> int:
        """The deepest evaluation stack the program reaches (what an evaluator must hold)."""
        return _stack_need(self.program)

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


def check_offsets(q_offset: Optional[int], k_offset: int) -> None:
    """Raise ValueError naming the argument for offsets beyond ±MAX_OFFSET: they would push position arithmetic
    (masks, modifiers, dropout) out of int64 on some kernel. Every built-in mask checks its call's offsets."""
    for name, x in (("q_offset", q_offset), ("k_offset", k_offset)):
        if x is not None and not -MAX_OFFSET <= x <= MAX_OFFSET:
            raise ValueError(f"{name}: expected a position within ±2**60 (positions must stay inside int64 on "
                             f"every kernel), got {x}")


def _host_readable(x: Tensor) -> bool:
    """Values of x may be read now: a CPU tensor outside tracing (construction in eager code). Otherwise the
    checks that need them run inside the kernel op (``Mask.check_data``)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _int_tensor(name: str, x, dims: Tuple[int, ...], nonneg: bool, clamp: bool = False):
    """An int sequence or int tensor with one of ``dims`` dimensions -> (int64 tensor on x's device, host range).

    The tensor is a snapshot (later in-place edits of the caller's tensor change nothing). ``clamp``: values
    above UNBOUNDED mean "no limit" and are clamped to it. The host range (min, max) as python ints, when the
    values were read here (a list, or a CPU tensor outside tracing), else None; so is the non-negative check:
    unread values are checked by ``check_data`` inside the kernel op."""
    if isinstance(x, (list, tuple)):
        flat = x
        while flat and isinstance(flat[0], (list, tuple)):
            flat = [e for row in flat for e in row]
        bad = next((e for e in flat if isinstance(e, bool) or not isinstance(e, int)), None)
        if bad is not None:
            raise TypeError(f"{name}: expected ints, got an element {bad!r} of type {type(bad).__name__}")
        if nonneg and flat and min(flat) < 0:
            raise ValueError(f"{name}: expected non-negative values, got min {min(flat)}")
        if clamp:
            x = [[min(e, UNBOUNDED) for e in r] if isinstance(r, (list, tuple)) else min(r, UNBOUNDED) for r in x]
        elif flat and not -(1 << 63) <= min(flat) <= max(flat) < (1 << 63):
            bad = min(flat) if min(flat) < -(1 << 63) else max(flat)
            raise ValueError(f"{name}: expected values inside int64, got {bad}")
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
    if clamp:
        x = x.clamp_(max=UNBOUNDED)
    if not (nonneg or clamp) or not _host_readable(x):
        return x, None  # ids take any values: nothing to read
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
    if nonneg and lo < 0:
        raise ValueError(f"{name}: expected non-negative values, got min {lo}")
    return x, (lo, hi)


def _values(x: Tensor) -> str:
    """The values for a repr when the host may read them, else the shape (a repr never reads under tracing)."""
    return str(x.tolist()) if _host_readable(x) else f"<{tuple(x.shape)} on {x.device}>"


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

    def _band(self, Nq, Nk, q_offset, k_offset):
        return _Band(upper=self.offset(Nq, Nk, q_offset, k_offset))

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


def _floor_sum(n: int, m: int, a: int, b: int) -> int:
    """sum over i in [0, n) of floor((a·i + b) / m), m > 0, any integers a, b: exact (python ints), O(log)."""
    total = 0
    if a < 0:
        a2 = a % m
        total -= n * (n - 1) // 2 * ((a2 - a) // m)
        a = a2
    if b < 0:
        b2 = b % m
        total -= n * ((b2 - b) // m)
        b = b2
    while True:
        if a >= m:
            total += n * (n - 1) // 2 * (a // m)
            a %= m
        if b >= m:
            total += n * (b // m)
            b %= m
        y = a * n + b
        if y < m:
            return total
        n, b, m, a = y // m, y % m, a, m


class _Band:
    """The batched block rows of causal, window and length-padding masks (and their &) in closed form.

    With qs, qe the first and last query row of a block and j a local key, some row of the block may see keys
    ``j >= qs + lower`` and ``j <= qe + upper`` (None: unbounded), and ``j < any_max`` (padding: the longest
    row); every row sees ``[qe + lower, qs + upper]`` and ``j < all_min`` (the shortest row). An & of two bands
    takes the tighter edge of each kind: exactly the intersection of their tile ranges (a tile is non-empty
    when both call it non-empty, full when both call it full, as ``_combine_classes``) as long as at most one
    side differs between batch rows (``any_max != all_min``); otherwise the & has no band (None)."""
    __slots__ = ("lower", "upper", "any_max", "all_min")

    def __init__(self, lower=None, upper=None, any_max=None, all_min=None):
        self.lower, self.upper, self.any_max, self.all_min = lower, upper, any_max, all_min

    def __and__(self, o: "_Band") -> Optional["_Band"]:
        if self.any_max != self.all_min and o.any_max != o.all_min:
            return None  # row b keeps min(a_b, b_b) keys: the batched summary is not the two summaries' &

        def tight(x, y, pick):
            return y if x is None else x if y is None else pick(x, y)
        return _Band(tight(self.lower, o.lower, max), tight(self.upper, o.upper, min),
                     tight(self.any_max, o.any_max, min), tight(self.all_min, o.all_min, min))

    def caps(self, Nk: int, bk: int, nkb: int) -> Tuple[int, int]:
        """k blocks [0, hcap) may be non-empty, [0, fcap) full, as far as padding says."""
        hcap = nkb if self.any_max is None else min(nkb, max(0, _ceil_div(self.any_max, bk)))
        fcap = nkb if self.all_min is None or self.all_min >= Nk else min(nkb, max(0, self.all_min // bk))
        return hcap, min(fcap, hcap)

    def row(self, qs: int, qe: int, Nk: int, bk: int, nkb: int) -> Tuple[int, int, int, int]:
        """(lo, hi, flo, fhi) of the block of query rows qs..qe: non-empty k blocks [lo, hi), full [flo, fhi)."""
        hcap, fcap = self.caps(Nk, bk, nkb)
        L, R = self.lower, self.upper
        lo = 0 if L is None else (nkb if qs + L >= Nk else min(nkb, max(0, (qs + L) // bk)))
        hi = hcap if R is None else min(hcap, max(0, (qe + R) // bk + 1))
        flo = 0 if L is None else min(nkb, max(0, _ceil_div(qe + L, bk)))
        fhi = fcap if R is None else min(fcap, nkb if qs + R >= Nk - 1 else max(0, (qs + R + 1) // bk))
        return lo, max(hi, lo), flo, max(fhi, flo)


def _band_counts(spec: _Band, Nq: int, Nk: int, bq: int, bk: int) -> Tuple[int, int]:
    """(non-empty, full) tiles of the batched grid: the sums of ``spec.row`` over every q block in closed form.

    Over the whole q blocks x (qs = bq·x, qe = qs + bq − 1) each edge is clamp(floor((bq·x + c) / bk)) with one
    slope, so two edges differ by a constant up to rounding, and the clamps switch at q blocks found by one
    division each: the sums are a few ``_floor_sum`` calls. The ragged last q block is added row by row."""
    nkb = _ceil_div(Nk, bk)
    if Nq <= 0 or nkb == 0:
        return 0, 0
    hcap, fcap = spec.caps(Nk, bk, nkb)
    L, R = spec.lower, spec.upper
    n = Nq // bq  # whole q blocks

    def first(c: int, v: int) -> int:  # the first x with bq·x + c >= v
        return -((c - v) // bq)

    def fsum(x0: int, x1: int, c: int, cap: int) -> int:  # sum over x in [x0, x1) of clamp(floor((bq·x+c)/bk), 0, cap)
        if x1 <= x0:
            return 0
        t1 = min(x1, max(x0, first(c, 0)))  # before t1 the floor is negative: 0
        t2 = min(x1, max(t1, first(c, cap * bk)))  # from t2 on it is at least cap: cap
        return _floor_sum(t2 - t1, bk, bq, c + bq * t1) + (x1 - t2) * cap

    def pair(x0: int, x1: int, c_hi, cap: int, c_lo) -> int:
        """sum over x in [x0, x1) of max(hi − lo, 0): hi = clamp(floor((bq·x + c_hi)/bk), 0, cap) (cap when
        c_hi is None), lo = clamp(floor((bq·x + c_lo)/bk), 0, nkb) (0 when c_lo is None)."""
        if x1 <= x0:
            return 0
        if c_lo is None:
            return (x1 - x0) * cap if c_hi is None else fsum(x0, x1, c_hi, cap)
        if c_hi is not None and c_hi < c_lo:
            return 0  # hi's floor never exceeds lo's: no tile
        # with hi's floor >= lo's, hi − lo >= 0 exactly while lo <= cap; from there on both are clamped: none
        x2 = x1 if cap >= nkb else min(x1, max(x0, first(c_lo, (cap + 1) * bk)))
        his = (x2 - x0) * cap if c_hi is None else fsum(x0, x2, c_hi, cap)
        return his - fsum(x0, x2, c_lo, nkb)

    # non-empty: lo = floor((qs + L)/bk) (nkb once qs + L >= Nk), hi = floor((qe + R)/bk) + 1
    tA = n if L is None else min(n, max(0, first(L, Nk)))
    comp = pair(0, tA, None if R is None else bq - 1 + R + bk, hcap, L)
    # full: flo = ceil((qe + L)/bk), fhi = floor((qs + R + 1)/bk) (every block once qs + R >= Nk − 1)
    c_flo = None if L is None else bq - 1 + L + bk - 1
    tB = 0 if R is None else min(n, max(0, first(R, Nk - 1)))
    full = pair(0, tB, None if R is None else R + 1, fcap, c_flo) + pair(tB, n, None, fcap, c_flo)
    if Nq % bq:
        lo, hi, flo, fhi = spec.row(n * bq, Nq - 1, Nk, bk, nkb)
        comp, full = comp + hi - lo, full + fhi - flo
    return comp, full


class SlidingWindow(Mask):
    """Key j is allowed for query i when qp − left <= kp <= qp + right (global positions, ``query_start``:
    qp − kp = i + Nk − Nq − j bottom-right, i − j top-left, when no offsets are given). ``right=0`` is causal."""

    def __init__(self, left: int, right: int = 0, align: str = "bottom_right"):
        # a side of UNBOUNDED or more reaches past every position ("no limit"): clamped, arithmetic stays in int64
        self.left = min(_check_nonneg_int("left", left), UNBOUNDED)
        self.right = min(_check_nonneg_int("right", right), UNBOUNDED)
        self.align = _check_align(align)

    def _off(self, Nq, Nk, q_offset, k_offset):
        return query_start(self.align, Nq, Nk, q_offset, k_offset) - k_offset

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        off = self._off(Nq, Nk, q_offset, k_offset)
        # two broadcast compares write bool tiles directly: no (Tq, Tk) int64 distance tensor (8x the bytes)
        return (k_idx >= q_idx + (off - self.left)) & (k_idx <= q_idx + (off + self.right))  # (Tq, Tk)

    def _band(self, Nq, Nk, q_offset, k_offset):
        off = self._off(Nq, Nk, q_offset, k_offset)
        return _Band(off - self.left, off + self.right)

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
    ``sliding_window(w, r) & causal()`` clips the right side to the causal limit. Sides of ``UNBOUNDED`` (2**62)
    or more (``sys.maxsize``, 2**64) mean "no limit" and are clamped to it."""
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
            self._range = None
        else:
            self.keep = None
            # (B,) and the (min, max) length as python ints when read here (None: checked in the kernel op)
            self.lengths, self._range = _int_tensor("key_padding lengths", x, (1,), nonneg=True, clamp=True)

    @property
    def batch_size(self):
        return (self.keep if self.keep is not None else self.lengths).shape[0]

    def _data(self):
        return (("key_padding keep-mask", self.keep),) if self.keep is not None else \
            (("key_padding lengths", self.lengths),)

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        check_offsets(q_offset, k_offset)
        _check_batch("key_padding", self.batch_size, B)
        if self.keep is not None:
            if q_offset is None and k_offset == 0 and self.keep.shape[1] != Nk:
                raise ValueError(f"key_padding: keep-mask has {self.keep.shape[1]} keys per row, but the call "
                                 f"has Nk={Nk}")
            _check_positions("key_padding keep-mask", 0, 0, None, k_offset, Nk, self.keep.shape[1])
        elif q_offset is None and k_offset == 0 and self._range is not None and self._range[1] > Nk:
            raise ValueError(f"key_padding: a length {self._range[1]} exceeds the call's Nk={Nk}")

    def check_data(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        if self.lengths is None or self._range is not None or not self.lengths.numel():
            return  # checked at construction
        lo, hi = int(self.lengths.min()), int(self.lengths.max())
        if lo < 0:
            raise ValueError(f"key_padding lengths: expected non-negative values, got min {lo}")
        if q_offset is None and k_offset == 0 and hi > Nk:
            raise ValueError(f"key_padding: a length {hi} exceeds the call's Nk={Nk}")

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        kp = k_idx + k_offset
        if self.keep is not None:
            keep = self.keep.to(k_idx.device)
            return keep.index_select(1, kp[0])[:, None, None, :]  # (B, 1, 1, Tk)
        return kp[None, None] < self.lengths.to(k_idx.device)[:, None, None, None]  # (B, 1, 1, Tk)

    def _band(self, Nq, Nk, q_offset, k_offset):
        if self.keep is not None or self._range is None:
            return None  # a keep-mask, or lengths whose values were not on the host at construction
        # batched: a k block is non-empty if some row keeps a key of it, full if every row keeps all of it
        lmin, lmax = self._range
        return _Band(any_max=lmax - k_offset, all_min=lmin - k_offset)

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
        return f"key_padding(lengths={_values(self.lengths)})"


def key_padding(lengths_or_bool) -> Mask:
    """Padded batches: ``(B,)`` lengths (keys ``j < lengths[b]`` kept) or a ``(B, Nk)`` bool keep-mask (True =
    real token). A row with length 0 sees no key: its output is 0. Lengths of ``UNBOUNDED`` or more are clamped
    to it. Both are copied (later edits of the caller's tensor change nothing)."""
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
    L, rng = _int_tensor("document_ids lengths", lengths, (1,), nonneg=True)  # (ndocs,)
    if rng is None and L.numel() and bool((L < 0).any()):  # a helper that builds ids: it reads the lengths anyway
        raise ValueError(f"document_ids lengths: expected non-negative values, got min {int(L.min())}")
    return torch.repeat_interleave(torch.arange(L.shape[0], dtype=torch.int64, device=L.device), L)  # (N,)


class Document(Mask):
    """Packed sequences: key j is allowed for query i when ids_q[b, qp] == ids_k[b, kp] (global positions;
    top-left, qp = i and kp = j, when no offsets are given)."""

    def __init__(self, ids_q, ids_k=None):
        iq = _int_tensor("document ids_q", ids_q, (1, 2), nonneg=False)[0]
        ik = iq if ids_k is None else _int_tensor("document ids_k", ids_k, (1, 2), nonneg=False)[0]
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

    def _data(self):
        return (("document ids_q", self.ids_q), ("document ids_k", self.ids_k))

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        check_offsets(q_offset, k_offset)
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
        self.prefix, self._range = _int_tensor("prefix_lm prefix_lengths", prefix_lengths, (1,), nonneg=True,
                                               clamp=True)  # (Bp,)
        self.align = _check_align(align)

    @property
    def batch_size(self):
        return self.prefix.shape[0]

    def _data(self):
        return (("prefix_lm prefix_lengths", self.prefix),)

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        check_offsets(q_offset, k_offset)
        _check_batch("prefix_lm", self.batch_size, B)
        if q_offset is None and k_offset == 0 and self._range is not None and self._range[1] > Nk:
            raise ValueError(f"prefix_lm: a prefix length {self._range[1]} exceeds the call's Nk={Nk}")

    def check_data(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        if self._range is not None or not self.prefix.numel():
            return  # checked at construction
        lo, hi = int(self.prefix.min()), int(self.prefix.max())
        if lo < 0:
            raise ValueError(f"prefix_lm prefix_lengths: expected non-negative values, got min {lo}")
        if q_offset is None and k_offset == 0 and hi > Nk:
            raise ValueError(f"prefix_lm: a prefix length {hi} exceeds the call's Nk={Nk}")

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
        return f"prefix_lm(prefix_lengths={_values(self.prefix)}, align={self.align!r})"


def prefix_lm(prefix_lengths, align: str = "bottom_right") -> Mask:
    """Prefix LM (T5/UL2, PaliGemma): the first ``prefix_lengths[b]`` keys are visible to every query (a
    bidirectional prefix), the rest causally. An int applies to every batch row; ``(B,)`` ints per row. Lengths
    of ``UNBOUNDED`` or more are clamped to it (every key)."""
    return PrefixLM(prefix_lengths, align)


class FromTensor(Mask):
    """A dense bool mask given by the caller, broadcastable to (B, H, Nq, Nk).

    The caller's tensor is read, not copied (no second N² copy), and read afresh by every call: its tile classes
    are not cached across calls (``cacheable`` is False), so a call always sees the tensor as it is when the
    call runs, however it was edited in between (torch in-place ops, numpy through ``.numpy()``, ``.data``:
    edits torch's version counter does not see). Edit it between calls, never between a forward and its
    backward (the backward reads it again)."""

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

    _own_data = False  # the caller's tensor, read at each call: nothing derived from it is cached across calls

    def _version(self):
        return self.t._version

    def _data(self):
        return (("mask tensor", self.t),)

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        check_offsets(q_offset, k_offset)
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
        pk = nkb * block_k - Nk
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
    """Wrap a dense bool tensor (True = may attend) broadcastable to (B, H, Nq, Nk). The tensor is read by
    every call, as it is then (see ``FromTensor``)."""
    return FromTensor(t)


def as_mask(mask, name: str = "mask") -> Optional[Mask]:
    """None, a ``selfattn.masks`` object, or a bool tensor (True = may attend; left-padded to 4 dims like
    ``attention``) -> a mask object or None: what layers and the distributed entry points accept as a mask."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"{name}: expected a bool tensor (True = may attend) or a selfattn.masks object, got "
                            f"dtype {mask.dtype}, shape {tuple(mask.shape)}")
        return FromTensor(mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)))
    raise TypeError(f"{name}: expected None, a bool tensor or a selfattn.masks object, got {type(mask).__name__}")


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


def _children(m: Mask) -> tuple:
    """The sub-masks a combinator evaluates (a fused & evaluates its one fused mask); () for a leaf."""
    if isinstance(m, NotMask):
        return (m.inner,)
    if isinstance(m, AndMask):
        return (m._fused,) if m._fused is not None else (m.a, m.b)
    return ()


def _op(m: Mask) -> str:
    return "fused" if getattr(m, "_fused", None) is not None else m._op


def _walk(mask: Mask):
    """(postorder, leaves) of a mask tree, built once per mask without recursion and kept on it (combinators are
    immutable): postorder lists each distinct sub-mask after its children as (mask, child positions); leaves are
    the distinct leaves left to right. A sub-mask shared by several parents appears once."""
    cached = mask.__dict__.get("_walk_cache")
    if cached is not None:
        return cached
    pos, order, stack = {}, [], [mask]
    while stack:
        m = stack[-1]
        if id(m) in pos:
            stack.pop()
            continue
        kids = _children(m)
        todo = [c for c in reversed(kids) if id(c) not in pos]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        pos[id(m)] = len(order)
        order.append((m, tuple(pos[id(c)] for c in kids)))
    leaves = [m for m, kids in order if not kids]
    mask.__dict__["_walk_cache"] = (order, leaves)
    return order, leaves


def _fold(mask: Mask, leaf, node):
    """``leaf(m)`` for each leaf, ``node(m, [child values])`` for each combinator, children first, without
    recursion (masks built in a loop nest thousands deep); a sub-mask shared by several parents is evaluated
    once."""
    order, _ = _walk(mask)
    vals = []
    for m, kids in order:
        vals.append(node(m, [vals[k] for k in kids]) if kids else leaf(m))
    return vals[-1]


def _leaves(mask: Mask) -> list:
    """The distinct leaves of a mask, left to right (the mask itself when it is not a combinator)."""
    return _walk(mask)[1] if _children(mask) else [mask]


def _combine(op: str, vals, and_, or_, not_):
    if op == "fused":
        return vals[0]
    if op == "not":
        return not_(vals[0])
    return and_(*vals) if op == "and" else or_(*vals)


def _stack_need(program) -> int:
    depth = need = 0
    for x in program:
        depth += 1 if isinstance(x, int) else (0 if x == "not" else -1)
        need = max(need, depth)
    return need


# the most atoms a lowering may hold (a sub-mask used twice is lowered twice: ``m = m & m`` in a loop doubles)
MAX_ATOMS = 1 << 16


def _lower_tree(mask: Mask, Nq: int, Nk: int, q_offset, k_offset) -> "Lowered":
    """The postfix program of a combinator tree, built without recursion. Of the two operands of & and |
    (commutative), the one whose program needs the deeper evaluation stack is emitted first (Sethi-Ullman), so a
    mask built in a loop (``m = key_padding(...) & m``) needs a stack of 2, not one level per &."""
    if getattr(mask, "_fused", None) is not None:
        return mask._fused.lower(Nq, Nk, q_offset, k_offset)  # a causal window: one atom
    leaf_lw, need, count = {}, {}, {}

    def leaf(m):
        lw = m.lower(Nq, Nk, q_offset, k_offset)
        leaf_lw[id(m)] = lw
        need[id(m)], count[id(m)] = _stack_need(lw.program), len(lw.atoms)
        return None

    def node(m, _):
        kids = _children(m)
        if len(kids) == 1:
            need[id(m)], count[id(m)] = need[id(kids[0])], count[id(kids[0])]
        else:
            x, y = sorted((need[id(kids[0])], need[id(kids[1])]), reverse=True)
            need[id(m)], count[id(m)] = max(x, y + 1), count[id(kids[0])] + count[id(kids[1])]
        if count[id(m)] > MAX_ATOMS:
            raise ValueError(f"mask: lowers to more than {MAX_ATOMS} atoms (a sub-mask used many times over, e.g. "
                             f"m = m & m in a loop); build it from distinct parts")
        return None

    _fold(mask, leaf, node)
    atoms, prog = [], []
    stack = [(mask, False)]
    while stack:
        m, expanded = stack.pop()
        kids = _children(m)
        if not kids:
            base, lw = len(atoms), leaf_lw[id(m)]
            atoms.extend(lw.atoms)
            prog.extend(x + base if isinstance(x, int) else x for x in lw.program)
        elif expanded:
            if _op(m) != "fused":
                prog.append(_op(m))
        else:
            stack.append((m, True))
            if len(kids) == 2 and need[id(kids[1])] > need[id(kids[0])]:
                kids = kids[::-1]  # the deeper operand first
            stack.extend((c, False) for c in reversed(kids))
    return Lowered(atoms, prog)


class _Combinator(Mask):
    """&, | and ~. Every walk over a tree of them (evaluation, classes, lowering, checks, repr) is iterative
    (``_fold``, ``_leaves``): masks nest to any depth."""

    def _version(self):
        return tuple(leaf._version() for leaf in _leaves(self))

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        return _fold(self, lambda m: eval_mask(m, q_idx, k_idx, Nq, Nk, q_offset, k_offset),
                     lambda m, v: _combine(_op(m), v, torch.logical_and, torch.logical_or, torch.logical_not))

    def _band(self, Nq, Nk, q_offset, k_offset):
        return _fold(self, lambda m: m._band(Nq, Nk, q_offset, k_offset),
                     lambda m, v: _combine(_op(m), v, lambda a, b: None if a is None or b is None else a & b,
                                           lambda a, b: None, lambda a: None))

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        return _fold(self, lambda m: m.block_classes(B, H, Nq, Nk, block_q, block_k, device, q_offset, k_offset),
                     lambda m, v: _combine(_op(m), v, lambda a, b: _combine_classes(a, b, "and"),
                                           lambda a, b: _combine_classes(a, b, "or"),
                                           lambda c: (FULL - c).to(torch.int8)))  # EMPTY <-> FULL

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        return _lower_tree(self, Nq, Nk, q_offset, k_offset)

    @property
    def batch_size(self):
        return max(leaf.batch_size for leaf in _leaves(self))

    def _data(self):
        return tuple(d for leaf in _leaves(self) for d in leaf._data())

    def check_shape(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        check_offsets(q_offset, k_offset)
        for leaf in _leaves(self):
            if q_offset is None and k_offset == 0:  # masks written before offsets existed take four arguments
                leaf.check_shape(B, H, Nq, Nk)
            else:
                leaf.check_shape(B, H, Nq, Nk, q_offset, k_offset)

    def check_data(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        for leaf in _leaves(self):
            leaf.check_data(B, H, Nq, Nk, q_offset, k_offset)

    def __repr__(self):
        return _fold(self, repr, lambda m, v: _combine(_op(m), v, lambda a, b: f"({a} & {b})",
                                                          lambda a, b: f"({a} | {b})", lambda a: f"~{a}")
                     if _op(m) != "fused" else f"({m.a!r} & {m.b!r})")


class AndMask(_Combinator):
    """Allowed where both masks allow."""
    _op = "and"

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b
        self._fused = _fuse(a, b, self._op)


class OrMask(AndMask):
    """Allowed where either mask allows."""
    _op = "or"


class NotMask(_Combinator):
    """Allowed where the inner mask masks (``~m``)."""
    _op = "not"

    def __init__(self, inner: Mask):
        self.inner = _as_mask(inner, "inner")
