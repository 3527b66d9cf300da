"""``selfattn.attention``: validate → plan → run a kernel. The one public op every layer and model calls.

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), Nq queries, Nk keys, D q/k head dim,
Dv value head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import masks as _masks
from .kernels import tiled as _tiled
from .kernels.decode import DECODE_DTYPES, DECODE_MAX_ROWS, attention_decode
from .kernels.reference import attention_reference, max_bytes, score_bytes
from .kernels.tiled import attention_tiled
from .scores import ScoreMod, compose

KERNELS = ("reference", "tiled", "decode")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Automatic choice: below this many score entries per (batch, head) the reference's single matmul beats tiling's
# per-tile overhead; above it the tiled kernel runs, so memory never grows with Nq·Nk by surprise. The reference
# is also skipped when all B·H heads' scores exceed SELFATTN_REFERENCE_MAX_BYTES (it would refuse the call).
AUTO_REFERENCE_MAX_SCORES = 128 * 128

__all__ = ["attention", "plan", "Plan", "KERNELS", "AUTO_REFERENCE_MAX_SCORES", "DECODE_MAX_ROWS"]


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_tensor(name: str, t, ndim: int = 4):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims (B, H, N, D), got {_describe(t)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {_describe(t)}")


def _broadcastable(shape: Sequence[int], target: Sequence[int]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def _split_bias(bias):
    """bias: None | Tensor | ScoreMod | sequence [Tensor?, ScoreMod...] -> (tensor or None, ScoreMod or None)."""
    if bias is None:
        return None, None
    if isinstance(bias, Tensor):
        return bias, None
    if isinstance(bias, ScoreMod):
        return None, bias
    if isinstance(bias, (list, tuple)):
        tensors = [b for b in bias if isinstance(b, Tensor)]
        mods = [b for b in bias if isinstance(b, ScoreMod)]
        if len(tensors) + len(mods) != len(bias):
            bad = next(b for b in bias if not isinstance(b, (Tensor, ScoreMod)))
            raise TypeError(f"bias: list items must be tensors or selfattn.scores modifiers, got {type(bad).__name__}")
        if len(tensors) > 1 or (tensors and not isinstance(bias[0], Tensor)):
            raise ValueError("bias: a list may hold at most one tensor, and it must come first (the additive "
                             "tensor is applied before the modifiers)")
        return (tensors[0] if tensors else None), (compose(*mods) if mods else None)
    raise TypeError(f"bias: expected None, a float tensor, a selfattn.scores modifier or a list of them, got "
                    f"{type(bias).__name__}")


def _validate(q, k, v, mask, bias, scale, dropout_p, kernel):
    _check_tensor("q", q)
    _check_tensor("k", k)
    _check_tensor("v", v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected q's dtype {q.dtype}, got k {k.dtype} and v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected q's device {q.device}, got k on {k.device} and v on {v.device}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k, v: batch must equal q's {B}, got k {_describe(k)}, v {_describe(v)}")
    Hkv = k.shape[1]
    if v.shape[1] != Hkv:
        raise ValueError(f"v: expected {Hkv} heads like k, got {_describe(v)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv} (GQA/MQA), "
                         f"got q {_describe(q)}, k {_describe(k)}")
    if k.shape[3] != D:
        raise ValueError(f"k: head dim must equal q's D={D}, got {_describe(k)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected Nk={k.shape[2]} keys like k, got {_describe(v)}")
    Nk = k.shape[2]
    target = (B, Hq, Nq, Nk)

    if mask is not None:
        if isinstance(mask, Tensor):
            if mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor (True = may attend) or a selfattn.masks object, "
                                f"got {_describe(mask)}")
            if not _broadcastable(mask.shape, target):
                raise ValueError(f"mask: {_describe(mask)} is not broadcastable to (B, Hq, Nq, Nk) = {target}")
            if mask.device != q.device:
                raise ValueError(f"mask: expected device {q.device}, got {mask.device}")
            # (Nk,) or a 0-d mask broadcasts like torch: left-pad to 4 dims (a view)
            mask = _masks.from_tensor(mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)))
        elif isinstance(mask, _masks.Mask):
            if hasattr(mask, "check_shape"):
                mask.check_shape(B, Hq, Nq, Nk)
        else:
            raise TypeError(f"mask: expected None, a bool tensor or a selfattn.masks object, got "
                            f"{type(mask).__name__}")

    bias_t, mod = _split_bias(bias)
    if bias_t is not None:
        if not bias_t.is_floating_point():
            raise TypeError(f"bias: expected a float tensor added to the scores, got {_describe(bias_t)}")
        if not _broadcastable(bias_t.shape, target):
            raise ValueError(f"bias: {_describe(bias_t)} is not broadcastable to (B, Hq, Nq, Nk) = {target}")
        if bias_t.device != q.device:
            raise ValueError(f"bias: expected device {q.device}, got {bias_t.device}")

    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a real number or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale}")
        scale = float(scale)

    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a value in [0, 1), got {dropout_p}")

    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel: expected None or one of {KERNELS}, got {kernel!r}")
    return mask, bias_t, mod, scale, float(dropout_p)


@dataclass(frozen=True)
class Plan:
    """What ``attention`` would do for a call, and why (``selfattn plan`` prints it)."""
    kernel: str
    reason: str
    B: int
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    D: int
    Dv: int
    block_q: int
    block_k: int
    tiles_total: int
    tiles_computed: int
    tiles_partial: int


def _decode_blocker(B, Hq, Hkv, Nq, Nk, dtype, mask, has_bias: bool, dropout_p: float) -> Optional[str]:
    """Why the decode kernel cannot serve a call, or None when it can."""
    rows = (Hq // Hkv) * Nq
    if rows > DECODE_MAX_ROWS:
        return f"(Hq/Hkv)·Nq = {rows} query rows per KV head > {DECODE_MAX_ROWS}"
    if dtype not in DECODE_DTYPES:
        return f"dtype {dtype} (it serves float32/float64 and does not upcast the cache)"
    if B == 0 or Nk == 0:
        return "an empty batch or no keys"
    if has_bias:
        return "a bias or score modifier"
    if dropout_p > 0.0:
        return "dropout"
    if mask is not None:
        # one tile covering the whole problem: FULL everywhere means the mask allows every entry
        cls = mask.block_classes(B, Hq, Nq, Nk, max(Nq, 1), max(Nk, 1))
        if not bool((cls == _masks.FULL).all()):
            return "a mask that forbids some entries"
    return None


def _choose(kernel, B, Hq, Hkv, Nq, Nk, dtype, mask=None, has_bias=False, dropout_p=0.0):
    if kernel == "reference":
        need = score_bytes(B, Hq, Nq, Nk, dtype)
        if need > max_bytes():
            raise ValueError(f"kernel='reference' cannot serve this call: its scores need {need / 2**30:.1f} GiB "
                             f"for (B, H, Nq, Nk) = {(B, Hq, Nq, Nk)} (limit SELFATTN_REFERENCE_MAX_BYTES="
                             f"{max_bytes()}); use kernel='tiled' or None")
        return "reference", "named by the caller"
    if kernel == "tiled":
        return "tiled", "named by the caller"
    blocker = _decode_blocker(B, Hq, Hkv, Nq, Nk, dtype, mask, has_bias, dropout_p)
    if kernel == "decode":
        if blocker is not None:
            raise ValueError(f"kernel='decode' cannot serve this call: {blocker}; use kernel='tiled' or None")
        return "decode", "named by the caller"
    if blocker is None:
        return "decode", (f"automatic: {(Hq // Hkv) * Nq} query rows per KV head ≤ {DECODE_MAX_ROWS}, no mask, "
                          f"bias or dropout: one pass over K and V (a generation step)")
    if Nq * Nk > AUTO_REFERENCE_MAX_SCORES:
        return "tiled", (f"automatic: Nq·Nk = {Nq * Nk} > {AUTO_REFERENCE_MAX_SCORES}, tiled keeps memory linear "
                         f"in sequence length and skips masked tiles")
    need = score_bytes(B, Hq, Nq, Nk, dtype)
    if need > max_bytes():  # small per head, but B·H large: the reference would refuse, so never pick it
        return "tiled", (f"automatic: Nq·Nk = {Nq * Nk} ≤ {AUTO_REFERENCE_MAX_SCORES} but the scores of all "
                         f"{B * Hq} heads need {need} bytes > SELFATTN_REFERENCE_MAX_BYTES={max_bytes()}")
    return "reference", (f"automatic: Nq·Nk = {Nq * Nk} ≤ {AUTO_REFERENCE_MAX_SCORES}, one small matmul beats "
                         f"per-tile overhead")


def plan(B: int, Hq: int, Nq: int, Nk: int, D: int, Dv: Optional[int] = None, Hkv: Optional[int] = None,
         mask: Optional[_masks.Mask] = None, kernel: Optional[str] = None, dtype=torch.float32,
         block_q: Optional[int] = None, block_k: Optional[int] = None, has_bias: bool = False,
         dropout_p: float = 0.0) -> Plan:
    """The kernel ``attention`` would run for this shape and mask, the rule that chose it, and the tile counts.

    The rule: a named kernel runs or raises saying why it cannot. Automatic: "decode" when at most
    DECODE_MAX_ROWS query rows share a KV head, with no bias/modifier, no dropout, float32/float64 and a mask
    that allows everything (a generation step); else "reference" when Nq·Nk ≤ AUTO_REFERENCE_MAX_SCORES and the
    scores of all heads fit SELFATTN_REFERENCE_MAX_BYTES; else "tiled"."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel: expected None or one of {KERNELS}, got {kernel!r}")
    Dv = D if Dv is None else Dv
    Hkv = Hq if Hkv is None else Hkv
    name, reason = _choose(kernel, B, Hq, Hkv, Nq, Nk, dtype, mask, has_bias, dropout_p)
    bq, bk = block_q or _tiled.BLOCK_Q, block_k or _tiled.BLOCK_K
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    if mask is not None:
        kinds = _masks.summarize_classes(mask.block_classes(B, Hq, Nq, Nk, bq, bk))
        computed = int((kinds != _masks.EMPTY).sum())
        partial = int((kinds == _masks.PARTIAL).sum())
    else:
        computed, partial = nqb * nkb, 0
    return Plan(name, reason, B, Hq, Hkv, Nq, Nk, D, Dv, bq, bk, nqb * nkb, computed, partial)


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
              dropout_p: float = 0.0, generator: Optional[torch.Generator] = None, return_lse: bool = False,
              kernel: Optional[str] = None, block_q: Optional[int] = None, block_k: Optional[int] = None):
    """Exact scaled dot-product attention.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), Hq % Hkv == 0 (GQA/MQA without copying K/V).
    mask: None, a bool tensor broadcastable to (B, Hq, Nq, Nk) (True = may attend), or a ``selfattn.masks`` object.
    bias: None, a float tensor broadcastable to (B, Hq, Nq, Nk) added to the scores (its gradient is exact), a
        ``selfattn.scores`` modifier, or a list [tensor, modifier, ...] (tensor first).
    scale: defaults to 1/√D. dropout_p in [0, 1): dropout on the attention weights, pattern drawn from
        ``generator`` (one seed per call; the backward regenerates it per tile).
    return_lse: also return the natural-log log-sum-exp per query row, (B, Hq, Nq), float32 (float64 for float64
        inputs); −inf for rows with no allowed key (whose output is 0).
    kernel: None (automatic: the rule in ``plan``), "reference", "tiled" or "decode".
    Returns (B, Hq, Nq, Dv) in q's dtype [, lse].
    """
    mask, bias_t, mod, scale, dropout_p = _validate(q, k, v, mask, bias, scale, dropout_p, kernel)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    name, _reason = _choose(kernel, B, Hq, k.shape[1], Nq, Nk, q.dtype, mask,
                            bias_t is not None or mod is not None, dropout_p)
    if name == "decode":
        return attention_decode(q, k, v, scale, return_lse=return_lse)
    seed = 0
    if dropout_p > 0.0:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator).item())
    if name == "reference":
        return attention_reference(q, k, v, mask=mask, bias=bias_t, score_mod=mod, scale=scale,
                                   dropout_p=dropout_p, seed=seed, return_lse=return_lse)
    return attention_tiled(q, k, v, mask=mask, bias=bias_t, score_mod=mod, scale=scale, dropout_p=dropout_p,
                           seed=seed, return_lse=return_lse, block_q=block_q, block_k=block_k)
