"""``selfattn.attention``: validate → plan → run a kernel. The one public op every layer and model calls.

Shape legend: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0), Nq queries, Nk keys, D q/k head dim,
Dv value head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._functorch.utils import unwrap_dead_wrappers

from . import masks as _masks
from .kernels import reference as _reference
from .kernels import op as _op
from .kernels import registry
from .kernels.call import Call
from .kernels.common import as_4d
from .kernels.lowering import DECODE_MAX_ROWS
from .kernels.op import NoDoubleBackward
from .validation import check_int, draw_seed, validate

# The kernels are chosen by selfattn.kernels.registry (its docstring has the rule); these are the registered
# names at import, and the registry's own order and index (tests spy on the kernels through them).
KERNELS = registry.names()
_KERNEL_MODULES = registry.ORDER
_BY_NAME = registry.BY_NAME
AUTO_REFERENCE_MAX_SCORES = _reference.AUTO_MAX_SCORES  # the reference kernel's automatic-rule limit
# plan() and attention() refuse problems whose q, k or v would hold more elements than this (2^48: 1 PiB of
# fp32), so that a typo costs one line, not an attempt to allocate
MAX_ELEMENTS = 1 << 48

__all__ = ["attention", "plan", "Plan", "KERNELS", "AUTO_REFERENCE_MAX_SCORES", "DECODE_MAX_ROWS", "Call",
           "prepare", "run"]


def _shape_tensor(shape, dtype, device="cpu") -> Tensor:
    """A tensor of this shape and dtype that holds one element (stride 0): what plan() describes a call with."""
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


def prepare(q: Tensor, k: Tensor, v: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
            dropout_p: float = 0.0, seed: int = 0, q_offset: Optional[int] = None, k_offset: int = 0,
            return_lse: bool = False, kernel: Optional[str] = None, block_q: Optional[int] = None,
            block_k: Optional[int] = None, allowed: Optional[Sequence[str]] = None,
            _shape_only: bool = False) -> Tuple[Call, object, str]:
    """Validate a call into its frozen description and choose its kernel through the registry: (call, kernel,
    reason). ``allowed`` limits the automatic choice to these kernel names (ring attention). The kernel's
    ``forward`` / ``backward`` primitives then run it (ring attention calls them per step)."""
    mask, bias_t, mod, scale, dropout_p = validate(q, k, v, mask, bias, scale, dropout_p, q_offset, k_offset)
    if kernel is not None:
        registry.get(kernel)  # raises naming the registered kernels
    if mask is not None and mask.allows_everything(q.shape[2], k.shape[2], q_offset, k_offset):
        mask = None  # e.g. a decode step's causal mask: the last query sees every key; no tile work per call
    call = Call(q, k, v, mask=mask, bias=as_4d(bias_t) if bias_t is not None else None,
                bias_shape=tuple(bias_t.shape) if bias_t is not None else None, score_mod=mod, scale=scale,
                dropout_p=dropout_p, seed=seed if isinstance(seed, Tensor) else int(seed), q_offset=q_offset,
                k_offset=k_offset, return_lse=return_lse, block_q=block_q, block_k=block_k, shape_only=_shape_only)
    module, reason, _ = registry.choose(call, kernel, allowed, cache=not _shape_only)
    return call, module, reason


@dataclass(frozen=True)
class Plan:
    """What ``attention`` would do for a call, and why (``selfattn plan`` prints it). ``reasons`` holds every
    kernel's answer to ``why_not`` for the call (None: it could serve), as xformers' not_supported_reasons."""
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
    reasons: Tuple[Tuple[str, Optional[str]], ...] = ()

    def costs(self, dtype: torch.dtype = torch.float32):
        """Forward FLOPs, bytes moved and peak extra memory, materialized vs tiled: ``selfattn.cost.estimate``."""
        from .cost import estimate
        return estimate(self, dtype)


def _plan_dim(name, x, minimum=0):
    check_int(name, x, minimum)
    return x


def plan(B: int, Hq: int, Nq: int, Nk: int, D: int, Dv: Optional[int] = None, Hkv: Optional[int] = None,
         mask: Optional[_masks.Mask] = None, kernel: Optional[str] = None, dtype=torch.float32,
         block_q: Optional[int] = None, block_k: Optional[int] = None, has_bias: bool = False,
         dropout_p: float = 0.0, q_offset: Optional[int] = None, k_offset: int = 0, device="cpu") -> Plan:
    """The kernel ``attention`` would run for this shape and mask, the rule that chose it, every kernel's reason,
    and the tile counts. Pure arithmetic on shapes: its cost does not grow with Nq·Nk for built-in masks.

    The rule (``selfattn.kernels.registry.choose``): a named kernel runs or raises saying why it cannot.
    Automatic: the first registered kernel, by priority, that can serve and whose own rule takes the call --
    triton (CUDA), native (the fused CPU kernel, when built), decode (at most DECODE_MAX_ROWS query rows per KV
    head, no mask/bias/dropout, float32/float64), reference (only when Nq·Nk ≤ AUTO_REFERENCE_MAX_SCORES and the
    scores of all heads fit SELFATTN_REFERENCE_MAX_BYTES), tiled (always). Tiles and tile counts are the chosen
    kernel's own (``kernel.tiles(call)``)."""
    for name, x, lo in (("B", B, 0), ("Hq", Hq, 1), ("Nq", Nq, 0), ("Nk", Nk, 0), ("D", D, 0)):
        _plan_dim(name, x, lo)
    block_q = check_int("block_q", block_q, 1, allow_none=True)
    block_k = check_int("block_k", block_k, 1, allow_none=True)
    Dv = D if Dv is None else _plan_dim("Dv", Dv)
    Hkv = Hq if Hkv is None else _plan_dim("Hkv", Hkv, 1)
    if Hq % Hkv:
        raise ValueError(f"Hkv: query heads Hq={Hq} must be a multiple of key/value heads Hkv={Hkv}")
    for name, n in (("q", B * Hq * Nq * D), ("k", B * Hkv * Nk * D), ("v", B * Hkv * Nk * Dv)):
        if n > MAX_ELEMENTS:
            raise ValueError(f"{name}: {n} elements for the planned shape exceeds {MAX_ELEMENTS}; check the sizes")
    if kernel is not None:
        registry.get(kernel)
    q = _shape_tensor((B, Hq, Nq, D), dtype, device)
    k = _shape_tensor((B, Hkv, Nk, D), dtype, device)
    v = _shape_tensor((B, Hkv, Nk, Dv), dtype, device)
    bias = _shape_tensor((1, 1, 1, 1), dtype, device) if has_bias else None
    call, _, _ = prepare(q, k, v, mask, bias=bias, dropout_p=dropout_p, q_offset=q_offset, k_offset=k_offset,
                         block_q=block_q, block_k=block_k, kernel=kernel, _shape_only=True)
    m, reason, found = registry.choose(call, kernel)  # its answers include the automatic rule's
    bq, bk = m.tiles(call)  # the chosen (or named) kernel's own tiles
    if call.mask is not None:
        total, computed, partial = call.mask.tile_counts(B, Hq, Nq, Nk, bq, bk, q_offset, k_offset)
    else:
        total = -(-Nq // bq) * -(-Nk // bk)
        computed, partial = total, 0
    return Plan(m.NAME, reason, B, Hq, Hkv, Nq, Nk, D, Dv, bq, bk, total, computed, partial,
                registry.reasons(call, found))


def _on(call: Call, q, k, v, bias) -> Call:
    """The call on these tensors: itself when they are its own (the eager case: no copy of the call)."""
    if q is call.q and k is call.k and v is call.v and bias is call.bias:
        return call
    return call.with_tensors(q, k, v, bias)


class _KernelFunction(torch.autograd.Function):
    """The one autograd wrapper of every kernel: saves q, k, v, out, lse (the dropout seed is on the call)."""

    @staticmethod
    def forward(module, call, q, k, v, bias, *params):
        # the kernel reads the tensors handed here (under torch.func transforms these are the unwrapped ones)
        out, lse = module.forward(_on(call, q, k, v, bias))
        if out._is_view():  # a view made inside a Function cannot be edited in place (torch forbids it at the edit);
            out = out.clone()  # every kernel's output behaves alike then: editing it fails at backward, as torch's
        return out, lse

    @staticmethod
    def setup_context(ctx, inputs, output):  # separate from forward: torch.func.grad / vjp can use the Function
        module, call, q, k, v, bias = inputs[:6]
        out, lse = output
        ctx.module, ctx.call = module, call
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, out, lse = ctx.saved_tensors
        call = _on(ctx.call, q, k, v, bias)
        n = ctx.needs_input_grad
        needs = (n[2], n[3], n[4], n[5] and call.bias is not None, any(n[6:]))
        if not any(needs):
            return (None,) * len(n)
        if ctx.module.backward is None:
            raise RuntimeError(f"kernel={ctx.module.NAME!r} has no backward")
        if ctx.module.DIFFERENTIABLE_BACKWARD:
            dq, dk, dv, dbias, dparams = ctx.module.backward(call, dout, out, lse, needs)
        else:
            # first-order gradients (torch.func.grad runs backward with grad mode on: fine); their graph, if one
            # is asked for, ends here and differentiating them again raises (see kernels.op.NoDoubleBackward)
            with torch.no_grad():
                dq, dk, dv, dbias, dparams = ctx.module.backward(call, dout, out, lse, needs)
            if torch.is_grad_enabled():  # anchored on the saved inputs, so that the graph reaches the refusal
                dq, dk, dv, dbias = (NoDoubleBackward.apply(ctx.module.NAME, g, t) if g is not None else None
                                     for g, t in zip((dq, dk, dv, dbias), (q, k, v, bias)))
        if dbias is not None:
            dbias = dbias.reshape(call.bias.shape)  # the 4-D view's shape; autograd maps it back to the caller's
        dparams = tuple(d if w else None for d, w in zip(dparams, n[6:])) if needs[4] else (None,) * len(n[6:])
        return (None, None, dq if n[2] else None, dk if n[3] else None, dv if n[4] else None,
                dbias if n[5] else None, *dparams)


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, bias=None, scale: Optional[float] = None,
              dropout_p: float = 0.0, generator: Optional[torch.Generator] = None, return_lse: bool = False,
              kernel: Optional[str] = None, block_q: Optional[int] = None, block_k: Optional[int] = None,
              q_offset: Optional[int] = None, k_offset: int = 0, return_weights: bool = False):
    """Exact scaled dot-product attention.

    q: (B, Hq, Nq, D); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv), Hq % Hkv == 0 (GQA/MQA without copying K/V).
    mask: None, a bool tensor broadcastable to (B, Hq, Nq, Nk) (True = may attend), or a ``selfattn.masks`` object.
    bias: None, a float tensor broadcastable to (B, Hq, Nq, Nk) added to the scores (its gradient is exact), a
        ``selfattn.scores`` modifier, or a list [tensor, modifier, ...] (tensor first).
    scale: defaults to 1/√D. dropout_p in [0, 1): dropout on the attention weights, pattern drawn from
        ``generator`` (one seed per call; the pattern is a hash of (seed, batch, head, query and key positions)).
    return_lse: also return the natural-log log-sum-exp per query row, (B, Hq, Nq), float32 (float64 for float64
        inputs); −inf for rows with no allowed key (whose output is 0).
    q_offset, k_offset: global positions of the first query and key (see ``selfattn.kernels.call``): the call is
        then the slice of a longer one, and gives exactly its rows (masks, modifiers and dropout included).
    return_weights: also return the exact weights (B, Hq, Nq, Nk) before dropout (materialized: the reference
        kernel, differentiable).
    kernel: None (automatic: the rule in ``plan``) or one of ``KERNELS``.
    Returns (B, Hq, Nq, Dv) in q's dtype [, lse] [, weights].
    """
    if not isinstance(return_lse, bool) or not isinstance(return_weights, bool):
        raise TypeError("return_lse, return_weights: expected bools")
    if kernel is not None:
        registry.get(kernel)
    # the common call (no offsets, blocks or dropout) skips the checks those arguments would need
    if q_offset is not None:
        check_int("q_offset", q_offset)
    if type(k_offset) is not int:
        check_int("k_offset", k_offset)
    if block_q is not None:
        block_q = check_int("block_q", block_q, 1)
    if block_k is not None:
        block_k = check_int("block_k", block_k, 1)
    seed = 0 if type(dropout_p) is float and dropout_p == 0.0 else draw_seed(dropout_p, generator)
    if return_weights:
        if kernel not in (None, "reference"):
            raise ValueError(f"kernel={kernel!r} cannot serve return_weights=True: the weights are the materialized "
                             f"scores; use kernel='reference' or None")
        kernel = "reference"
    call, module, _ = prepare(q, k, v, mask, bias=bias, scale=scale, dropout_p=dropout_p, seed=seed,
                              q_offset=q_offset, k_offset=k_offset, return_lse=return_lse, kernel=kernel,
                              block_q=block_q, block_k=block_k)
    if return_weights:
        out, lse, w = _reference.math_(_int_seed(call), return_weights=True)
        return (out, lse.detach(), w) if return_lse else (out, w)
    out, lse = run(module, call)
    return (out, lse) if return_lse else out


