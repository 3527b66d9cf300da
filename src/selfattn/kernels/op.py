"""The compiled kernels as torch operators: ``torch.ops.selfattn.forward`` and ``torch.ops.selfattn.backward``.

What reaches a compiled kernel (native, triton: the registry's kernels with COMPILED = True) goes through these two
ops, so ``torch.compile(fullgraph=True)`` and ``torch.export`` see one node per call, ``torch.library.opcheck``
passes, and autograd is registered once (``register_autograd``). Decisions:

* Registration in Python (``torch.library.custom_op``) over the existing ctypes path, not C++ TORCH_LIBRARY:
  the C library has no torch headers (a torch C++ extension costs ~60 s of compile per file and ties the build to
  one torch ABI). The Python op's dispatch is not free: on a (1, 1, 1, 64) x 64-key call it measured 355 µs
  against 112 µs for the native kernel called directly (no grad; 1276 vs 372 µs with autograd, against the
  autograd.Function; a 2-core machine under load ~22, so absolute numbers are inflated ~3x). So the ops are what
  traced code calls (``functional.run`` under ``torch.compiler.is_compiling()``); eager calls run the same kernel
  primitives under functional's autograd.Function. A C++ registration would cut the dispatch, not the mask
  rebuild; it is the next step if compiled small calls matter.
* Schemas hold tensors, ints, floats and int lists only. The mask travels lowered (``pack_mask``): 8 ints per
  atom (code, q0, k0, left, right, index of data tensor a, index of data tensor b, 0) + the program as int codes +
  a tensor list (lengths, prefix lengths, document ids, keep masks, a dense bool mask). Modifiers likewise
  (``pack_mods``): 6 ints per op (code, symmetric/bidirectional, num_buckets, max_distance, q_offset, data index),
  one float per op (softcap's cap) and a tensor list (ALiBi slopes, T5 tables). The dropout seed is a 0-d int64
  tensor (so drawing it needs no ``.item()`` on the traced path).
* Everything that reads tensor data runs inside the op's implementation: the mask's data checks
  (``check_data``), its tile classes, the native kernel's data-dependent hand-over to the tiled kernel (huge
  finite biases, NaN/Inf values under a mask). The path from ``attention()`` to the op reads shapes only.
* Inside, the call is rebuilt (``unpack``): the mask as a ``LoweredMask`` over the built-in masks each atom
  stands for (analytic tile classes where those have them), the modifiers as ``scores`` objects; the kernel's
  own ``forward`` / ``backward`` then run as in eager mode.
* The backward op returns dq, dk, dv always; dbias and each modifier tensor's gradient where asked (``needs``),
  else an empty tensor. Its result is not differentiable again: a double backward raises (``NoDoubleBackward``).
* Custom Python masks and modifiers (no lowering) never reach a compiled kernel (its ``why_not`` says so): they
  keep the eager torch-op kernels.

Shape legend: B batch, Hq/Hkv heads, Nq/Nk lengths, D/Dv head dims.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import masks as _masks
from .. import scores as _scores
from .common import compute_dtype
from .call import Call
from .lowering import ATOM_CODES, MOD_CODES, OP_CODES

__all__ = ["COMPILED", "pack_mask", "pack_mods", "unpack", "LoweredMask", "run", "NoDoubleBackward"]

COMPILED = ("native", "triton")  # the kernel id in the ops' schema indexes this
_ATOM_NAMES = {v: k for k, v in ATOM_CODES.items()}
_OP_NAMES = {v: k for k, v in OP_CODES.items()}
_MOD_NAMES = {v: k for k, v in MOD_CODES.items()}
ATOM_INTS, MOD_INTS = 8, 6


# ---------------------------------------------------------------------------------------------------------------
# the call as schema arguments, and back
def pack_mask(lw) -> Tuple[List[int], List[int], List[Tensor]]:
    """``masks.Lowered`` -> (ints: ATOM_INTS per atom, program codes, data tensors). Reads no tensor data."""
    if lw is None:
        return [], [], []
    ints: List[int] = []
    data: List[Tensor] = []

    def put(t):
        data.append(t)
        return len(data) - 1

    for a in lw.atoms:
        ia = ib = -1
        if a.kind == "pad_len":
            ia = put(a.lengths)
        elif a.kind == "prefix":
            ia = put(a.prefix)
        elif a.kind == "pad_keep":
            ia = put(a.keep)
        elif a.kind == "dense":
            ia = put(a.t)
        elif a.kind == "document":
            ia, ib = put(a.ids_q), put(a.ids_k)
        left = a.left if a.left is not None else 0
        right = a.right if a.right is not None else 0
        ints += [ATOM_CODES[a.kind], a.q0, a.k0, left, right, ia, ib, 0]
    prog = [x if isinstance(x, int) else OP_CODES[x] for x in lw.program]
    return ints, prog, data


def pack_mods(score_mod) -> Tuple[List[int], List[float], List[Tensor]]:
    """Bound modifiers -> (ints: MOD_INTS per op, floats: one per op, data tensors). Reads no tensor data."""
    if score_mod is None:
        return [], [], []
    ints: List[int] = []
    floats: List[float] = []
    data: List[Tensor] = []
    for op in score_mod.lower():
        q_off = int(getattr(op, "q_offset", 0))
        if op.kind == "alibi":
            ints += [MOD_CODES["alibi"], int(op.symmetric), 0, 0, q_off, len(data)]
            data.append(torch.as_tensor(op.slopes, dtype=torch.float64))
            floats.append(0.0)
        elif op.kind == "t5":
            ints += [MOD_CODES["t5"], int(op.bidirectional), op.num_buckets, op.max_distance, q_off, len(data)]
            data.append(op.table)
            floats.append(0.0)
        else:
            ints += [MOD_CODES["softcap"], 0, 0, 0, 0, -1]
            floats.append(float(op.cap))
    return ints, floats, data


def _atom_mask(kind: str, a, b) -> _masks.Mask:
    """The built-in mask an atom stands for, evaluated at the atom's own positions (``LoweredMask``)."""
    if kind == "causal":
        return _masks.causal("top_left")
    if kind == "pad_len" or kind == "pad_keep":
        return _masks.key_padding(a)
    if kind == "prefix":
        return _masks.prefix_lm(a, "top_left")
    if kind == "document":
        return _masks.document(a, b)
    if kind == "dense":
        return _masks.from_tensor(a)
    raise ValueError(f"mask atom {kind!r}: no built-in mask")  # pragma: no cover - codes come from pack_mask


