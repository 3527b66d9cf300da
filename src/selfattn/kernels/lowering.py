"""One lowering for the compiled kernels: the integer codes, tables and parameters that the native (C++) and the
Triton kernels read instead of calling Python per tile. Written once here; kernels/native.py, triton/_lower.py,
decode.py and distributed/ulysses.py import it, and tests/test_lowering.py holds csrc/abi.h's codes equal to it.

* codes -- mask atoms (``ATOM_CODES``), postfix program ops (``OP_CODES``), modifier ops as the Triton kernels
  name them (``MOD_CODES``) and as the C ABI does (``C_MOD_DIST`` tables, ``C_MOD_SOFTCAP``), dtypes
  (``DTYPE_CODES``); ``program_codes`` turns a ``masks.Lowered`` program into int32 codes.
* distances -- ALiBi and T5 as a per-head table over the call's Nq + Nk - 1 key-query distances
  (``dist_table``; the C kernel reads it, the Triton one reads T5's), with ``distance_shift`` and ``t5_buckets``.
* strides -- element strides with 0 on size-1 dims (``strides0``): kernels index broadcast dims at 0 through them.
* dropout -- the counter hash's constants (``HASH_B``, ``HASH_H``, ``HASH_K``), ``dropout_threshold(p)``,
  ``dropout_params(call)`` and ``head_seed(seed, first_head)``: the seed that makes heads h0.. of a head shard
  draw the single-process pattern (Ulysses).
* ``DECODE_MAX_ROWS`` -- query rows per KV head (G·Nq) up to which a call is a generation step for every
  kernel's decode path (the torch decode kernel, native's split-key path, Triton's split-KV decode).

Plain torch, no kernel imports (a kernel imports this, never the reverse).

Shape legend: Hq query heads, Nq/Nk lengths, nd = Nq + Nk - 1 distances.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["ATOM_CODES", "OP_CODES", "MOD_CODES", "C_MOD_DIST", "C_MOD_SOFTCAP", "DTYPE_CODES", "MAX_MODS",
           "DECODE_MAX_ROWS", "HASH_B", "HASH_H", "HASH_K", "M32", "program_codes", "strides0", "distance_shift",
           "t5_buckets", "dist_table", "dropout_threshold", "dropout_params", "head_seed"]

# -- codes (csrc/abi.h: SA_CAUSAL.., SA_OP_AND.., SA_MOD_DIST.., SA_F32..; tests/test_lowering.py checks) ---------
ATOM_CODES = {"causal": 1, "window": 2, "pad_len": 3, "pad_keep": 4, "document": 5, "prefix": 6, "dense": 7}
OP_CODES = {"and": -1, "or": -2, "not": -3}  # postfix program: codes >= 0 push atom i
MOD_CODES = {"alibi": 1, "t5": 2, "softcap": 3}  # lowered modifier ops (the Triton kernels' constants)
C_MOD_DIST, C_MOD_SOFTCAP = 1, 2  # the C ABI's: ALiBi and T5 both arrive as distance tables
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
MAX_MODS = 4  # SA_MAX_MODS: modifier ops one compiled call applies

# At most this many query rows per KV head (G·Nq) make a generation step: scores stay (B·Hkv, Nk, G·Nq)
DECODE_MAX_ROWS = 16

# -- the dropout hash (kernels/common.dropout_keep is its torch form; csrc/tile.h and triton/_jit.py its others)
M32 = 0xFFFFFFFF
HASH_B, HASH_H, HASH_K = 0x9E3779B1, 0x85EBCA77, 0x9E3779B9  # batch row, head, key-round constants


def program_codes(program: Sequence) -> Tuple[int, ...]:
    """A ``masks.Lowered`` program (ints push atoms; "and" / "or" / "not") as int codes."""
    return tuple(x if isinstance(x, int) else OP_CODES[x] for x in program)


def strides0(t: Tensor) -> Tuple[int, ...]:
    """Element strides, 0 on size-1 dims (the kernels index broadcast dims at 0 through them)."""
    return tuple([0 if n == 1 else s for n, s in zip(t.shape, t.stride())])  # a list: cheaper per call


# -- distance tables -----------------------------------------------------------------------------------------
def distance_shift(call, op) -> int:
    """d = kp - (qp + op.q_offset) = (j - i) + shift with the call's global positions of local key j, query i."""
    return int(call.k_offset) - int(call.q_base) - int(getattr(op, "q_offset", 0))


def t5_buckets(call, op) -> Tensor:
    """(nd,) int64 T5 bucket of each local distance j - i = -(Nq - 1) .. Nk - 1."""
    from ..scores import relative_position_bucket
    d = torch.arange(-(call.Nq - 1), call.Nk, dtype=torch.int64) + distance_shift(call, op)
    return relative_position_bucket(d, op.bidirectional, op.num_buckets, op.max_distance)


def dist_table(call, op, dtype: torch.dtype, device=None) -> Tensor:
    """(Hq, nd) contiguous values of an ALiBi / T5 op at local distances j - i = -(Nq - 1) .. Nk - 1."""
    if op.kind == "alibi":
        d = torch.arange(-(call.Nq - 1), call.Nk, dtype=torch.int64) + distance_shift(call, op)
        slopes = torch.as_tensor(op.slopes).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        dd = -d.abs() if op.symmetric else d
        tab = slopes[:, None] * dd.to(torch.float64)[None, :]
    else:
        table = op.table.detach()
        tab = table.to(device=device or table.device).t().index_select(1, t5_buckets(call, op).to(table.device))
    return tab.to(device=device, dtype=dtype).contiguous()


# -- dropout -------------------------------------------------------------------------------------------------
def dropout_threshold(p: float) -> int:
    """Keep an entry iff its 32-bit hash >= this (= round(p · 2^32))."""
    return int(round(p * 2 ** 32))


def dropout_params(call) -> Tuple[int, int, float]:
    """(seed as a uint32, keep threshold, 1 / (1 - p)); (0, 0, 1.0) without dropout."""
    if call.dropout_p <= 0.0:
        return 0, 0, 1.0
    return int(call.seed) & M32, dropout_threshold(call.dropout_p), 1.0 / (1.0 - call.dropout_p)


def head_seed(seed: int, first_head: int) -> int:
    """The seed under which local head h draws global head first_head + h's pattern: the hash mixes
    seed + b·HASH_B + h·HASH_H, so first_head·HASH_H folds into the seed (uint32 arithmetic)."""
    return (int(seed) + int(first_head) * HASH_H) & M32
