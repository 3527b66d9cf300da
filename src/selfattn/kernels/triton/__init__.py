"""The Triton kernels: FlashAttention-2 forward, backward (delta, dK/dV over key blocks, dQ over query blocks, no
atomics) and split-KV decode, behind the kernel contract of ``kernels/call.py`` -- every built-in mask evaluated
in-kernel from its lowered atoms, empty tiles never visited, bias / ALiBi / T5 / softcap, GQA without copying
K/V, dropout by the same counter hash as the CPU kernels.

Files: ``_lower.py`` (host side: tile lists, atoms, modifier tables; no triton import), ``_jit.py`` (device
helpers), ``fwd.py``, ``bwd.py``, ``decode.py``.

Where it runs: CUDA tensors. ``TRITON_INTERPRET=1`` (set before triton is imported) runs the same kernels on CPU
tensors in triton's interpreter -- the test suite's way in; the CPU path is offered only when
``SELFATTN_TRITON_ON_CPU=1`` is set as well, so the automatic choice never picks an interpreter for CPU work.
This module imports without triton: ``why_not`` then says so.

Serves float16, bfloat16, float32 (fp32 dot products in IEEE fp32: TF32 stays off), head dims 1..256 (padded to
powers of two inside), any Nq, Nk, B, GQA/MQA.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _lower

NAME = "triton"
COMPILED = True  # runs behind torch.ops.selfattn.forward / backward (kernels/op.py)
DEVICES = ("cuda", "cpu")  # cpu: triton's interpreter, for tests only (why_not refuses it otherwise)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
DIFFERENTIABLE_BACKWARD = False
FUNCTORCH = False  # launches kernels on raw data pointers
PRIORITY = 0  # first for CUDA tensors; it refuses CPU ones, so the automatic choice never meets it on CPU

try:  # the kernels need triton; the contract's questions do not
    import triton as _triton_pkg  # noqa: F401
    _IMPORT_ERROR: Optional[str] = None
except Exception as e:  # ImportError, or a broken install
    _IMPORT_ERROR = f"triton is not installed ({type(e).__name__}: {e}); pip install 'selfattn[triton]'"


def available() -> bool:
    return _IMPORT_ERROR is None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cpu_allowed() -> bool:
    return _interpreting() and os.environ.get("SELFATTN_TRITON_ON_CPU", "0") == "1"


def _pow2_block(x) -> bool:
    return x is None or (x >= 16 and x & (x - 1) == 0)


def why_not(call) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    dev = call.device.type
    if dev == "cpu":
        if not _cpu_allowed():
            return ("the Triton kernels run on CUDA tensors; the tensors are on cpu (TRITON_INTERPRET=1 with "
                    "SELFATTN_TRITON_ON_CPU=1 runs them in triton's interpreter, for tests)")
    elif dev != "cuda":
        return f"the Triton kernels run on CUDA tensors; the tensors are on {call.device}"
    elif _interpreting():
        return "TRITON_INTERPRET=1 is set: triton's interpreter runs on CPU tensors, not CUDA ones"
    # the registry checks DTYPES and MAX_HEAD_DIM first; asked directly, the module answers them too
    if call.dtype not in DTYPES:
        return f"dtype {call.dtype} (the Triton kernels serve float16, bfloat16, float32)"
    if not (1 <= call.D <= MAX_HEAD_DIM and 1 <= call.Dv <= MAX_HEAD_DIM):
        return f"head dims D={call.D}, Dv={call.Dv} outside 1..{MAX_HEAD_DIM}"
    if not (_pow2_block(call.block_q) and _pow2_block(call.block_k)):
        return (f"block_q={call.block_q}, block_k={call.block_k}: Triton tiles are powers of two >= 16 "
                f"(or None for the kernel's own)")
    if call.bias is not None and call.bias.dtype not in DTYPES + (torch.float64,):
        return f"bias dtype {call.bias.dtype}"
    for r in (_lower.mask_reason(call), _lower.mods_reason(call)):
        if r is not None:
            return r
    return None


def forward(call):
    """out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32 (natural log, -inf for empty rows)."""
    from . import decode, fwd
    if decode.serves(call):
        return decode.forward(call)
    return fwd.forward(call)


def backward(call, grad_out, out, lse, needs):
    """(dq, dk, dv, dbias, dparams) for needs = (q, k, v, bias, params); None where not needed."""
    from . import bwd
    return bwd.backward(call, grad_out, out, lse, needs)


def automatic(call):
    return True, "the Triton kernels serve this call"


def tiles(call):
    """The forward's (BM, BN) tile."""
    from . import fwd
    return fwd.block_sizes(call)