class LoweredMask(_masks.Mask):
    """A mask rebuilt from its lowering inside the op: each atom is a built-in mask placed at its own (q0, k0)
    (the call's offsets are already folded into them), combined by the postfix program. Its ``lower`` returns
    the lowering it came from; tile classes combine the atoms' (analytic where theirs are)."""

    def __init__(self, ints: Sequence[int], prog: Sequence[int], data: Sequence[Tensor]):
        atoms, self.parts = [], []
        for n in range(0, len(ints), ATOM_INTS):
            code, q0, k0, left, right, ia, ib, _ = ints[n:n + ATOM_INTS]
            kind = _ATOM_NAMES[code]
            a = data[ia] if ia >= 0 else None
            b = data[ib] if ib >= 0 else None
            fields = {"causal": {}, "window": dict(left=left, right=right), "pad_len": dict(lengths=a),
                      "pad_keep": dict(keep=a), "prefix": dict(prefix=a), "dense": dict(t=a),
                      "document": dict(ids_q=a, ids_k=b)}[kind]
            atoms.append(_masks.Atom(kind, q0, k0, **fields))
            m = _masks.sliding_window(left, right, "top_left") if kind == "window" else _atom_mask(kind, a, b)
            self.parts.append((m, q0, k0))
        self.program = tuple(x if x >= 0 else _OP_NAMES[x] for x in prog)
        self.lowered = _masks.Lowered(atoms, self.program)

    def _run(self, leaf, both, either, negate):
        stack = []
        for x in self.program:
            if isinstance(x, int):
                stack.append(leaf(*self.parts[x]))
            elif x == "not":
                stack.append(negate(stack.pop()))
            else:
                y, z = stack.pop(), stack.pop()
                stack.append(both(z, y) if x == "and" else either(z, y))
        return stack.pop()

    def lower(self, Nq, Nk, q_offset=None, k_offset=0):
        return self.lowered

    def mask_mod(self, q_idx, k_idx, Nq, Nk, q_offset=None, k_offset=0):
        return self._run(lambda m, q0, k0: m.mask_mod(q_idx, k_idx, Nq, Nk, q0, k0),
                         lambda a, b: a & b, lambda a, b: a | b, lambda a: ~a)

    def _block_classes(self, B, H, Nq, Nk, block_q, block_k, device=None, q_offset=None, k_offset=0):
        F, E = _masks.FULL, _masks.EMPTY

        def both(a, b):  # FULL iff both FULL, EMPTY if either EMPTY
            return torch.where((a == E) | (b == E), E, torch.where((a == F) & (b == F), F, _masks.PARTIAL))

        def either(a, b):
            return torch.where((a == F) | (b == F), F, torch.where((a == E) & (b == E), E, _masks.PARTIAL))

        cls = self._run(lambda m, q0, k0: m.block_classes(B, H, Nq, Nk, block_q, block_k, device, q0, k0),
                        both, either, lambda c: F - c)
        return cls.to(torch.int8)

    def check_data(self, B, H, Nq, Nk, q_offset=None, k_offset=0):
        """The atoms' data checks at the call's own offsets (what the original mask's check_data would say; the
        shape checks again too: data handed to the op may not be the data the traced path saw)."""
        for m, _, _ in self.parts:
            m.check_shape(B, H, Nq, Nk, q_offset, k_offset)
            m.check_data(B, H, Nq, Nk, q_offset, k_offset)

    def __repr__(self):
        return f"LoweredMask({self.lowered!r})"


