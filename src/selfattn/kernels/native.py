"""The native kernel: fused CPU attention in C++ (src/selfattn/csrc/), forward, backward and decode.

Build route (decided, issue 10): plain C++17 with a C ABI over data pointers and element strides, no torch headers
(torch's C++ extension headers take ~60 s to compile one file; this builds in seconds of CPU time with g++),
compiled at ``pip install`` by setup.py through scripts/build_native.py (``bash scripts/build-native.sh`` rebuilds
a checkout in place) into ``kernels/_native/libselfattn_native.so`` and loaded here with ctypes, which releases
the GIL during the call.
The library holds a portable, an AVX2+FMA and an AVX-512 build of every kernel and picks one on the running CPU;
``SELFATTN_NATIVE_ISA=scalar|avx2|avx512|avx512bf16`` forces one (tests run each), ``SELFATTN_NATIVE=0`` turns the kernel
off. No lazy build: a missing library is reported by ``why_not`` (``selfattn plan`` prints it) and the
torch-op kernels serve instead -- compiling inside an import would surprise users and race between processes.

What native.py checks for the C side (which assumes nothing): CPU tensors of one float dtype, the bias converted
to the compute dtype, strides passed as they are (K/V caches and transposed views are read in place; 0 on
broadcast dims), outputs and gradients allocated contiguous here. The mask arrives lowered (atoms + postfix
program, ``masks.Lowered``) with its tile classes at the kernel's block sizes; ALiBi and T5 modifiers become
per-head tables over the call's key-query distances (Nq + Nk - 1 values per head), softcap is evaluated in C.

Threads: ``torch.get_num_threads()`` per call, run by a persistent pool inside the library (made on first use,
reset in a forked child); one process-wide lock around native calls so that several Python threads calling at
once queue rather than oversubscribe the cores. Results never depend on the thread count: every output element
is written by one work item summing in a fixed order, tiles depend on the shape only, key splits (decode) are
merged in split order. Memory: the library keeps an arena between calls (the largest call's packed tiles and
per-thread scratch, about the size of its K, V -- and Q, dO for the backward -- in fp32), so calls do not
page-fault afresh. ``SELFATTN_NATIVE_ARENA_MAX`` (bytes, read when the library loads) caps what the kernel holds
at once; every allocation in the C side is checked, and one refused raises MemoryError naming the size after
the call has released what it took. ``SELFATTN_NATIVE_LIB`` loads another build (scripts/sanitize.sh: ASan/UBSan).

bf16 on CPUs with AVX512_BF16 (ISA "avx512bf16", the default there): both forward GEMMs run in vdpbf16ps on the
bf16 inputs (exact products, fp32 sums), P is rounded to bf16 once for P·V; scores, max, sum and O stay fp32.
Elsewhere (and for the backward) bf16/fp16 are converted to fp32 while tiles are packed.

Shape legend: B batch, Hq/Hkv heads (G = Hq // Hkv), Nq/Nk lengths, D/Dv head dims, Tq/Tk tile sizes,
nd = Nq + Nk - 1 distances.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from .common import as_4d, compute_dtype
from .lowering import (ATOM_CODES, C_MOD_DIST, C_MOD_SOFTCAP, DECODE_MAX_ROWS, DTYPE_CODES, MAX_MODS, dist_table,
                       dropout_threshold, program_codes, strides0, t5_buckets)

NAME = "native"
COMPILED = True  # runs behind torch.ops.selfattn.forward / backward (kernels/op.py)
DEVICES = ("cpu",)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FUNCTORCH = False  # reads raw data pointers
DIFFERENTIABLE_BACKWARD = False
PRIORITY = 10  # first on CPU whenever it can serve
# SELFATTN_NATIVE_LIB loads another build (scripts/sanitize.sh: the ASan/UBSan one)
LIB_PATH = Path(os.environ.get("SELFATTN_NATIVE_LIB") or
                Path(__file__).resolve().parent / "_native" / "libselfattn_native.so")
BUILD_HINT = ("install a C++17 compiler and reinstall selfattn (pip rebuilds the library), or in a checkout run "
              "bash scripts/build-native.sh")
ABI_VERSION = 4
MAX_HEAD_DIM = 512  # scratch tiles are sized by D and Dv; beyond this they stop fitting in L2
MAX_DBIAS_BUFFER = 1 << 28  # elements of the per-item partial sums of a broadcast bias's gradient
_ISAS = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512bf16": 3}  # avx512bf16: bf16 forward GEMMs in vdpbf16ps
_LOCK = threading.Lock()


def _after_fork_in_child():
    """A forked child starts with a fresh lock, whatever the parent's threads held (the C pool resets itself in
    its own pthread_atfork handler)."""
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------------------------------------------
# the ABI (mirrors csrc/abi.h field for field)

class _Atom(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("pad_", ctypes.c_int32), ("q0", ctypes.c_int64), ("k0", ctypes.c_int64),
                ("left", ctypes.c_int64), ("right", ctypes.c_int64),
                ("ia", ctypes.c_void_p), ("ia_sb", ctypes.c_int64), ("ia_sn", ctypes.c_int64),
                ("ib", ctypes.c_void_p), ("ib_sb", ctypes.c_int64), ("ib_sn", ctypes.c_int64),
                ("u8", ctypes.c_void_p), ("u8_s", ctypes.c_int64 * 4),
                ("ia_n", ctypes.c_int64), ("ib_n", ctypes.c_int64), ("u8_n", ctypes.c_int64)]


class _Mod(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("grad", ctypes.c_int32), ("dist", ctypes.c_void_p),
                ("dgrad", ctypes.c_void_p), ("cap", ctypes.c_double),
                ("dist_n", ctypes.c_int64), ("dgrad_n", ctypes.c_int64)]


_I4 = ctypes.c_int64 * 4


class _Params(ctypes.Structure):
    _fields_ = [("abi", ctypes.c_int32), ("dtype", ctypes.c_int32), ("nthreads", ctypes.c_int32),
                ("isa", ctypes.c_int32),
                ("B", ctypes.c_int64), ("Hq", ctypes.c_int64), ("Hkv", ctypes.c_int64), ("Nq", ctypes.c_int64),
                ("Nk", ctypes.c_int64), ("D", ctypes.c_int64), ("Dv", ctypes.c_int64),
                ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
                ("sq", _I4), ("sk", _I4), ("sv", _I4),
                ("out", ctypes.c_void_p), ("so", _I4), ("lse", ctypes.c_void_p), ("scale", ctypes.c_double),
                ("bias", ctypes.c_void_p), ("sbias", _I4),
                ("n_atoms", ctypes.c_int32), ("n_prog", ctypes.c_int32),
                ("atoms", ctypes.c_void_p), ("prog", ctypes.c_void_p),
                ("classes", ctypes.c_void_p), ("cls_s", _I4), ("bq", ctypes.c_int64), ("bk", ctypes.c_int64),
                ("n_mods", ctypes.c_int32), ("pad2_", ctypes.c_int32), ("mods", _Mod * 4),
                ("dmin", ctypes.c_int64), ("ndist", ctypes.c_int64),
                ("q_pos0", ctypes.c_int64), ("k_pos0", ctypes.c_int64),
                ("dropout_p", ctypes.c_double), ("seed", ctypes.c_uint32), ("pad3_", ctypes.c_uint32),
                ("drop_thresh", ctypes.c_uint64),
                ("dout", ctypes.c_void_p), ("sdo", _I4), ("o", ctypes.c_void_p), ("sout", _I4),
                ("dq", ctypes.c_void_p), ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p),
                ("dbias_buf", ctypes.c_void_p), ("dbias_rows", ctypes.c_int64), ("dbias_cols", ctypes.c_int64),
                ("dbias_heads", ctypes.c_int32), ("pad4_", ctypes.c_int32)] + \
        [(f"{n}_n", ctypes.c_int64) for n in ("q", "k", "v", "out", "lse", "bias", "cls", "dout", "o", "dq", "dk",
                                             "dv", "dbias")]


_lib = None
_load_error: Optional[str] = None


def _load():
    """The library, loaded once; None (and _load_error set) when it is absent or stale."""
    global _lib, _load_error
    if _lib is not None or _load_error is not None:
        return _lib
    if not LIB_PATH.exists():
        note = LIB_PATH.with_name("build-error.txt")  # the install-time build's reason (scripts/build_native.py)
        why = note.read_text().strip() if note.is_file() else f"{LIB_PATH} missing"
        _load_error = f"native library not built: {why}; {BUILD_HINT}"
        return None
    try:
        lib = ctypes.CDLL(str(LIB_PATH))
        lib.sa_abi_version.restype = ctypes.c_int
        if lib.sa_abi_version() != ABI_VERSION:
            _load_error = (f"native library at {LIB_PATH} is stale (ABI {lib.sa_abi_version()}, expected "
                           f"{ABI_VERSION}); {BUILD_HINT}")
            return None
        for fn in (lib.sa_forward, lib.sa_backward):
            fn.argtypes = [ctypes.POINTER(_Params)]
            fn.restype = ctypes.c_int
        lib.sa_best_isa.restype = ctypes.c_int
        lib.sa_isa_name.restype = ctypes.c_char_p
        lib.sa_isa_name.argtypes = [ctypes.c_int]
        lib.sa_last_error.restype = ctypes.c_char_p
    except OSError as e:
        _load_error = f"native library at {LIB_PATH} failed to load ({e}); {BUILD_HINT}"
        return None
    _lib = lib
    return lib


def cache_state():
    """What this kernel's answers read besides the call and the environment (the registry's choice cache holds an
    answer only while this is unchanged): the library, its load error and path."""
    return _lib, _load_error, LIB_PATH


_ENVIRON = os.environ
try:  # os.environ's own mapping (what os.environ[...] = and monkeypatch.setenv edit): a read costs ~50 ns, not ~1 µs
    _ENV_DATA, _ENCODE = _ENVIRON._data, _ENVIRON.encodekey
except AttributeError:  # pragma: no cover - another Python's os.environ
    _ENV_DATA = None


def _env(name: str, key) -> Optional[str]:
    """os.environ.get(name), read per call (tests set it): the raw value (bytes on POSIX) is only compared."""
    if _ENV_DATA is None or os.environ is not _ENVIRON:
        return os.environ.get(name)
    return _ENV_DATA.get(key)


_NATIVE_KEY = _ENCODE("SELFATTN_NATIVE") if _ENV_DATA is not None else None
_ISA_KEY = _ENCODE("SELFATTN_NATIVE_ISA") if _ENV_DATA is not None else None


def _disabled() -> Optional[str]:
    if _env("SELFATTN_NATIVE", _NATIVE_KEY) is None:
        return None
    if os.environ.get("SELFATTN_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return "disabled by SELFATTN_NATIVE=0"
    return None


def available() -> bool:
    return _disabled() is None and _load() is not None


_ISA_NAMES: dict = {}  # ISA code (-1: the best this CPU runs) -> name, asked once (ctypes calls are not traceable)


def isa() -> str:
    """The instruction set native calls use now (SELFATTN_NATIVE_ISA or the best this CPU runs)."""
    if not _ISA_NAMES:
        lib = _load()
        if lib is None:
            return "none"
        _ISA_NAMES.update({n: lib.sa_isa_name(n).decode() for n in _ISAS.values()})
        _ISA_NAMES[-1] = _ISA_NAMES[lib.sa_best_isa()]
    return _ISA_NAMES[_isa_request()]


def _isa_request() -> int:
    if _env("SELFATTN_NATIVE_ISA", _ISA_KEY) is None:  # the common case, without the decoding below
        return -1
    name = os.environ.get("SELFATTN_NATIVE_ISA", "").strip().lower()
    if not name or name == "auto":
        return -1
    if name not in _ISAS:
        raise ValueError(f"SELFATTN_NATIVE_ISA: expected one of {sorted(_ISAS)} or 'auto', got {name!r}")
    return _ISAS[name]


# ---------------------------------------------------------------------------------------------------------------
# lowering the call

def _ptr(t: Optional[Tensor]):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _n(t: Optional[Tensor]) -> int:
    """Elements allocated from t's first element to its storage's end: what the C side checks every index
    it derives for t against."""
    if t is None or t.numel() == 0:
        return 0
    return t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


def _s4(t: Tensor):
    """strides0(t) of a 4-D tensor as the C side's int64[4] (0 on size-1 dims), without the generic loop."""
    a, b, c, d = t.shape
    sa, sb, sc, sd = t.stride()
    return _I4(0 if a == 1 else sa, 0 if b == 1 else sb, 0 if c == 1 else sc, 0 if d == 1 else sd)


