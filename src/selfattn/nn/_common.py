"""What the layers of this package share: argument checks, mask conversion, and the kernel call that also feeds
the recorders (``selfattn.recording``) when one is open.

Shape legend: B batch, Hq query heads, Hkv key/value heads, Nq queries, Nk keys, D / Dv head dims.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import masks as _masks
from .. import recording
from ..functional import attention
from ..validation import split_bias


def check_pos_int(name: str, x, allow_none: bool = True):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {x!r}")
    return x


as_mask = _masks.as_mask  # None, a bool tensor or a mask object -> a mask object or None


def and_masks(a: Optional[_masks.Mask], b: Optional[_masks.Mask]) -> Optional[_masks.Mask]:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def attend(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask, bias, scale: float, dropout_p: float,
           kernel: Optional[str]) -> Tensor:
    """Call the kernel; under ``record_attention`` also get the LSE and emit a record of the call."""
    if not recording.active():
        return attention(q, k, v, mask, bias=bias, scale=scale, dropout_p=dropout_p, kernel=kernel)
    mask = as_mask(mask)
    bias_t, mod = split_bias(bias)
    out, lse = attention(q, k, v, mask, bias=bias, scale=scale, dropout_p=dropout_p, kernel=kernel,
                         return_lse=True)  # (B, Hq, Nq, Dv), (B, Hq, Nq)
    recording.emit(recording.AttentionRecord(module, q, k, v, mask, bias_t, mod, float(scale), lse))
    return out
