"""The kernel registry: what each kernel declares, and the one rule that chooses among them.

A kernel is any object (the built-in ones are modules) with the attributes of ``Kernel`` below. ``register`` puts
it in the automatic order by its PRIORITY; ``choose(call, name=None, allowed=None)`` is the only place a kernel
is picked -- ``attention()``, ``plan()`` and ring attention all call it, and the CLI's ``--kernel`` choices are
``names()``. Adding a kernel is writing its module and adding one line to ``_BUILTIN`` (or calling ``register``
from outside the package); nothing else names kernels.

Decisions (the kernel contract):

* Declarations are checked here, before the kernel's own ``why_not``, in this order: torch.func transforms
  active and FUNCTORCH false (the kernel reads raw data pointers); device type not in DEVICES; dtype not in
  DTYPES; D or Dv above MAX_HEAD_DIM. The kernel's ``why_not`` may assume these hold and answers the rest (a missing library, a mask it
  cannot evaluate, ...). A kernel's ``why_not`` reads shapes, dtypes and the lowered mask only, never tensor
  values: under ``torch.compile`` the choice is traced, and data-dependent refusals (native's NaN/huge-bias
  checks) are made inside the kernel's run, which then hands the call to a kernel that serves it.
* The automatic rule walks the kernels by PRIORITY (ties: registration order) and takes the first that can
  serve and whose ``automatic(call)`` says ``(True, why)``; a kernel that can serve but is passed over by its own
  rule says why (the reference: too many scores). ``why`` is what ``plan`` prints after "automatic: ".
* ``tiles(call)`` is the (Tq, Tk) tile the kernel itself runs for the call: ``plan`` counts tiles at it.
* A named kernel runs or raises ValueError with its reason: no silent fallback (STYLE.md 9).
* BACKWARD: ``backward(call, grad_out, out, lse, needs)`` or None (no gradient); DIFFERENTIABLE_BACKWARD says
  whether that backward is itself differentiable (double backward), else the autograd wrapper refuses it.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import torch

__all__ = ["Kernel", "register", "unregister", "names", "get", "kernels", "why_not", "reasons", "choose",
           "REQUIRED"]


@runtime_checkable
class Kernel(Protocol):
    NAME: str  # what kernel= and --kernel take
    DEVICES: Optional[Tuple[str, ...]]  # device types served (None: any device torch ops run on)
    DTYPES: Tuple[torch.dtype, ...]  # q/k/v dtypes served
    MAX_HEAD_DIM: Optional[int]  # largest D and Dv served (None: no limit)
    DIFFERENTIABLE_BACKWARD: bool  # backward is itself differentiable (double backward is exact)
    FUNCTORCH: bool  # runs under torch.func transforms (torch ops only, no raw data pointers)
    PRIORITY: int  # automatic order: lower is tried first
    COMPILED: bool  # reads raw data pointers: runs behind the torch.library ops of kernels/op.py

    def why_not(self, call) -> Optional[str]: ...  # None: can serve (beyond the declarations above)

    def automatic(self, call) -> Tuple[bool, str]: ...  # (the automatic rule takes it when it can serve, why)

    def tiles(self, call) -> Tuple[int, int]: ...  # (Tq, Tk) this kernel runs the call with

    def forward(self, call): ...  # -> (out (B, Hq, Nq, Dv), lse (B, Hq, Nq))

    backward: Optional[Callable]  # (call, grad_out, out, lse, needs) -> (dq, dk, dv, dbias, dparams)


REQUIRED = ("NAME", "DEVICES", "DTYPES", "MAX_HEAD_DIM", "DIFFERENTIABLE_BACKWARD", "FUNCTORCH", "PRIORITY",
            "COMPILED", "why_not", "automatic", "tiles", "forward", "backward")

# the automatic order (sorted by PRIORITY) and the name index; mutated in place so that aliases stay current
ORDER: List[Kernel] = []
BY_NAME: Dict[str, Kernel] = {}


_GENERATION = [0]  # bumped by register / unregister: the choice cache's answers hold for one generation


def register(kernel) -> None:
    """Add a kernel (an object or module with every attribute in REQUIRED) to the registry."""
    missing = [a for a in REQUIRED if not hasattr(kernel, a)]
    if missing:
        raise TypeError(f"register: {kernel!r} lacks {missing} of the Kernel protocol (selfattn.kernels.registry)")
    if not isinstance(kernel.NAME, str) or not kernel.NAME:
        raise TypeError(f"register: NAME must be a non-empty str, got {kernel.NAME!r}")
    if kernel.NAME in BY_NAME and BY_NAME[kernel.NAME] is not kernel:
        raise ValueError(f"register: a kernel named {kernel.NAME!r} is already registered")
    if kernel.NAME in BY_NAME:
        return
    BY_NAME[kernel.NAME] = kernel
    ORDER.append(kernel)
    ORDER.sort(key=lambda k: k.PRIORITY)  # stable: ties keep registration order
    _GENERATION[0] += 1


def unregister(name: str) -> None:
    k = BY_NAME.pop(name)
    ORDER.remove(k)
    _GENERATION[0] += 1


def names() -> Tuple[str, ...]:
    """Registered kernel names in the automatic order."""
    return tuple(k.NAME for k in ORDER)


def kernels() -> Tuple[Kernel, ...]:
    return tuple(ORDER)


def get(name: str) -> Kernel:
    if name not in BY_NAME:
        raise ValueError(f"kernel: expected None or one of {names()}, got {name!r}")
    return BY_NAME[name]


def why_not(kernel: Kernel, call) -> Optional[str]:
    """Why this kernel cannot serve the call (its declarations first, then its own why_not), or None."""
    if not kernel.FUNCTORCH and torch._C._are_functorch_transforms_active():
        return "torch.func transforms are active and this kernel reads raw data pointers"
    dev = call.device.type
    if kernel.DEVICES is not None and dev not in kernel.DEVICES:
        return f"it runs on {'/'.join(kernel.DEVICES)} tensors; the tensors are on {call.device}"
    if call.dtype not in kernel.DTYPES:
        served = ", ".join(str(d).replace("torch.", "") for d in kernel.DTYPES)
        return f"dtype {call.dtype} (it serves {served})"
    if kernel.MAX_HEAD_DIM is not None and max(call.D, call.Dv) > kernel.MAX_HEAD_DIM:
        return f"head dim D={call.D}, Dv={call.Dv} above {kernel.MAX_HEAD_DIM}"
    return kernel.why_not(call)


def reasons(call, found: Optional[Dict[str, Optional[str]]] = None) -> Tuple[Tuple[str, Optional[str]], ...]:
    """Every kernel's answer for the call, in the automatic order (xformers' not_supported_reasons); ``found``:
    the answers ``choose`` already gave (with the automatic rule's, for kernels it passed over)."""
    found = found or {}
    return tuple((k.NAME, found[k.NAME] if k.NAME in found else why_not(k, call)) for k in ORDER)


# -- the choice cache (issue 19.3: no re-planning when nothing changed) -------------------------------------------
# An automatic choice for a CPU call is a function of: the call's shapes, dtype, device, mask object (one whose
# data is its own snapshot, at its data version), bias shape/dtype/requires_grad, dropout, offsets and blocks; the
# environment the kernels read; torch.func transforms being active; and each consulted kernel's answers
# (its why_not / automatic functions and the state it names in ``cache_state()``, e.g. native's loaded library).
# The key holds the first group; an entry keeps the second and third and is used only when they still hold.
# Calls with modifiers (bound afresh per call), non-CPU devices, or under tracing are never cached.
_ENV_NAMES = ("SELFATTN_NATIVE", "SELFATTN_NATIVE_ISA", "SELFATTN_REFERENCE_MAX_BYTES", "SELFATTN_TRITON_ON_CPU",
              "TRITON_INTERPRET")
_ENVIRON = os.environ
try:  # os.environ's own mapping (what setenv/putenv through os.environ edit): ~50 ns a read instead of ~1 µs
    _ENV_DATA, _ENV_KEYS = _ENVIRON._data, tuple(_ENVIRON.encodekey(n) for n in _ENV_NAMES)
except AttributeError:  # pragma: no cover - another Python's os.environ
    _ENV_DATA, _ENV_KEYS = None, ()
_CACHE: Dict[tuple, tuple] = {}
_CACHE_MAX = 256


def _env_state() -> tuple:
    if _ENV_DATA is None or os.environ is not _ENVIRON:
        return tuple(os.environ.get(n) for n in _ENV_NAMES)
    d = _ENV_DATA
    return tuple([d.get(k) for k in _ENV_KEYS])


def _kernel_state(k) -> tuple:
    state = getattr(k, "cache_state", None)
    return k, k.why_not, k.automatic, (state() if state is not None else None)


def _cache_key(call, allowed):
    """The key of an automatic choice for this call, or None when it is not cached."""
    q = call.q
    if call.score_mod is not None or q.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    mask = call.mask
    if mask is not None:
        if not mask.cacheable:
            return None
        mask = (id(mask), mask._version())  # the entry holds the mask: its id is not reused while cached
    b = call.bias
    bias = None if b is None else (b.shape, b.dtype, b.requires_grad)
    return (_GENERATION[0], q.dtype, q.shape, call.k.shape, call.v.shape, mask, bias, call.dropout_p,
            call.q_offset, call.k_offset, call.block_q, call.block_k, call.shape_only,
            None if allowed is None else tuple(allowed), _env_state(),
            torch._C._are_functorch_transforms_active(), torch.get_num_threads())  # threads: in native's reason


def choose(call, name: Optional[str] = None, allowed: Optional[Sequence[str]] = None, cache: bool = False):
    """(kernel, reason, {name: why not or None}) for the call. ``name``: the caller's kernel, run or refused
    with its reason. ``allowed``: the names the automatic rule may pick from (ring attention: kernels whose
    backward takes a merged LSE). ``cache``: reuse the automatic choice of an equal earlier call (see the
    choice cache above; attention() asks for it, plan() does not, so plan's reasons are always asked afresh)."""
    if cache and name is None:
        key = _cache_key(call, allowed)
        if key is not None:
            hit = _CACHE.get(key)
            if hit is not None and hit[3] is call.mask and all(_kernel_state(k) == s for k, s in hit[4]):
                return hit[0], hit[1], dict(hit[2])
            k, reason, found = _choose(call, None, allowed)
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            consulted = [BY_NAME[n] for n in found]
            _CACHE[key] = (k, reason, dict(found), call.mask, tuple((c, _kernel_state(c)) for c in consulted))
            return k, reason, found
    return _choose(call, name, allowed)


def _choose(call, name, allowed):
    pool = ORDER if allowed is None else [k for k in ORDER if k.NAME in allowed]
    if name is not None:
        k = get(name)
        if allowed is not None and name not in allowed:
            raise ValueError(f"kernel={name!r} cannot serve this call here: expected None or one of "
                             f"{tuple(allowed)}")
        r = why_not(k, call)
        if r is not None:
            raise ValueError(f"kernel={name!r} cannot serve this call: {r}; use kernel=None (automatic) or "
                             f"another of {names()}")
        return k, "named by the caller", {name: None}
    found: Dict[str, Optional[str]] = {}
    for k in pool:
        r = why_not(k, call)
        found[k.NAME] = r
        if r is not None:
            continue
        take, why = k.automatic(call)
        if take:
            return k, f"automatic: {why}", found
        found[k.NAME] = f"automatic rule: {why}"
    raise ValueError(f"no kernel can serve this call: {found}")


def _register_builtins() -> None:
    from . import decode, native, reference, tiled, triton
    for m in (triton, native, decode, reference, tiled):
        register(m)


_register_builtins()