def _int_seed(call: Call) -> Call:
    """The call with its dropout seed as a python int (what the torch-op kernels hash with)."""
    return replace(call, seed=int(call.seed)) if isinstance(call.seed, Tensor) else call


def run(module, call: Call) -> Tuple[Tensor, Tensor]:
    """A prepared call through its kernel, differentiable: (out, lse). ``attention`` is ``prepare`` + ``run``;
    callers that need to set the dropout seed themselves (selfattn.distributed) use the two directly.

    Traced (torch.compile, torch.export), a compiled kernel (native, triton) runs behind the ``torch.ops.selfattn``
    ops: one graph node, data read inside. Eager, every kernel runs under the one autograd.Function below: the
    same primitives, the same bits (tests/test_op.py), without the Python custom-op dispatch, which measured ~3x
    the native kernel's own time on a small call (see kernels/op.py)."""
    if module.COMPILED and torch.compiler.is_compiling():
        return _op.run(call, module.NAME)
    call = _int_seed(call)
    grad = torch.is_grad_enabled() and (call.q.requires_grad or call.k.requires_grad or call.v.requires_grad or
                                        (call.bias is not None and call.bias.requires_grad) or
                                        any(p.requires_grad for p in call.mod_params))
    if grad:
        args = (module, call, call.q, call.k, call.v, call.bias, *call.mod_params)
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return _KernelFunction.apply(*args)  # what torch.func and dynamo know how to handle
        # what Function.apply does outside torch.func transforms, less its per-call inspect.signature binding of
        # forward's arguments (forward has no defaults or keywords: the binding returns them unchanged; ~10 µs)
        return _FUNCTION_BASE_APPLY(*unwrap_dead_wrappers(args))
    return module.forward(call)


_FUNCTION_BASE_APPLY = super(torch.autograd.Function, _KernelFunction).apply