def _rebuild_mods(ints, floats, data) -> Optional[_scores.ScoreMod]:
    mods = []
    for n in range(0, len(ints), MOD_INTS):
        code, flag, num_buckets, max_distance, q_off, i = ints[n:n + MOD_INTS]
        kind = _MOD_NAMES[code]
        if kind == "alibi":
            mods.append(_scores.ALiBi(data[i], symmetric=bool(flag), q_offset=q_off))
        elif kind == "t5":
            mods.append(_scores.T5Relative(data[i], bool(flag), num_buckets, max_distance, q_off))
        else:
            mods.append(_scores.Softcap(floats[n // MOD_INTS]))
    return _scores.compose(*mods) if mods else None


_MASKS: dict = {}  # (ints, program) -> LoweredMask, for masks without data: their tile classes stay cached


def _lowered_mask(ints, prog, data) -> LoweredMask:
    if data:  # data may change between calls under the same ints: rebuilt (cheap; classes recomputed)
        return LoweredMask(ints, prog, data)
    key = (tuple(ints), tuple(prog))
    if key not in _MASKS:
        if len(_MASKS) >= 256:
            _MASKS.clear()
        _MASKS[key] = LoweredMask(ints, prog, data)
    return _MASKS[key]


def unpack(q, k, v, bias, mask_data, mask_ints, mask_prog, mod_data, mod_ints, mod_floats, scale, dropout_p,
           seed, q_offset, k_offset, block_q, block_k) -> Call:
    """The Call the op's arguments describe (inside the op: may read tensor data)."""
    mask = _lowered_mask(mask_ints, mask_prog, mask_data) if mask_ints else None
    if mask is not None:
        mask.check_data(q.shape[0], q.shape[1], q.shape[2], k.shape[2], q_offset, k_offset)
    return Call(q, k, v, mask=mask, bias=bias, bias_shape=tuple(bias.shape) if bias is not None else None,
                score_mod=_rebuild_mods(mod_ints, mod_floats, mod_data), scale=scale, dropout_p=dropout_p,
                seed=int(seed) if dropout_p > 0.0 else 0, q_offset=q_offset, k_offset=k_offset, return_lse=True,
                block_q=block_q or None, block_k=block_k or None)


def _kernel(kernel_id: int):
    from . import registry
    return registry.get(COMPILED[kernel_id])


# ---------------------------------------------------------------------------------------------------------------
# the ops
@torch.library.custom_op("selfattn::forward", mutates_args=())
def forward(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], mask_data: List[Tensor],
            mask_ints: List[int], mask_prog: List[int], mod_data: List[Tensor], mod_ints: List[int],
            mod_floats: List[float], scale: float, dropout_p: float, seed: Tensor, q_offset: Optional[int],
            k_offset: int, kernel: int, block_q: int, block_k: int) -> Tuple[Tensor, Tensor]:
    """out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) in the compute dtype."""
    call = unpack(q, k, v, bias, mask_data, mask_ints, mask_prog, mod_data, mod_ints, mod_floats, scale,
                  dropout_p, seed, q_offset, k_offset, block_q, block_k)
    out, lse = _kernel(kernel).forward(call)
    return out.contiguous(), lse.contiguous()  # the fake implementation's strides


@forward.register_fake
def _(q, k, v, bias, mask_data, mask_ints, mask_prog, mod_data, mod_ints, mod_floats, scale, dropout_p, seed,
      q_offset, k_offset, kernel, block_q, block_k):
    B, Hq, Nq, _ = q.shape
    return (q.new_empty((B, Hq, Nq, v.shape[3])), q.new_empty((B, Hq, Nq), dtype=compute_dtype(q.dtype)))


@torch.library.custom_op("selfattn::backward", mutates_args=())
def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], out: Tensor, lse: Tensor,
             mask_data: List[Tensor], mask_ints: List[int], mask_prog: List[int], mod_data: List[Tensor],
             mod_ints: List[int], mod_floats: List[float], scale: float, dropout_p: float, seed: Tensor,
             q_offset: Optional[int], k_offset: int, kernel: int, block_q: int, block_k: int,
             needs: List[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    """(dq, dk, dv, dbias, dmods): needs = [bias, one per mod_data tensor]; not needed -> an empty tensor."""
    grads = [bool(n) for n in needs[1:]]
    mod_data = [t.detach().requires_grad_(True) if g else t for t, g in zip(mod_data, grads)]  # T5 tables
    call = unpack(q, k, v, bias, mask_data, mask_ints, mask_prog, mod_data, mod_ints, mod_floats, scale,
                  dropout_p, seed, q_offset, k_offset, block_q, block_k)
    params = call.mod_params
    dq, dk, dv, dbias, dparams = _kernel(kernel).backward(call, grad_out, out, lse,
                                                          (True, True, True, bool(needs[0]), any(grads)))
    by_id = {id(p): d for p, d in zip(params, dparams)}
    dmods = [by_id[id(t)].detach() if g and by_id.get(id(t)) is not None else
             (torch.zeros_like(t) if g else t.new_empty((0,))) for t, g in zip(mod_data, grads)]
    dbias = dbias if (needs[0] and dbias is not None) else q.new_empty((0,))  # outputs never alias each other
    # contiguous, as the fake implementation says (whatever the inputs' strides: compiled graphs view them)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dbias.contiguous(), [d.contiguous() for d in dmods]


@backward.register_fake
def _(grad_out, q, k, v, bias, out, lse, mask_data, mask_ints, mask_prog, mod_data, mod_ints, mod_floats, scale,
      dropout_p, seed, q_offset, k_offset, kernel, block_q, block_k, needs):
    dbias = bias.new_empty(bias.shape) if (needs[0] and bias is not None) else q.new_empty((0,))
    dmods = [t.new_empty(t.shape) if g else t.new_empty((0,)) for t, g in zip(mod_data, needs[1:])]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dmods  # contiguous


class NoDoubleBackward(torch.autograd.Function):
    """Identity on a first-order gradient whose kernel has no differentiable backward: differentiating it again
    (create_graph=True, then backward; or torch.func.grad of a grad) raises instead of silently dropping the
    second-order terms."""

    @staticmethod
    def forward(name, g, anchor):
        return g.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"kernel={ctx.name!r} has no double backward: its backward is not itself differentiable; "
                           f"use kernel='reference' for higher-order gradients")


_ARGS = ("bias", "mask_data", "mask_ints", "mask_prog", "mod_data", "mod_ints", "mod_floats", "scale", "dropout_p",
         "seed", "q_offset", "k_offset", "kernel", "block_q", "block_k")


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    rest = dict(zip(_ARGS, inputs[3:]))
    out, lse = output
    ctx.rest = {n: x for n, x in rest.items() if n not in ("bias", "mask_data", "mod_data", "seed")}
    ctx.n_mask, ctx.n_mod = len(rest["mask_data"]), len(rest["mod_data"])
    ctx.has_bias = rest["bias"] is not None
    ctx.mod_grad = [t.requires_grad for t in rest["mod_data"]]
    # autograd wants the inputs' pytree back: a list for tensor lists and empty lists, a leaf for the rest
    ctx.list_lengths = [len(x) if isinstance(x, (list, tuple)) and (n in ("mask_data", "mod_data") or not x)
                        else None for n, x in rest.items()]
    bias = rest["bias"] if ctx.has_bias else q.new_empty((0,))
    ctx.save_for_backward(q, k, v, bias, out, lse, rest["seed"], *rest["mask_data"], *rest["mod_data"])
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, bias, out, lse, seed, *data = ctx.saved_tensors
    mask_data, mod_data = data[:ctx.n_mask], data[ctx.n_mask:]
    bias = bias if ctx.has_bias else None
    n = ctx.needs_input_grad
    i_bias, i_mods = 3, 3 + _ARGS.index("mod_data")
    # the mod_data list is one input to autograd: ask for the tables that required grad when it is needed
    want_mods = bool(n[i_mods])
    needs = [int(bool(n[i_bias]) and bias is not None)] + [int(want_mods and g) for g in ctx.mod_grad]
    r = ctx.rest
    dq, dk, dv, dbias, dmods = torch.ops.selfattn.backward(
        dout.contiguous(), q, k, v, bias, out, lse, list(mask_data), r["mask_ints"], r["mask_prog"],
        list(mod_data), r["mod_ints"], r["mod_floats"], r["scale"], r["dropout_p"], seed, r["q_offset"],
        r["k_offset"], r["kernel"], r["block_q"], r["block_k"], needs)
    name = COMPILED[r["kernel"]]
    if torch.is_grad_enabled():  # create_graph: the graph reaches the refusal, not a silently wrong zero
        dq, dk, dv = (NoDoubleBackward.apply(name, g, t) for g, t in zip((dq, dk, dv), (q, k, v)))
        if needs[0]:
            dbias = NoDoubleBackward.apply(name, dbias, bias)
    grads = [None, None, None] + [[None] * n if n is not None else None for n in ctx.list_lengths]
    grads[0], grads[1], grads[2] = dq, dk, dv
    grads[i_bias] = dbias if needs[0] else None
    if want_mods:
        grads[i_mods] = [d if w else None for d, w in zip(dmods, needs[1:])]
    return tuple(grads)  # the inputs' structure: a list for each tensor-list argument


forward.register_autograd(_backward, setup_context=_setup_context)


def op_args(call: Call, kernel_name: str) -> tuple:
    """The arguments of ``torch.ops.selfattn.forward`` for a call of this compiled kernel. Reads the call's shapes
    and its lowering only (no tensor data)."""
    mask_ints, mask_prog, mask_data = pack_mask(call.lowered_mask())
    mod_ints, mod_floats, mod_data = pack_mods(call.score_mod)
    seed = call.seed if isinstance(call.seed, Tensor) else torch.tensor(int(call.seed), dtype=torch.int64)
    return (call.q, call.k, call.v, call.bias, mask_data, mask_ints, mask_prog, mod_data, mod_ints, mod_floats,
            float(call.scale), float(call.dropout_p), seed, call.q_offset, int(call.k_offset),
            COMPILED.index(kernel_name), call.block_q or 0, call.block_k or 0)


def run(call: Call, kernel_name: str) -> Tuple[Tensor, Tensor]:
    """A call of a compiled kernel through ``torch.ops.selfattn.forward``: (out, lse), differentiable."""
    return torch.ops.selfattn.forward(*op_args(call, kernel_name))
