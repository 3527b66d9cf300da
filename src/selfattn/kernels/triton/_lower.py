"""Host side of the Triton kernels: the call lowered into the flat tensors and compile-time constants they read.
Plain torch (no triton import), so ``why_not`` can ask every question here without triton installed.

* tile lists -- per (batch row, head, q block) the non-empty k blocks in ascending order, a flag per entry that the
  tile is FULL (no mask evaluation), and their count: FlexAttention's ``kv_indices`` / ``full_kv_indices`` in one
  list. The transposed lists (per k block the non-empty q blocks) drive the dK/dV kernel. Size O(nqb · nkb) per
  distinct (Bm, Hm) -- 1 KiB for 16k tokens at 128 x 64 tiles.
* mask atoms -- ``masks.Lowered`` as 16 int64 parameters per atom and its data tensors (lengths, ids, keep masks,
  a dense bool tensor read in place where it is the only uint8 data), plus the truth table of the program.
* modifiers -- ALiBi by slope and distance shift (evaluated in the kernel), T5 buckets as a per-head table over
  the Nq + Nk - 1 key-query distances (one gather per score), softcap by its cap.

Shape legend: B batch, Hq/Hkv heads, Nq/Nk lengths, Bm/Hm batch/head rows of the tile classes (1 or B / Hq),
nqb/nkb tile counts, nd = Nq + Nk - 1 distances.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import masks as _masks
from ..lowering import ATOM_CODES as ATOM_KINDS
from ..lowering import MAX_MODS, MOD_CODES as MOD_KINDS, distance_shift, dropout_params, strides0, t5_buckets

MAX_ATOMS = 4
NPARAM = 16


def _strides0(t: Tensor):
    return list(strides0(t))


# -- masks -----------------------------------------------------------------------------------------------------
def mask_reason(call) -> Optional[str]:
    if call.mask is None:
        return None
    try:
        lw = call.lowered_mask()
    except NotImplementedError as e:
        return f"mask has no lowering: {e}"
    bad = [a.kind for a in lw.atoms if a.kind not in ATOM_KINDS]
    if bad:
        return f"mask atoms {bad} have no Triton evaluation"
    if len(lw.atoms) > MAX_ATOMS:
        return f"a mask of {len(lw.atoms)} atoms (the Triton kernels combine at most {MAX_ATOMS})"
    return None


def truth_table(program, n: int) -> int:
    """Bit c of the result is the program's value when atom a takes bit a of c."""
    tt = 0
    for c in range(1 << n):
        stack = []
        for x in program:
            if isinstance(x, int):
                stack.append(bool((c >> x) & 1))
            elif x == "not":
                stack.append(not stack.pop())
            else:
                y, z = stack.pop(), stack.pop()
                stack.append((y and z) if x == "and" else (y or z))
        if stack.pop():
            tt |= 1 << c
    return tt