def _pn(t: Tensor):
    """(_ptr(t), _n(t)) of a tensor, in one pass."""
    if t.numel() == 0:
        return None, 0
    return t.data_ptr(), t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


_POS_MAX = 1 << 60  # csrc: positions and window sides beyond this are refused
_MAX_TILE, _MAX_TILE_SCORES = 1 << 16, 1 << 24  # csrc's tile limit; per-thread scratch stays <= 64 MiB


def _side(x) -> int:
    """A window side as int64: beyond 2^60 it already reaches every key of any call the C side accepts."""
    return max(-_POS_MAX, min(_POS_MAX, int(x)))


def tiles(call) -> Tuple[int, int]:
    """The (Tq, Tk) tiles this kernel runs a call with (what ``plan`` prints for it)."""
    return _blocks(call)


def _blocks(call) -> Tuple[int, int]:
    """Tile sizes (Tq, Tk), from the shape alone (tiles must not depend on the thread count: a PARTIAL tile's
    key trimming changes summation order). The decode path takes all G·Nq ≤ 16 rows at once and long key tiles;
    otherwise R = G·Tq ≈ 64 stacked rows and Tk = 128 keys: Q (R x D), K^T, V and S (R x Tk) stay in L2 and one
    GEMM panel in L1 (benchmarks/NOTES.md, "Native kernel": 64x64 ... 128x256 measured within noise of each
    other at N = 512-4096)."""
    G, Nq = call.G, call.Nq
    if call.block_q is not None or call.block_k is not None:
        return (call.block_q or 64), (call.block_k or 128)
    if G * Nq <= DECODE_MAX_ROWS:
        return max(Nq, 1), 512
    if call.mask is not None and Nq <= 256:
        # short masked sequences: 32-row blocks skip more of a causal triangle (measured 10-20% at N=128)
        return max(1, min(Nq, max(16, 32 // G) if G > 1 else 32)), 128
    return max(1, min(Nq, max(16, 64 // G) if G > 1 else 64)), 128


def _mods_reason(call) -> Optional[str]:
    return call.lowered_mods_reason("native kernel", MAX_MODS)


class _Lowered:
    """Everything a native call reads, with the tensors it points into kept alive."""

    def __init__(self, call, bq: int, bk: int, grad_mods: bool = False, nqb_bwd: int = 0):
        self.keep = []
        self.p = p = _Params()
        q, k, v = call.q, call.k, call.v
        cdt = compute_dtype(q.dtype)
        self.cdt = cdt
        p.abi, p.dtype, p.nthreads, p.isa = ABI_VERSION, DTYPE_CODES[q.dtype], max(1, torch.get_num_threads()), \
            _isa_request()
        (p.B, p.Hq, p.Nq, p.D), (_, p.Hkv, p.Nk, _), p.Dv = q.shape, k.shape, v.shape[3]  # what Call's properties read
        (p.q, p.q_n), (p.k, p.k_n), (p.v, p.v_n) = _pn(q), _pn(k), _pn(v)
        p.sq, p.sk, p.sv = _s4(q), _s4(k), _s4(v)
        p.scale = float(call.scale)
        p.bq, p.bk = bq, bk
        if call.bias is not None:
            b4 = as_4d(call.bias).detach().to(cdt)
            self.keep.append(b4)
            p.bias, p.sbias = _ptr(b4), _I4(*strides0(b4))
            p.bias_n = _n(b4)
        self._mask(call, bq, bk)
        self._mods(call, cdt, grad_mods, nqb_bwd)
        p.q_pos0, p.k_pos0 = int(call.q_offset if call.q_offset is not None else call.k_offset), int(call.k_offset)
        if call.dropout_p > 0.0:
            p.dropout_p = float(call.dropout_p)
            p.seed = int(call.seed) & 0xFFFFFFFF
            p.drop_thresh = dropout_threshold(call.dropout_p)

    def _mask(self, call, bq, bk):
        mask = call.mask
        if mask is None:
            return
        if not mask.cacheable:  # reads a caller's tensor each call: lowered afresh
            self._mask_fresh(call, bq, bk)
            return
        # per mask object, shape, offsets, tiles and data version: the atoms, program and tile classes (a mask
        # whose data is its own snapshot; the C side gets fresh copies of the ctypes arrays, never the cached ones)
        key = (call.B, call.Hq, call.Nq, call.Nk, call.q_offset, call.k_offset, bq, bk, mask._version())
        memo = mask.__dict__.setdefault("_native_memo", {})
        hit = memo.get(key)
        if hit is None:
            if len(memo) > 32:
                memo.clear()
            fresh = _Lowered.__new__(_Lowered)
            fresh.keep, fresh.p = [], _Params()
            fresh._mask_fresh(call, bq, bk)
            fp = fresh.p
            hit = memo[key] = (fresh.keep, fp.n_atoms, fp.n_prog, fp.classes, _I4(*fp.cls_s), fp.cls_n)
        keep, n_atoms, n_prog, classes, cls_s, cls_n = hit
        atoms, prog = keep[-3], keep[-2]  # _mask_fresh keeps [..., atoms, prog, classes] last
        atoms = type(atoms).from_buffer_copy(atoms)
        prog = type(prog).from_buffer_copy(prog)
        self.keep += keep
        self.keep += [atoms, prog]
        p = self.p
        p.n_atoms, p.n_prog = n_atoms, n_prog
        p.atoms, p.prog = ctypes.addressof(atoms), ctypes.addressof(prog)
        p.classes, p.cls_s, p.cls_n = classes, cls_s, cls_n  # a ctypes array field assigned by copy

    def _mask_fresh(self, call, bq, bk):
        p = self.p
        lw = call.lowered_mask()
        if lw is None:
            return
        atoms = (_Atom * max(1, len(lw.atoms)))()
        for n, a in enumerate(lw.atoms):
            at = atoms[n]
            at.kind, at.q0, at.k0 = ATOM_CODES[a.kind], int(a.q0), int(a.k0)
            if a.kind == "window":
                at.left, at.right = _side(a.left), _side(a.right)
            elif a.kind in ("pad_len", "prefix"):
                x = (a.lengths if a.kind == "pad_len" else a.prefix).to(torch.int64).contiguous()
                self.keep.append(x)
                at.ia, at.ia_sb, at.ia_n = _ptr(x), (1 if x.shape[0] > 1 else 0), _n(x)
            elif a.kind == "document":
                iq, ik = a.ids_q.to(torch.int64).contiguous(), a.ids_k.to(torch.int64).contiguous()
                self.keep += [iq, ik]
                at.ia, at.ia_sb, at.ia_sn = _ptr(iq), (iq.shape[1] if iq.shape[0] > 1 else 0), 1
                at.ib, at.ib_sb, at.ib_sn = _ptr(ik), (ik.shape[1] if ik.shape[0] > 1 else 0), 1
                at.ia_n, at.ib_n = _n(iq), _n(ik)
            elif a.kind in ("pad_keep", "dense"):
                t = (a.keep if a.kind == "pad_keep" else a.t).contiguous().view(torch.uint8)
                self.keep.append(t)
                at.u8, at.u8_n = _ptr(t), _n(t)
                s = strides0(t)
                at.u8_s = _I4(s[0], 0, 0, s[1]) if a.kind == "pad_keep" else _I4(*s)
        prog = (ctypes.c_int32 * max(1, len(lw.program)))(*program_codes(lw.program))
        self.keep += [atoms, prog]
        p.n_atoms, p.n_prog = len(lw.atoms), len(lw.program)
        p.atoms, p.prog = ctypes.addressof(atoms), ctypes.addressof(prog)
        cls = call.block_classes(bq, bk).to(torch.int8).contiguous()
        self.keep.append(cls)  # last (the memo in _mask reads atoms, prog, classes from the end)
        p.classes, p.cls_s = _ptr(cls), _I4(*strides0(cls))
        p.cls_n = _n(cls)

    def _mods(self, call, cdt, grad_mods, nqb_bwd):
        p = self.p
        self.t5 = []  # (op index, bucket per distance, table) of ops whose table gradient is computed
        if call.score_mod is None:
            return
        ops = call.lowered_mods() or ()
        p.n_mods = len(ops)
        p.dmin, p.ndist = -(call.Nq - 1), call.Nq + call.Nk - 1
        for n, op in enumerate(ops):
            m = p.mods[n]
            if op.kind == "softcap":
                m.kind, m.cap = C_MOD_SOFTCAP, float(op.cap)
                continue
            tab = dist_table(call, op, cdt)
            self.keep.append(tab)
            m.kind, m.dist = C_MOD_DIST, _ptr(tab)
            m.dist_n = _n(tab)
            if grad_mods and op.kind == "t5" and op.table.requires_grad:
                buf = torch.empty((call.B, call.Hq, nqb_bwd, p.ndist), dtype=cdt)
                self.keep.append(buf)
                m.grad, m.dgrad, m.dgrad_n = 1, _ptr(buf), _n(buf)
                self.t5.append((n, op, buf))


def _run(fn, p: _Params):
    with _LOCK:
        rc = fn(ctypes.byref(p))
        detail = _lib.sa_last_error().decode(errors="replace") if rc in (-5, -2) else ""  # thread-local: read here
    if rc == -5:
        raise ValueError(f"native kernel refused the call: {detail}")
    if rc == -2:  # the C side released what it took; its text names the size (and SELFATTN_NATIVE_ARENA_MAX if set)
        raise MemoryError(f"native kernel: {detail}")
    if rc != 0:
        why = {-2: "out of memory", -3: f"SELFATTN_NATIVE_ISA asks for an instruction set this CPU lacks",
               -4: "ABI mismatch"}.get(rc, f"error {rc}")
        raise RuntimeError(f"native kernel failed: {why}")


# ---------------------------------------------------------------------------------------------------------------
# the kernel contract

def _data_reason(call) -> Optional[str]:
    """Two rare inputs the C side does not reproduce exactly; the torch-op kernels serve them, so every kernel gives
    the same answer (tests/test_hardening_kernels.py). One reduction each, once per call (memoized on the call):
    a finite bias beyond ±max/4 (the kernel's log2-unit scores would overflow where the reference's do not), and
    NaN/Inf values under a mask (a partially visible tile's 0 · NaN)."""
    memo = call._memo
    if call.shape_only:
        return None
    if "native_data" not in memo:
        reason = None
        if call.bias is not None and call.bias.numel():
            b = call.bias.detach()
            big = torch.finfo(compute_dtype(call.dtype)).max / 4
            lo, hi = float(b.amin()), float(b.amax())  # reductions: no copy of the bias
            if (math.isfinite(lo) and lo < -big) or (math.isfinite(hi) and hi > big) or \
                    not (math.isfinite(lo) and math.isfinite(hi)):
                finite = b.masked_fill(~torch.isfinite(b), 0)  # the rare case: look closer
                if float(finite.abs().amax()) > big:
                    reason = "a bias with finite entries beyond ±max/4 of its dtype (log2-unit overflow)"
        if reason is None and call.mask is not None and call.v.numel():
            v = call.v.detach()
            # one reduction per call: a sum is finite unless some value is NaN/Inf or the sum overflows (fp16);
            # only then the two exact ones
            if not math.isfinite(float(v.sum())) and \
                    not (math.isfinite(float(v.amax())) and math.isfinite(float(v.amin()))):
                reason = _visible_nonfinite_values(call)
        memo["native_data"] = reason
    return memo["native_data"]


def _visible_nonfinite_values(call) -> Optional[str]:
    """NaN/Inf values in keys that some query may see (values no query sees are zeroed by the C side)."""
    bad = (~torch.isfinite(call.v.detach())).any(-1).any(1).any(0).nonzero()[:, 0]  # (nb,) key indices
    if bad.numel() > 64:
        return "NaN/Inf in the values of more than 64 keys under a mask"
    for j in bad.tolist():
        if bool(call.mask_tile(0, call.Nq, j, j + 1).any()):
            return ("NaN/Inf in V at a key some queries may see under a mask (a zero weight would multiply it in "
                    "a partially visible tile)")
    return None


def automatic(call) -> Tuple[bool, str]:
    """The automatic rule takes it whenever it can serve (first on CPU); what plan() then says."""
    bq, bk = _blocks(call)
    # the reason is plan()'s; torch.compile cannot trace the thread count (a non-tensor torch call)
    threads = "?" if torch.compiler.is_compiling() else torch.get_num_threads()
    return True, f"the fused native CPU kernel ({isa()}, {bq}x{bk} tiles, {threads} threads) serves this call"


def why_not(call) -> Optional[str]:
    r = _disabled()
    if r is not None:
        return r
    if _load() is None:
        return _load_error
    try:
        _isa_request()
    except ValueError as e:
        return str(e)
    bq, bk = _blocks(call)
    if bq > _MAX_TILE or bk > _MAX_TILE or call.G * bq * bk > _MAX_TILE_SCORES:
        return (f"tiles of {bq}x{bk} (block_q x block_k) for {call.G} query heads per KV head: the native kernel "
                f"takes at most {_MAX_TILE} per side and {_MAX_TILE_SCORES} scores per tile")
    if call.mask is not None:
        try:
            lw = call.lowered_mask()
        except NotImplementedError as e:
            return f"mask has no lowering: {e}"
        bad = [a.kind for a in lw.atoms if a.kind not in ATOM_CODES]
        if bad:
            return f"mask atoms {bad} have no native evaluation"
    r = _mods_reason(call)
    if r is not None:
        return r
    if call.bias is not None and call.bias.requires_grad:
        b4 = as_4d(call.bias)
        bq, _ = _blocks(call)
        rows = call.Nq if b4.shape[2] != 1 else -(-call.Nq // bq)
        heads = call.Hq if b4.shape[1] != 1 else call.Hkv
        n = call.B * heads * rows * (call.Nk if b4.shape[3] != 1 else 1)
        if n > MAX_DBIAS_BUFFER:
            return (f"the gradient of a bias of shape {tuple(b4.shape)} needs {n} partial sums "
                    f"(> {MAX_DBIAS_BUFFER}); pass a full-shape bias or use kernel='tiled'")
    return None


def _handover(call):
    """The tiled kernel when the call's data is one of the rare inputs the C side does not reproduce
    (``_data_reason``: read here, inside the kernel's run, never by ``why_not``), else None."""
    if _data_reason(call) is None:
        return None
    from . import tiled
    return tiled


def forward(call) -> Tuple[Tensor, Tensor]:
    """out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) natural log, float32 (float64 for float64)."""
    other = _handover(call)
    if other is not None:
        return other.forward(call)
    B, Hq, Nq, Dv = call.B, call.Hq, call.Nq, call.Dv
    cdt = compute_dtype(call.dtype)
    out = torch.empty((B, Hq, Nq, Dv), dtype=call.dtype)
    lse = torch.empty((B, Hq, Nq), dtype=cdt)
    if B * Hq * Nq == 0:
        return out, lse
    bq, bk = _blocks(call)
    L = _Lowered(call, bq, bk)
    (L.p.out, L.p.out_n), L.p.so, (L.p.lse, L.p.lse_n) = _pn(out), _s4(out), _pn(lse)
    if Dv == 0:
        L.p.out = None
    _run(_load().sa_forward, L.p)
    return out, lse


def _ordered_sum(t: Tensor, dim: int) -> Tensor:
    """Sum over one dim by sequential adds: the same bits whatever torch's thread count (its reductions split
    work by threads)."""
    acc = t.select(dim, 0).clone()
    for n in range(1, t.shape[dim]):
        acc += t.select(dim, n)
    return acc.unsqueeze(dim)


def backward(call, grad_out: Tensor, out: Tensor, lse: Tensor, needs):
    """needs: (q, k, v, bias, params) -> (dq, dk, dv, dbias, dparams), each None where not needed."""
    other = _handover(call)
    if other is not None:
        return other.backward(call, grad_out, out, lse, needs)
    nq, nk, nv, nb, npar = needs
    q, k, v = call.q, call.k, call.v
    B, Hq, Hkv, Nq, Nk = call.B, call.Hq, call.Hkv, call.Nq, call.Nk
    empty = B * Hq * Nq == 0 or Nk == 0
    alloc = torch.zeros if empty else torch.empty  # the C side writes every element
    dq = alloc(q.shape, dtype=q.dtype) if nq else None
    dk = alloc(k.shape, dtype=k.dtype) if nk else None
    dv = alloc(v.shape, dtype=v.dtype) if nv else None
    params = call.mod_params
    dparams = tuple(torch.zeros_like(t) if npar else None for t in params)
    bias4 = as_4d(call.bias) if call.bias is not None else None
    dbias = torch.zeros(bias4.shape, dtype=call.bias.dtype) if nb and bias4 is not None else None
    if empty:
        return dq, dk, dv, dbias, dparams
    bq, bk = _blocks(call)
    nqb = -(-Nq // bq)
    L = _Lowered(call, bq, bk, grad_mods=bool(npar), nqb_bwd=nqb)
    p = L.p
    cdt = L.cdt
    grad_out = grad_out.to(q.dtype)
    p.dout, p.sdo = _ptr(grad_out), _I4(*strides0(grad_out))
    p.o, p.sout = _ptr(out), _I4(*strides0(out))
    p.dout_n, p.o_n = _n(grad_out), _n(out)
    lse = lse.to(cdt).contiguous()
    p.lse = _ptr(lse)
    p.dq, p.dk, p.dv = _ptr(dq), _ptr(dk), _ptr(dv)
    p.lse_n, p.dq_n, p.dk_n, p.dv_n = _n(lse), _n(dq), _n(dk), _n(dv)
    if dbias is not None:
        Bb, Hb, Rb, Cb = bias4.shape
        heads = Hq if Hb != 1 else Hkv
        rows = Nq if Rb != 1 else nqb
        cols = Nk if Cb != 1 else 1
        buf = torch.empty((B, heads, rows, cols), dtype=cdt)  # per work item partial sums of dS
        p.dbias_buf, p.dbias_rows, p.dbias_cols, p.dbias_heads = _ptr(buf), (Nq if Rb != 1 else 1), \
            (Nk if Cb != 1 else 1), (Hq if Hb != 1 else 1)
        p.dbias_n = _n(buf)
    _run(_load().sa_backward, p)
    if dbias is not None:
        if Bb == 1 and B > 1:
            buf = _ordered_sum(buf, 0)
        if Hb == 1 and buf.shape[1] > 1:
            buf = _ordered_sum(buf, 1)
        if Rb == 1 and buf.shape[2] > 1:
            buf = _ordered_sum(buf, 2)
        dbias = buf.reshape(bias4.shape).to(call.bias.dtype)
    if npar and L.t5:
        grads = list(dparams)
        for n, op, gbuf in L.t5:
            g = _ordered_sum(_ordered_sum(gbuf, 0), 2)[0, :, 0]  # (Hq, nd)
            bucket = t5_buckets(call, op)
            # float64 sums into the table, then one rounding: index_add's order cannot show in the result
            tg = torch.zeros(op.table.shape, dtype=torch.float64).index_add_(0, bucket, g.t().to(torch.float64))
            for i, t in enumerate(params):
                if t is op.table:
                    grads[i] = (grads[i].to(torch.float64) + tg).to(t.dtype)
        dparams = tuple(grads)
    return dq, dk, dv, dbias, dparams


_load()  # at import, not on a traced path: torch.compile cannot trace the file check (a missing library is a reason)
if _lib is not None:
    _ISA_NAMES.update({n: _lib.sa_isa_name(n).decode() for n in _ISAS.values()})
    _ISA_NAMES[-1] = _ISA_NAMES[_lib.sa_best_isa()]
