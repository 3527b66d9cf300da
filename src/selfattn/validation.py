"""The checks every entry point shares (attention, plan, the layers, ring and Ulysses attention, inspect): one
definition each, plain names. Shapes, dtypes, devices and python types only -- no tensor data is read, so they
run on the path torch.compile traces.

Shape legend: B batch, Hq/Hkv heads, Nq/Nk lengths, D head dim.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import masks as _masks
from .scores import ScoreMod, compose

__all__ = ["FLOAT_DTYPES", "describe", "check_tensor", "broadcastable", "split_bias", "check_int", "validate",
           "draw_seed"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, ndim: int = 4):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims (B, H, N, D), got {describe(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {describe(t)}")


def broadcastable(shape: Sequence[int], target: Sequence[int]) -> bool:
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


def split_bias(bias):
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


def check_int(name: str, x, minimum=None, allow_none: bool = False):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int):
        want = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name}: expected {want}, got {type(x).__name__} {x!r}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x}")
    return x


def validate(q, k, v, mask, bias, scale, dropout_p, q_offset=None, k_offset=0):
    """attention()'s arguments checked (shapes, dtypes, devices, types; no tensor data read) and normalized:
    (mask as a Mask or None, bias tensor or None, bound modifier or None, scale as a float, dropout_p as a float).
    Errors name the argument, what came and what was expected."""
    check_tensor("q", q)
    check_tensor("k", k)
    check_tensor("v", v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k, v: expected q's dtype {q.dtype}, got k {k.dtype} and v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"k, v: expected q's device {q.device}, got k on {k.device} and v on {v.device}")
    B, Hq, Nq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"k, v: batch must equal q's {B}, got k {describe(k)}, v {describe(v)}")
    Hkv = k.shape[1]
    if v.shape[1] != Hkv:
        raise ValueError(f"v: expected {Hkv} heads like k, got {describe(v)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"k: query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv} (GQA/MQA), "
                         f"got q {describe(q)}, k {describe(k)}")
    if k.shape[3] != D:
        raise ValueError(f"k: head dim must equal q's D={D}, got {describe(k)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected Nk={k.shape[2]} keys like k, got {describe(v)}")
    Nk = k.shape[2]
    target = (B, Hq, Nq, Nk)

    if mask is not None:
        if isinstance(mask, Tensor):
            if mask.dtype != torch.bool:
                raise TypeError(f"mask: expected a bool tensor (True = may attend) or a selfattn.masks object, "
                                f"got {describe(mask)}")
            if not broadcastable(mask.shape, target):
                raise ValueError(f"mask: {describe(mask)} is not broadcastable to (B, Hq, Nq, Nk) = {target}")
            if mask.device != q.device:
                raise ValueError(f"mask: expected device {q.device}, got {mask.device}")
            # (Nk,) or a 0-d mask broadcasts like torch: left-pad to 4 dims (a view)
            mask = _masks.from_tensor(mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)))
        elif isinstance(mask, _masks.Mask):
            if q_offset is None and k_offset == 0:  # masks written before offsets existed take four arguments
                mask.check_shape(B, Hq, Nq, Nk)
            else:
                mask.check_shape(B, Hq, Nq, Nk, q_offset, k_offset)
            mask.check_device(q.device)  # devices of the mask's data, no data read (a meta tensor reads as "all")
        else:
            raise TypeError(f"mask: expected None, a bool tensor or a selfattn.masks object, got "
                            f"{type(mask).__name__}")

    bias_t, mod = split_bias(bias)
    if mod is not None:
        mod.check_call(Hq, q_offset)
        mod = mod.bind(Hq)
    if bias_t is not None:
        if not bias_t.is_floating_point():
            raise TypeError(f"bias: expected a float tensor added to the scores, got {describe(bias_t)}")
        if not broadcastable(bias_t.shape, target):
            raise ValueError(f"bias: {describe(bias_t)} is not broadcastable to (B, Hq, Nq, Nk) = {target}")
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

    return mask, bias_t, mod, scale, float(dropout_p)


def draw_seed(dropout_p, generator: Optional[torch.Generator] = None) -> Union[int, Tensor]:
    """The dropout seed of one call: a 0-d int64 tensor drawn from ``generator`` (torch's default when None)
    when 0 < dropout_p < 1, else 0. A tensor, so that the compiled kernels' op takes it without an ``.item()``
    on the traced path; torch-op kernels and collectives read it with ``int()``."""
    if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool) and 0.0 < dropout_p < 1.0:
        return torch.randint(0, 2 ** 31 - 1, (), generator=generator)
    return 0