class MaskArgs:
    """What the kernels read of the mask: tensors P (NA, 16) int64, I64, U8 and constants NA, K0..K3, TT,
    ALL_AND (see _jit.py). A call without mask gets NA = 0 and placeholder tensors."""

    def __init__(self, call):
        dev = call.device
        lw = call.lowered_mask()
        self.kinds = [0, 0, 0, 0]
        self.NA, self.TT, self.ALL_AND = 0, 0, True
        ph64 = torch.zeros(1, dtype=torch.int64, device=dev)
        if lw is None:
            self.P, self.I64, self.U8 = ph64, ph64, torch.zeros(1, dtype=torch.uint8, device=dev)
            return
        n = len(lw.atoms)
        self.NA = n
        self.TT = truth_table(lw.program, n)
        self.ALL_AND = self.TT == 1 << ((1 << n) - 1)
        P = torch.zeros((n, NPARAM), dtype=torch.int64)
        ints, u8s, ioff, uoff = [], [], 0, 0
        u8_atoms = [a for a in lw.atoms if a.kind in ("pad_keep", "dense")]
        for slot, a in enumerate(lw.atoms):
            self.kinds[slot] = ATOM_KINDS[a.kind]
            P[slot, 0], P[slot, 1] = a.q0, a.k0
            if a.kind == "window":
                P[slot, 2], P[slot, 3] = a.left, a.right
            elif a.kind in ("pad_len", "prefix"):
                x = (a.lengths if a.kind == "pad_len" else a.prefix).reshape(-1).to(torch.int64)
                P[slot, 4], P[slot, 5] = ioff, (1 if x.shape[0] > 1 else 0)
                ints.append(x)
                ioff += x.numel()
            elif a.kind == "document":
                iq, ik = a.ids_q.to(torch.int64), a.ids_k.to(torch.int64)  # (Bq, Qtot), (Bk, Ktot)
                P[slot, 4], P[slot, 5] = ioff, (iq.shape[1] if iq.shape[0] > 1 else 0)
                ints.append(iq.reshape(-1))
                ioff += iq.numel()
                P[slot, 6], P[slot, 7] = ioff, (ik.shape[1] if ik.shape[0] > 1 else 0)
                ints.append(ik.reshape(-1))
                ioff += ik.numel()
            elif a.kind in ("pad_keep", "dense"):  # (Bm, Ktot) / (Bm, Hm, Qt, Kt) bool
                t = a.keep if a.kind == "pad_keep" else a.t
                if len(u8_atoms) == 1:  # read in place (a dense mask is O(N^2): never copy it)
                    t = t.to(dev)
                    t8 = t.view(torch.uint8) if t.dtype == torch.bool else t.to(torch.uint8)
                    s = _strides0(t8)
                    off = t8.storage_offset()
                    t8 = torch.as_strided(t8, (t8.untyped_storage().nbytes(),), (1,), 0)
                    u8s.append(t8)
                else:
                    t8 = t.to(torch.uint8).contiguous()
                    s = _strides0(t8)
                    off = uoff
                    u8s.append(t8.reshape(-1))
                    uoff += t8.numel()
                P[slot, 8] = off
                if a.kind == "pad_keep":
                    P[slot, 9], P[slot, 12] = s[0], s[1]
                else:
                    P[slot, 9:13] = torch.tensor(s)
        self.P = P.to(dev)
        self.I64 = torch.cat([x.to(dev) for x in ints]) if ints else ph64
        if not u8s:
            self.U8 = torch.zeros(1, dtype=torch.uint8, device=dev)
        elif len(u8s) == 1:
            self.U8 = u8s[0].to(dev)
        else:
            self.U8 = torch.cat([x.to(dev) for x in u8s])

    def constexprs(self):
        k = self.kinds
        return dict(NA=self.NA, K0=k[0], K1=k[1], K2=k[2], K3=k[3], TT=self.TT, ALL_AND=self.ALL_AND)


# -- tile lists ------------------------------------------------------------------------------------------------
class TileLists:
    """idx, full (Bm, Hm, nrow, ncol) int32 (non-empty column blocks first, ascending) and cnt (Bm, Hm, nrow)
    int32, for rows = q blocks (transpose=False) or rows = k blocks (transpose=True)."""

    def __init__(self, call, bm: int, bn: int, transpose: bool = False):
        cls = call.block_classes(bm, bn).to(torch.int8).cpu()  # (Bm, Hm, nqb, nkb)
        cls = cls.clone()
        if call.Nk % bn and not transpose and cls.shape[-1]:
            # the ragged last k block holds keys j >= Nk: bounds need the masked path
            last = cls[..., -1]
            cls[..., -1] = torch.where(last == _masks.FULL, torch.full_like(last, _masks.PARTIAL), last)
        if transpose:
            cls = cls.transpose(-1, -2)
            if call.Nq % bm and cls.shape[-1]:
                last = cls[..., -1]
                cls[..., -1] = torch.where(last == _masks.FULL, torch.full_like(last, _masks.PARTIAL), last)
        nonempty = cls != _masks.EMPTY
        order = torch.argsort((~nonempty).to(torch.int8), dim=-1, stable=True)
        dev = call.device
        self.idx = order.to(torch.int32).contiguous().to(dev)
        self.full = (cls.gather(-1, order) == _masks.FULL).to(torch.int32).contiguous().to(dev)
        self.cnt = nonempty.sum(-1).to(torch.int32).contiguous().to(dev)
        Bm, Hm, nrow, ncol = cls.shape
        self.sb = nrow * ncol * Hm if Bm > 1 else 0
        self.sh = nrow * ncol if Hm > 1 else 0
        self.sr = ncol
        self.cb = nrow * Hm if Bm > 1 else 0
        self.ch = nrow if Hm > 1 else 0


def tile_lists(call, bm: int, bn: int, transpose: bool = False) -> TileLists:
    key = ("triton_lists", bm, bn, transpose)
    if key not in call._memo:
        call._memo[key] = TileLists(call, bm, bn, transpose)
    return call._memo[key]


# -- modifiers -------------------------------------------------------------------------------------------------
def mods_reason(call) -> Optional[str]:
    r = call.lowered_mods_reason("Triton kernels", MAX_MODS, MOD_KINDS)
    if r is not None or call.score_mod is None:
        return r
    grads = 0
    for op in call.lowered_mods():
        if op.kind == "t5" and op.table.requires_grad:
            grads += 1
            if op.num_buckets > 128:
                return f"a T5 table of {op.num_buckets} buckets whose gradient is asked (at most 128)"
    if grads > 1:
        return "two T5 tables that require grad (the Triton backward accumulates one)"
    return None


class ModArgs:
    """Tensors MPI (4, 2) int64, MPF (4,) float32, SL (4, Hq) float32, TAB (4, Hq, nd) float32, BKT (nd,) int32
    and constants M0..M3, T5_SLOT (-1: no table gradient), NB (buckets of that table, padded to a power of 2)."""

    def __init__(self, call):
        dev = call.device
        Hq, Nq, Nk = call.Hq, call.Nq, call.Nk
        self.nd = max(1, Nq + Nk - 1)
        self.kinds = [0, 0, 0, 0]
        self.t5_slot, self.t5_op, self.NB, self.n_buckets = -1, None, 1, 1
        ops = call.lowered_mods() or ()
        MPI = torch.zeros((MAX_MODS, 2), dtype=torch.int64)
        MPF = torch.ones(MAX_MODS, dtype=torch.float32)
        SL = torch.zeros((MAX_MODS, Hq), dtype=torch.float32)
        tabs = None
        bkt = None
        for slot, op in enumerate(ops):
            self.kinds[slot] = MOD_KINDS[op.kind]
            if op.kind == "softcap":
                MPF[slot] = float(op.cap)
                continue
            shift = distance_shift(call, op)  # d = kp - (qp + op.q_offset) = (j - i) + shift
            if op.kind == "alibi":
                MPI[slot, 0], MPI[slot, 1] = shift, int(bool(op.symmetric))
                SL[slot] = torch.as_tensor(op.slopes).detach().to(torch.float32).reshape(-1).cpu()
            else:
                if tabs is None:
                    tabs = torch.zeros((MAX_MODS, Hq, self.nd), dtype=torch.float32, device=dev)
                bucket = t5_buckets(call, op)  # (nd,)
                table = op.table.detach().to(device=dev, dtype=torch.float32)  # (num_buckets, Hq)
                if bucket.numel():
                    tabs[slot] = table.t().index_select(1, bucket.to(dev))  # (Hq, nd)
                if op.table.requires_grad:
                    self.t5_slot, self.t5_op, self.n_buckets = slot, op, op.num_buckets
                    self.NB = 1 << max(0, (op.num_buckets - 1).bit_length())
                    bkt = bucket.to(torch.int32)
        self.MPI, self.MPF, self.SL = MPI.to(dev), MPF.to(dev), SL.to(dev)
        self.TAB = tabs if tabs is not None else torch.zeros(1, dtype=torch.float32, device=dev)
        self.BKT = (bkt if bkt is not None and bkt.numel() else torch.zeros(1, dtype=torch.int32)).to(dev)

    def constexprs(self):
        k = self.kinds
        return dict(M0=k[0], M1=k[1], M2=k[2], M3=k[3], T5_SLOT=self.t5_slot)


def dropout_args(call):
    """(seed as uint32 value, keep threshold, 1 / (1 - p)) of the counter hash in ``common.dropout_keep``."""
    return dropout_params(call)
