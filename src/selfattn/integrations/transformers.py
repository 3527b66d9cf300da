"""selfattn as a transformers attention backend: ``attn_implementation="selfattn"`` (transformers 5.x).

    from selfattn.integrations.transformers import register
    register()                                   # idempotent; imports transformers here and nowhere else
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="selfattn")
    model.set_attn_implementation("selfattn")    # or switch a model already loaded

Two functions are registered under one name, and they need each other:

* ``mask_interface`` (``AttentionMaskInterface``): transformers calls it once per forward and layer type with the
  batch size, q/kv lengths and offsets, the 2-D padding mask and its composed ``mask_function``. It returns a
  ``BackendMask``: the pattern as selfattn's own masks (causal, sliding window, key padding, packed documents,
  chunks), so the tiled kernel skips every tile they rule out instead of reading a dense (B, 1, N, N) tensor.
  A part it does not recognize is evaluated densely by transformers' own ``sdpa_mask`` and enters as
  ``from_tensor``: slower, never dropped. (Without a mask function transformers hands layers ``None``.)
* ``attention_forward`` (``AttentionInterface``): every attention layer calls it with q (B, Hq, Nq, D) and k/v
  (B, Hkv, Nk, D) after the cache update; it runs ``selfattn.attention`` (GQA not repeated) and returns
  ((B, Nq, Hq, Dv) contiguous, weights or None). Weights, when asked for, are exact: recomputed from the LSE.

Static caches: transformers sizes keys to the whole buffer (Nk = max_cache_len) while a query at position p sees
keys ≤ p. The mask keeps only the K = p − kv_offset + 1 keys any query may see and the layer's k/v are sliced to
them (a view), so bottom-right alignment holds exactly and the empty tail costs nothing.

torch.compile(fullgraph=True): nothing here reads tensor data on the host while dynamo traces. Checks that only
save work (a padding mask that keeps every key, packed positions that run consecutively) are skipped, with the
same results; a factory's closure that dynamo cannot read (one made inside the compiled region: sliding windows,
and_masks) is evaluated densely by transformers' sdpa_mask; a static cache's offsets, tensors, are never read: a
compiled layer takes the pattern over all cache keys, evaluated on the device (``BackendMask.all_keys``), so the
decode step compiles once rather than at every token.

Shape legend: B batch, Hq/Hkv query/key-value heads, Nq queries, Nk keys as the layer passes them, K keys kept,
P phantom keys in front (1 for an attention sink under autograd, else 0), D/Dv head dims.
"""
from __future__ import annotations

import contextlib
import logging
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import masks as _masks
from .. import recording
from ..functional import attention
from ..inspect.weights import attention_weights
from ..scores import softcap as _softcap

__all__ = ["register", "load_pretrained", "attention_forward", "mask_interface", "BackendMask", "NAME",
           "SUPPORTED_TRANSFORMERS"]

NAME = "selfattn"
SUPPORTED_TRANSFORMERS = "transformers>=5.0,<6"
_log = logging.getLogger(__name__)
# register(check_masks=True) compares every mask built against transformers' own dense evaluation (O(B·Nq·Nk)
# per forward and layer type): a debugging switch, off by default.
_CHECK_MASKS = False


def _transformers_version() -> Tuple[int, int]:
    import transformers
    m = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def register(name: str = NAME, *, check_masks: bool = False) -> str:
    """Register selfattn with transformers under ``name``: the attention function and the mask function. Calling
    it again is harmless (the same two functions are registered again). ``check_masks=True`` makes every mask
    built be checked against transformers' dense evaluation (raises on any difference; slow, for debugging).
    Returns the name to pass as ``attn_implementation``."""
    global _CHECK_MASKS
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str, got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(f"selfattn.integrations.transformers needs {SUPPORTED_TRANSFORMERS} "
                          f"(AttentionInterface and AttentionMaskInterface): {e}") from None
    major, _ = _transformers_version()
    if major != 5:
        _log.warning("selfattn: transformers %s is outside the tested %s; masks it composes will be evaluated "
                     "densely (correct, slower)", _transformers_version(), SUPPORTED_TRANSFORMERS)
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_interface)
    _CHECK_MASKS = bool(check_masks)
    return name


# ---------------------------------------------------------------------------------------------------------------
# The one place that reads transformers internals: which factory in masking_utils built a mask_function, and the
# values its closure captured. Public API gives only the opaque callable. Every factory is identified by the
# identity of its inner code object and its closure's variable names; anything else (another version's layout,
# a model's or user's own function) reads as "unknown" and is evaluated densely, so drift costs speed, never
# correctness. Tested with transformers 5.24; test_integration_transformers.py checks each pattern.
# ---------------------------------------------------------------------------------------------------------------
_FACTORIES = (  # (masking_utils attribute, kind, closure variables it must capture)
    ("and_masks", "and", ("mask_functions",)),
    ("or_masks", "or", ("mask_functions",)),
    ("sliding_window_overlay", "sliding_overlay", ("sliding_window",)),
    ("sliding_window_bidirectional_overlay", "sliding_bidirectional", ("sliding_window",)),
    ("chunked_overlay", "chunked", ("chunk_size", "left_padding")),
    ("blockwise_overlay", "blockwise", ("block_sequence_ids",)),
    ("padding_mask_function", "padding", ("padding_mask",)),
    ("packed_sequence_mask_function", "packed", ("packed_sequence_mask",)),
    ("remap_positions_for_packed_sequence", "remap", ("mask_function", "position_ids")),
)
_PLAIN = (("causal_mask_function", "causal"), ("bidirectional_mask_function", "bidirectional"))
_table_cache: Dict[str, Dict] = {}


def _code_key(code) -> Tuple[str, int, str]:
    # a code object by where it is defined: torch.compile guards on a dict lookup by its key, and it can write a
    # guard for a tuple of str/int but not for a code object (keyed by the code object itself, compiling any
    # caller failed with "InternalTorchDynamoError: SyntaxError")
    return (code.co_filename, code.co_firstlineno, code.co_name)


def _internal_table() -> Dict:
    """{code key: (kind, closure names)} for transformers' mask factories; {} outside transformers 5.x."""
    if "t" not in _table_cache:
        table = {}
        if _transformers_version()[0] == 5:
            from transformers import masking_utils as mu
            for attr, kind in _PLAIN:
                fn = getattr(mu, attr, None)
                if isinstance(fn, types.FunctionType):
                    table[_code_key(fn.__code__)] = (kind, ())
            for attr, kind, names in _FACTORIES:
                factory = getattr(mu, attr, None)
                inner = [c for c in getattr(getattr(factory, "__code__", None), "co_consts", ())
                         if isinstance(c, types.CodeType) and not c.co_name.startswith("<")]  # not a genexpr
                if len(inner) == 1 and set(names) <= set(inner[0].co_freevars):
                    table[_code_key(inner[0])] = (kind, names)
        _table_cache["t"] = table
    return _table_cache["t"]


def _read_mask_function(fn) -> Tuple[str, Dict]:
    """(kind, captured values) of a transformers mask_function; ("unknown", {}) when it is not one we know."""
    code = getattr(fn, "__code__", None)
    entry = _internal_table().get(_code_key(code)) if isinstance(code, types.CodeType) else None
    if entry is None:
        return "unknown", {}
    kind, names = entry
    try:
        cells = dict(zip(code.co_freevars, fn.__closure__ or ()))
        return kind, {n: cells[n].cell_contents for n in names}
    except (KeyError, ValueError):  # a name missing or an empty cell: not the layout we know
        return "unknown", {}
    except AttributeError:
        # torch.compile cannot read the closure of a function made inside the compiled region (dynamo raises
        # AttributeError for __closure__ / cell_contents): such a part is evaluated densely, exact and traceable
        return "unknown", {}


# ---------------------------------------------------------------------------------------------------------------
# Lowering a mask_function to selfattn masks
# ---------------------------------------------------------------------------------------------------------------
class _All:
    """Every entry allowed (transformers' bidirectional_mask_function): no mask at all."""

    def __repr__(self):
        return "all"


_ALL = _All()
_TRANSLATION_INVARIANT = ("causal", "bidirectional", "sliding_overlay", "sliding_bidirectional", "and", "or")


@dataclass
class _Ctx:
    """One mask call: query i sits at q_offset + i, key j at kv_offset + j (j < K); P phantom keys in front."""
    B: int
    Nq: int
    Nk: int
    q_offset: int
    kv_offset: int
    K: int
    P: int
    device: torch.device
    use_vmap: bool
    dense_parts: List[str] = field(default_factory=list)

    @property
    def aligned(self) -> bool:
        # selfattn's bottom-right alignment puts query i at key index K − Nq + i: right when the offsets agree
        return self.q_offset - self.kv_offset == self.K - self.Nq


def _dense(fn, ctx: _Ctx, why: str):
    """Last resort: transformers evaluates ``fn`` itself (its public sdpa_mask), (B, 1, Nq, Nk) bool."""
    from transformers.masking_utils import sdpa_mask
    ctx.dense_parts.append(f"{getattr(fn, '__qualname__', type(fn).__name__)} ({why})")
    t = sdpa_mask(batch_size=ctx.B, q_length=ctx.Nq, kv_length=ctx.Nk, q_offset=ctx.q_offset,
                  kv_offset=ctx.kv_offset, mask_function=fn, attention_mask=None, allow_is_causal_skip=False,
                  allow_is_bidirectional_skip=False, use_vmap=ctx.use_vmap, device=ctx.device)
    t = t[..., :ctx.K]  # (B, 1, Nq, K)
    if ctx.P:
        t = torch.nn.functional.pad(t, (ctx.P, 0), value=False)  # (B, 1, Nq, P + K)
    return _masks.from_tensor(t)


def _pad_keys(ids: Tensor, ctx: _Ctx, value) -> Tensor:
    """Prepend P phantom-key columns filled with ``value`` (a scalar, a 0-d tensor, or a function giving one,
    called only when P > 0) to a (B, K) tensor."""
    if not ctx.P:
        return ids
    value = value() if callable(value) else value
    if isinstance(value, Tensor):  # stays on the device: a host read would break torch.compile's graph
        fill = value.to(ids.dtype).reshape(1, 1).expand(ids.shape[0], ctx.P)  # (B, P)
    else:
        fill = ids.new_full((ids.shape[0], ctx.P), value)  # (B, P)
    return torch.cat([fill, ids], dim=1)


def _all_kept(keep: Tensor) -> bool:
    """Whether a (B, K) keep-mask keeps every key, so the key-padding mask can be left out (tiles skip nothing
    either way). Under torch.compile it reads False without looking (the mask stays, results are the same):
    reading the answer on the host would end the graph."""
    return not torch.compiler.is_compiling() and bool(keep.all())


def _packed_ok(remap: Dict, packed: Dict, ctx: _Ctx) -> bool:
    """remap(f, position_ids) & packed(ids) equals f on raw indices & document(ids) when f depends only on q − kv
    and positions run consecutively inside each document (how transformers derives ids from position_ids)."""
    pos, ids = remap["position_ids"], packed["packed_sequence_mask"]
    if not (isinstance(pos, Tensor) and isinstance(ids, Tensor)) or ids.dim() != 2:
        return False
    if ctx.q_offset or ctx.kv_offset or not (ctx.Nq == ctx.Nk == ctx.K == ids.shape[1]):
        return False
    pos = pos.expand(ids.shape[0], -1) if pos.shape[0] != ids.shape[0] else pos
    if pos.shape != ids.shape or not _translation_invariant(remap["mask_function"]):
        return False
    if torch.compiler.is_compiling():
        # the check reads positions on the host; compiled, the pair is evaluated densely instead (exact, slower)
        return False
    same_doc = ids[:, 1:] == ids[:, :-1]  # (B, N-1)
    return bool(((pos[:, 1:] - pos[:, :-1]) == 1)[same_doc].all())


def _translation_invariant(fn) -> bool:
    kind, f = _read_mask_function(fn)
    if kind not in _TRANSLATION_INVARIANT:
        return False
    return all(_translation_invariant(g) for g in f.get("mask_functions", ()))


def _lower(fn, ctx: _Ctx):
    """A transformers mask_function -> a selfattn Mask over P + K keys, or _ALL."""
    kind, f = _read_mask_function(fn)
    if kind == "bidirectional":
        return _ALL
    if kind == "causal":
        return _masks.causal() if ctx.aligned else _dense(fn, ctx, "offsets not bottom-right")
    if kind in ("sliding_overlay", "sliding_bidirectional"):
        w = f["sliding_window"]
        if not ctx.aligned or isinstance(w, bool) or not isinstance(w, int) or w < 1:
            return _dense(fn, ctx, "offsets not bottom-right or window not a positive int")
        if kind == "sliding_bidirectional":  # |q − kv| ≤ w
            return _masks.sliding_window(w, w)
        # kv > q − w alone leaves the right side open: a right reach past every key
        return _masks.sliding_window(w - 1, ctx.P + ctx.K + ctx.Nq)
    if kind == "padding":
        pm = f["padding_mask"]
        keep = _padding_keep(pm, ctx)
        if keep is None:
            return _dense(fn, ctx, "padding mask shorter than the keys")
        return _ALL if _all_kept(keep) else _masks.key_padding(_pad_keys(keep, ctx, False))
    if kind == "packed":
        ids = f["packed_sequence_mask"]
        if ctx.q_offset or ctx.kv_offset or not (ctx.Nq == ctx.Nk == ctx.K == ids.shape[-1]):
            return _dense(fn, ctx, "packed ids with offsets")
        ids = ids.to(torch.int64)
        # phantom keys take an id below every real one: they match no query
        return _masks.document(ids, _pad_keys(ids, ctx, lambda: ids.min() - 1 if ids.numel() else -1))
    if kind == "chunked":
        C, lp = f["chunk_size"], f["left_padding"]
        if isinstance(C, bool) or not isinstance(C, int) or C < 1 or not isinstance(lp, Tensor):
            return _dense(fn, ctx, "chunk size not a positive int")
        lp = lp.to(device=ctx.device, dtype=torch.int64).reshape(-1, 1).expand(ctx.B, 1)  # (B, 1)
        qpos = torch.arange(ctx.Nq, device=ctx.device) + ctx.q_offset  # (Nq,)
        kpos = torch.arange(ctx.K, device=ctx.device) + ctx.kv_offset  # (K,)
        ids_q = torch.div(qpos[None] - lp, C, rounding_mode="floor")  # (B, Nq) chunk of each query
        ids_k = torch.div(kpos[None] - lp, C, rounding_mode="floor")  # (B, K)
        def lo():  # below every chunk id (a 0-d tensor: no host read)
            return torch.minimum(ids_q.min(), ids_k.min()) - 1 if ids_q.numel() and ids_k.numel() else -1
        return _masks.document(ids_q, _pad_keys(ids_k, ctx, lo))
    if kind == "blockwise":
        g = f["block_sequence_ids"]
        if not isinstance(g, Tensor) or g.dim() != 2 or g.shape[1] < max(ctx.q_offset + ctx.Nq,
                                                                           ctx.kv_offset + ctx.K):
            return _dense(fn, ctx, "block ids shorter than the positions")
        g = g.to(device=ctx.device, dtype=torch.int64).expand(ctx.B, -1)
        gq = g[:, ctx.q_offset:ctx.q_offset + ctx.Nq]  # (B, Nq)
        gk = g[:, ctx.kv_offset:ctx.kv_offset + ctx.K]  # (B, K)
        # a group id −1 matches nothing: −1 for queries, −2 for keys, −3 for phantom keys
        ids_q = torch.where(gq >= 0, gq, torch.full_like(gq, -1))
        ids_k = torch.where(gk >= 0, gk, torch.full_like(gk, -2))
        return _masks.document(ids_q, _pad_keys(ids_k, ctx, -3))
    if kind == "remap":
        return _dense(fn, ctx, "position remap without its packed-sequence mask")
    if kind in ("and", "or"):
        return _lower_combination(kind, list(f["mask_functions"]), ctx)
    return _dense(fn, ctx, "unrecognized")


def _padding_keep(pm, ctx: _Ctx) -> Optional[Tensor]:
    """(B, K) bool keep-mask of the kept keys from transformers' 2-D padding mask indexed by global key position."""
    if not isinstance(pm, Tensor) or pm.dim() != 2:
        return None
    pm = pm.to(device=ctx.device, dtype=torch.bool)
    if pm.shape[1] < ctx.kv_offset + ctx.K:  # transformers pads it the same way (prepare_padding_mask)
        pm = torch.nn.functional.pad(pm, (0, ctx.kv_offset + ctx.K - pm.shape[1]), value=False)
    return pm[:, ctx.kv_offset:ctx.kv_offset + ctx.K].expand(ctx.B, ctx.K)


def _lower_combination(kind: str, fns: List, ctx: _Ctx):
    reads = [_read_mask_function(g) for g in fns]
    kinds = [r[0] for r in reads]
    parts = []
    used = set()
    if kind == "and":
        # a causal window is one mask (one compare fewer per partial tile than window & causal)
        if "causal" in kinds and "sliding_overlay" in kinds and ctx.aligned:
            w = reads[kinds.index("sliding_overlay")][1]["sliding_window"]
            if isinstance(w, int) and not isinstance(w, bool) and w >= 1:
                parts.append(_masks.sliding_window(w - 1))
                used |= {kinds.index("causal"), kinds.index("sliding_overlay")}
        # packed sequences: transformers remaps positions per document, then keeps documents apart
        if "remap" in kinds and "packed" in kinds:
            ir, ip = kinds.index("remap"), kinds.index("packed")
            if _packed_ok(reads[ir][1], reads[ip][1], ctx):
                parts.append(_lower(reads[ir][1]["mask_function"], ctx))
                used.add(ir)
    parts += [_lower(g, ctx) for i, g in enumerate(fns) if i not in used]
    if kind == "and":
        parts = [p for p in parts if p is not _ALL]
        if not parts:
            return _ALL
    elif any(p is _ALL for p in parts):
        return _ALL
    out = parts[0]
    for p in parts[1:]:
        out = (out & p) if kind == "and" else (out | p)
    return out


def _implies_causal(fn) -> bool:
    """True when fn allows no key after the query's position (causal, possibly and-ed with more)."""
    kind, f = _read_mask_function(fn)
    if kind == "causal":
        return True
    if kind == "and":
        return any(_implies_causal(g) for g in f["mask_functions"])
    return False


@dataclass(eq=False)
class BackendMask:
    """What ``mask_interface`` hands every layer: the pattern as a selfattn mask over the first ``keys`` keys.

    mask: a ``selfattn.masks`` object over ``keys`` keys, or None when every entry is allowed.
    kv_length: the key count transformers' layers will pass (checked); keys: how many of them any query may see
        (fewer for a static cache's unwritten tail), the layer's k/v are sliced to them.
    dense_parts: the parts evaluated densely because they were not recognized (empty for known patterns).

    A static cache passes its length as a tensor offset; the mask then also keeps those offsets (``_static``). A
    compiled forward reads only what is the same at every decoding step (sizes, the offset tensors, the padding
    mask padded to the cache): the pattern over all kv_length keys, evaluated on the device by transformers'
    sdpa_mask (``all_keys``). Reading ``keys`` or ``mask``, which change every step, would make dynamo guard on
    them and compile the forward again at each step.
    """
    mask: Optional[_masks.Mask]
    batch_size: int
    q_length: int
    kv_length: int
    keys: int
    q_offset: int
    kv_offset: int
    dense_parts: Tuple[str, ...]
    device: torch.device = field(repr=False, default=torch.device("cpu"))
    _fn: Callable = field(repr=False, default=None)
    _padding: Optional[Tensor] = field(repr=False, default=None)
    _use_vmap: bool = field(repr=False, default=False)
    _with_phantom: Optional[_masks.Mask] = field(repr=False, default=None)
    _static: Optional[Tuple] = field(repr=False, default=None)  # (q_offset, kv_offset, padding over the cache)
    _all_keys_t: Optional[Tensor] = field(repr=False, default=None)  # (B|1, 1, Nq, kv_length) bool

    # transformers treats a mask with 4 dims as prepared: generate() with a static cache builds it ahead of the
    # forward (create_masks_for_generate) and the model's create_*_mask hands it back to mask_interface, which
    # returns it as it is
    ndim = 4

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.batch_size, 1, self.q_length, self.kv_length)

    def dim(self) -> int:
        return 4

    def compiled_view(self) -> bool:
        """Whether a layer reads this mask through ``all_keys`` (under torch.compile, static-cache offsets)."""
        return self._static is not None and torch.compiler.is_compiling()

    def all_keys(self, phantom: bool = False) -> _masks.Mask:
        """The pattern over all kv_length keys (1 + kv_length with ``phantom``: key 0 an attention sink seen by
        every query), from the offset tensors, with no host read: what a compiled forward uses."""
        if self._all_keys_t is None:
            q_offset, kv_offset, padding = self._static
            self._all_keys_t = _dense_all_keys(self.batch_size, self.q_length, self.kv_length, q_offset, kv_offset,
                                               self._fn, padding, self._use_vmap, self.device)
        t = self._all_keys_t
        if phantom:
            t = torch.nn.functional.pad(t, (1, 0), value=True)  # (B|1, 1, Nq, 1 + kv_length)
        return _masks.from_tensor(t)

    def with_phantom_key(self) -> _masks.Mask:
        """The same pattern over 1 + keys keys, key 0 (an attention sink) visible to every query."""
        if self.compiled_view():
            return self.all_keys(phantom=True)
        if self._with_phantom is None:
            ctx = _Ctx(self.batch_size, self.q_length, self.kv_length, self.q_offset, self.kv_offset, self.keys,
                       1, self.device, self._use_vmap)
            m = _build(self._fn, self._padding, ctx)
            sink = _masks.key_padding(torch.ones(self.batch_size, dtype=torch.int64, device=self.device))  # j < 1
            self._with_phantom = sink if m is _ALL else (m | sink)
        return self._with_phantom

    def to_string(self, block_q: int = 128, block_k: int = 128) -> str:
        """The tile pattern the kernel walks (see ``selfattn.masks.Mask.to_string``)."""
        if self.mask is None:
            return f"all {self.q_length}x{self.keys} entries allowed"
        return self.mask.to_string(self.q_length, self.keys, block_q, block_k)


def _build(fn, padding: Optional[Tensor], ctx: _Ctx):
    m = _lower(fn, ctx) if fn is not None else _ALL
    if padding is not None:
        keep = _padding_keep(padding, ctx)
        if not _all_kept(keep):
            kp = _masks.key_padding(_pad_keys(keep, ctx, False))
            m = kp if m is _ALL else (m & kp)
    return m


def _as_int(x, name: str) -> int:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name}: expected a scalar, got a tensor of shape {tuple(x.shape)}")
        return int(x.item())
    if x is None:
        return 0
    return int(x)


def mask_interface(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                   mask_function: Optional[Callable] = None, attention_mask: Optional[Tensor] = None,
                   use_vmap: bool = False, device="cpu", **transformers_kwargs) -> BackendMask:
    """transformers' mask hook (AttentionMaskInterface). ``attention_mask`` is the 2-D (B, L) padding mask
    (True/1 = real token) indexed by global key position; ``mask_function(b, h, q_idx, kv_idx)`` the composed
    pattern. The remaining keywords (dtype, config, allow_is_causal_skip, local_size, ...) only serve other
    backends' shortcuts: this one always returns the full pattern."""
    if isinstance(attention_mask, BackendMask):  # built ahead by generate() for this very step
        if (attention_mask.batch_size, attention_mask.q_length, attention_mask.kv_length) != (
                batch_size, q_length, kv_length):
            raise ValueError(f"attention_mask: a selfattn mask built for (B, Nq, Nk) = "
                             f"{attention_mask.shape[0], attention_mask.q_length, attention_mask.kv_length}, "
                             f"reused for {(batch_size, q_length, kv_length)}")
        return attention_mask
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if mask_function is None:
        from transformers.masking_utils import causal_mask_function as mask_function  # sdpa_mask's default
    if isinstance(attention_mask, Tensor) and attention_mask.dim() != 2:
        raise ValueError(f"attention_mask: the mask function expects transformers' 2-D (B, L) padding mask, got "
                         f"shape {tuple(attention_mask.shape)}")
    padding = attention_mask.to(device=device, dtype=torch.bool) if isinstance(attention_mask, Tensor) else None
    static = None
    if any(isinstance(x, Tensor) for x in (q_offset, kv_offset)):  # a static cache (transformers' compilable one)
        static = (q_offset, kv_offset, _padding_over(padding, kv_length, kv_offset))
        if torch.compiler.is_compiling():  # the offsets cannot be read: only the all-keys view exists
            bm = BackendMask(None, batch_size, q_length, kv_length, kv_length, q_offset, kv_offset,
                             ("tensor offsets under torch.compile: evaluated densely",), device, mask_function,
                             padding, bool(use_vmap), _static=static)
            bm.mask = bm.all_keys()
            return bm
    q_offset, kv_offset = _as_int(q_offset, "q_offset"), _as_int(kv_offset, "kv_offset")
    K = kv_length
    d0 = q_offset - kv_offset
    # a static cache: keys past the last query's position are never visible, so keep only the first d0 + Nq
    if 0 <= d0 and d0 + q_length < kv_length and _implies_causal(mask_function):
        K = d0 + q_length
    ctx = _Ctx(batch_size, q_length, kv_length, q_offset, kv_offset, K, 0, device, bool(use_vmap))
    m = _build(mask_function, padding, ctx)
    bm = BackendMask(None if m is _ALL else m, batch_size, q_length, kv_length, K, q_offset, kv_offset,
                     tuple(ctx.dense_parts), device, mask_function, padding, bool(use_vmap), _static=static)
    if _CHECK_MASKS:
        _check_against_transformers(bm)
    return bm


def _padding_over(padding: Optional[Tensor], kv_length: int, kv_offset) -> Optional[Tensor]:
    """The 2-D padding mask padded with False to kv_offset + kv_length columns, as transformers'
    prepare_padding_mask does, so that a static cache's mask has the same shape at every decoding step (left as
    it is when kv_offset is a tensor: its value is not read)."""
    if padding is None or isinstance(kv_offset, Tensor):
        return padding
    if padding.shape[1] < kv_offset + kv_length:  # as transformers' prepare_padding_mask
        padding = torch.nn.functional.pad(padding, (0, kv_offset + kv_length - padding.shape[1]), value=False)
    return padding


def _dense_all_keys(B: int, Nq: int, Nk: int, q_offset, kv_offset, fn, padding: Optional[Tensor], use_vmap: bool,
                    device: torch.device) -> Tensor:
    """(B|1, 1, Nq, Nk) bool: the whole pattern with tensor offsets, evaluated by transformers' sdpa_mask on the
    device (as the sdpa backend does under compile): nothing read on the host, the same graph at every step."""
    from transformers.masking_utils import sdpa_mask
    return sdpa_mask(batch_size=B, q_length=Nq, kv_length=Nk, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=fn, attention_mask=padding, allow_is_causal_skip=False,
                     allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)


def _check_against_transformers(bm: BackendMask) -> None:
    """Raise when ``bm`` differs anywhere from transformers' own dense evaluation of the same mask."""
    from transformers.masking_utils import sdpa_mask
    ref = sdpa_mask(batch_size=bm.batch_size, q_length=bm.q_length, kv_length=bm.kv_length,
                    q_offset=bm.q_offset, kv_offset=bm.kv_offset, mask_function=bm._fn, attention_mask=bm._padding,
                    allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=bm._use_vmap,
                    device=bm.device)  # (B, 1, Nq, Nk)
    ref = ref.expand(bm.batch_size, 1, bm.q_length, bm.kv_length)
    if bm.mask is None:
        got = torch.ones(bm.batch_size, 1, bm.q_length, bm.keys, dtype=torch.bool, device=bm.device)
    else:
        got = bm.mask.dense(bm.batch_size, 1, bm.q_length, bm.keys, device=bm.device)
        got = got.expand(bm.batch_size, 1, bm.q_length, bm.keys)
    bad = int((got != ref[..., :bm.keys]).sum()) + int(ref[..., bm.keys:].sum())
    if bad:
        raise RuntimeError(f"selfattn mask check: {bad} entries differ from transformers' dense mask for {bm!r}")


# ---------------------------------------------------------------------------------------------------------------
# Loading an untrusted checkpoint: the config checked against the weights before anything is built
# ---------------------------------------------------------------------------------------------------------------
# config fields that count or size something: a positive int (bools are not counts), below selfattn's own bounds
_COUNTS = {"num_hidden_layers": "layers", "n_layer": "layers", "num_layers": "layers", "encoder_layers": "layers",
           "decoder_layers": "layers", "num_attention_heads": "heads", "num_key_value_heads": "heads",
           "n_head": "heads", "encoder_attention_heads": "heads", "decoder_attention_heads": "heads",
           "hidden_size": "width", "n_embd": "width", "d_model": "width", "intermediate_size": "width",
           "n_inner": "width", "head_dim": "width", "vocab_size": "vocab", "max_position_embeddings": "positions",
           "n_positions": "positions", "sliding_window": "positions"}
_POSITIVE_REALS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta")
_ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "partial_rotary_factor")
# a layer's index in a tensor name: layers.3. / h.3. / layer.3. / blocks.3. / block.3.
_INDEX_BUFFER = re.compile(r"(^|\.)(position_ids|token_type_ids)$")  # int buffers some checkpoints store
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def _config_problems(hf: Dict) -> List[str]:
    """What in config.json would crash or silently mislead transformers' model constructor: counts that are not
    positive ints within bounds, epsilons that are not positive numbers, a head size that does not divide or that
    rotary embeddings cannot halve, GQA groups that do not divide, layer_types of the wrong length or kind."""
    from ..models.loading import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH
    bound = {"layers": MAX_LAYERS, "heads": MAX_HEADS, "width": MAX_WIDTH, "vocab": MAX_VOCAB,
             "positions": MAX_POSITIONS}
    out = []
    for key, kind in _COUNTS.items():
        v = hf.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= bound[kind]:
            out.append(f"{key} must be an integer in 1..{bound[kind]}, got {v!r}")
    for key in _POSITIVE_REALS:
        v = hf.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            out.append(f"{key} must be a positive number, got {v!r}")
    if out:
        return out
    heads = hf.get("num_attention_heads", hf.get("n_head"))
    width = hf.get("hidden_size", hf.get("n_embd", hf.get("d_model")))
    head_dim = hf.get("head_dim")
    if head_dim is None and heads and width:
        if width % heads:
            out.append(f"hidden size {width} is not a multiple of num_attention_heads {heads} (and no head_dim)")
        head_dim = width // heads
    if head_dim and any(hf.get(k) is not None for k in _ROPE_KEYS) and head_dim % 2:
        out.append(f"head_dim {head_dim} is odd; rotary position embeddings rotate pairs of dimensions")
    kv = hf.get("num_key_value_heads")
    if heads and kv and heads % kv:
        out.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    lt = hf.get("layer_types")
    if lt is not None:
        try:
            from transformers.configuration_utils import ALLOWED_LAYER_TYPES as allowed
        except ImportError:
            allowed = None
        n = hf.get("num_hidden_layers")
        if not isinstance(lt, list) or not all(isinstance(t, str) for t in lt):
            out.append(f"layer_types must be a list of strings, got {_short(lt)}")
        elif isinstance(n, int) and len(lt) != n:
            out.append(f"layer_types has {len(lt)} entries for num_hidden_layers {n}")
        elif allowed is not None and any(t not in allowed for t in lt):
            out.append(f"layer_types holds {sorted(set(lt) - set(allowed))}, expected entries of {list(allowed)}")
    return out


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _layer_counts(names) -> Dict[str, int]:
    """{stack: 1 + its largest layer index} over the tensor names, a stack being the name up to the index
    ("layers", "encoder.layers", "transformer.h"): an encoder-decoder has two."""
    out: Dict[str, int] = {}
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m:
            stack = n[:m.start(1)].rstrip(".")
            out[stack] = max(out.get(stack, 0), int(m.group(1)) + 1)
    return out


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging and progress bars off (its load report, 'Loading weights' bars): a loader that checks
    first and raises one ValueError has nothing to add on stderr."""
    from transformers.utils import logging as tlog
    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def load_pretrained(path, name: str = NAME):
    """transformers' ``AutoModel`` for a model directory, on the selfattn backend, in eval mode — with selfattn's
    loader guarantees for an untrusted directory: config.json read with a size bound and checked (counts,
    epsilons, head sizes, layer_types); the weights' names, shapes and dtypes (from the safetensors headers, no
    values read) checked against the model that config builds (on the meta device, after the layer count has
    been checked against the file, so a config claiming 200000 layers builds nothing); float weights only (a
    bool/int/complex tensor would be silently cast); no tensor the model needs may be missing (it would be
    randomly initialized). Every problem is one ValueError naming the file and field; transformers prints
    nothing. No code from the checkpoint runs (trust_remote_code=False)."""
    import transformers

    from ..models import loading
    path = Path(path)
    hf = loading.read_config(path)
    what = f"config.json ({str(path / 'config.json')!r})"
    problems = _config_problems(hf)
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    shapes, dtypes = loading.tensor_specs(path)
    bad = loading.dtype_problems({n: d for n, d in dtypes.items() if not _INDEX_BUFFER.search(n)})
    if bad:
        raise ValueError(f"weights in {str(path)!r}: " + "; ".join(bad))
    register(name)
    with _quiet_transformers():
        try:
            cfg = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        except (ValueError, KeyError, TypeError, OSError, AttributeError) as e:
            raise ValueError(f"{what}: transformers cannot read it ({_first(e)})") from None
        n_cfg = getattr(cfg, "num_hidden_layers", None)
        stacks = _layer_counts(shapes)
        # more layers than any stack in the file would be built and randomly initialized; fewer would drop the
        # file's last layers without a word (transformers ignores tensors it has no place for)
        if isinstance(n_cfg, int) and stacks and n_cfg not in stacks.values():
            held = " / ".join(str(v) for v in sorted(set(stacks.values())))
            raise ValueError(f"{what}: {n_cfg} layers, but the weights hold {held}")
        try:
            with torch.device("meta"):
                skeleton = transformers.AutoModel.from_config(cfg, attn_implementation=name)
        except Exception as e:  # noqa: BLE001 - a constructor's arithmetic on a bad config fails any way it likes
            raise ValueError(f"{what}: transformers cannot build {cfg.model_type} from it "
                             f"({type(e).__name__}: {_first(e)})") from None
        problems = _weight_problems(skeleton, shapes)
        if problems:
            raise ValueError(f"weights in {str(path)!r} do not fit the config: " + "; ".join(problems))
        model, info = transformers.AutoModel.from_pretrained(str(path), config=cfg, attn_implementation=name,
                                                             trust_remote_code=False, output_loading_info=True)
    left = [f"{k}: {v}" for k, v in info.items() if v and k in ("missing_keys", "mismatched_keys")]
    if left:
        raise ValueError(f"weights in {str(path)!r} do not fit the config: " + "; ".join(left)[:400])
    return model.eval()


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:300]


def _weight_problems(skeleton: torch.nn.Module, shapes: Dict[str, Tuple[int, ...]]) -> List[str]:
    """The meta-built model's tensors against the file's: every one present (under the model's name or with the
    base-model prefix a task head's checkpoint adds), with the same shape."""
    prefix = getattr(skeleton, "base_model_prefix", "") or ""
    ignore = [re.compile(p) for p in (getattr(skeleton, "_keys_to_ignore_on_load_missing", None) or [])]
    state = skeleton.state_dict(keep_vars=True)
    present = set()  # tied tensors (one Parameter under several names): one stored name serves them all
    for n, t in state.items():
        if n in shapes or (prefix and f"{prefix}.{n}" in shapes):
            present.add(id(t))
    missing, mismatched = [], []
    for n, t in state.items():
        found = shapes.get(n, shapes.get(f"{prefix}.{n}") if prefix else None)
        if found is None:
            if id(t) not in present and not any(p.search(n) for p in ignore):
                missing.append(n)
        elif tuple(found) != tuple(t.shape):
            mismatched.append(f"{n} {tuple(found)} vs {tuple(t.shape)} from the config")
    def listing(title, items):
        return f"{title} ({len(items)}): {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
    return [listing(t, i) for t, i in (("missing tensors (they would be randomly initialized)", missing),
                                                  ("shape mismatches", mismatched)) if i]


# ---------------------------------------------------------------------------------------------------------------
# The attention function
# ---------------------------------------------------------------------------------------------------------------
def _collecting_weights() -> Optional[bool]:
    """Whether transformers' output capture (``capture_outputs``: forward hooks on the attention modules, turned on
    by ``output_attentions`` given to the model or set in its config) is collecting attention weights now; None
    where this transformers has no such collector. It is transformers' own record of what the caller asked for:
    models such as GPT-2 do not pass ``output_attentions`` down to their layers and Whisper's layers pass False,
    yet the hooks read the weights from the layer's output."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return None
    if torch.compiler.is_compiling() and not getattr(_active_collector, "compiling", False):
        # dynamo cannot trace ContextVar.get; transformers' wrapper, when compiled, sets the collector as a plain
        # global (and marks it "compiling"), which is readable. Without that the config flag decides.
        return None
    collected = _active_collector.get()
    return collected is not None and any("attentions" in k for k in collected)


def _weights_requested(module, kwargs) -> bool:
    """Whether this forward must return attention weights: transformers' output collector is gathering them
    (whatever the layer was passed), or the layer was asked directly (``output_attentions=True``, the keyword of
    models that pass it down). Without a collector (older transformers) the config flag decides, as its own
    decorator did."""
    if kwargs.get("output_attentions"):
        return True
    collecting = _collecting_weights()
    if collecting is not None:
        return collecting
    flag = kwargs.get("output_attentions")
    if flag is not None:
        return bool(flag)
    return bool(getattr(getattr(module, "config", None), "output_attentions", False))


def _none_mask(module, query: Tensor, key: Tensor, is_causal) -> Tuple[Optional[_masks.Mask], int]:
    """attention_mask=None, exactly as transformers' sdpa integration reads it: causal (top-left, keys cropped to
    Nq) when the layer is causal and Nq > 1, else no mask. Returns (mask, keys kept)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Nq, Nk = query.shape[2], key.shape[2]
    if not (causal and Nq > 1):
        return None, Nk
    if Nk >= Nq:
        return _masks.causal(), Nq  # top-left on Nq of Nk keys == bottom-right on the first Nq
    return _masks.causal("top_left"), Nk


def attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask,
                      dropout: float = 0.0, scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                      softcap: Optional[float] = None, s_aux: Optional[Tensor] = None,
                      position_bias: Optional[Tensor] = None, is_causal: Optional[bool] = None,
                      **transformers_kwargs) -> Tuple[Tensor, Optional[Tensor]]:
    """transformers' attention hook (AttentionInterface).

    query: (B, Hq, Nq, D); key, value: (B, Hkv, Nk, D|Dv) after the cache update (Hq % Hkv == 0, not repeated).
    attention_mask: a ``BackendMask`` from ``mask_interface``; None (causal per ``is_causal`` / the module, as
        sdpa reads it); or a user's 4-D tensor: bool (True = attend) or float (added to the scores).
    dropout: on the weights while ``module.training``. scaling: defaults to 1/√D. softcap: s ↦ c·tanh(s/c) on the
        scaled scores (Gemma 2). s_aux: (Hq,) attention-sink logits (gpt-oss). position_bias: an additive float
        tensor broadcastable to (B, Hq, Nq, Nk) (T5's relative bias). sliding_window is already in the mask (the
        same as eager, which ignores the keyword too).
    ``transformers_kwargs`` are what models pass every backend (position_ids, output_attentions, cache...); only
    output_attentions is read.
    Returns ((B, Nq, Hq, Dv) contiguous, weights (B, Hq, Nq, Nk) in query's dtype when output_attentions, else
    None). Weights are the softmax before dropout, without gradient (read-outs, recomputed from the LSE).
    """
    B, Hq, Nq, D = query.shape
    Nk = key.shape[2]
    if key.shape[0] != B:  # sdpa broadcasts a batch of 1 (learned queries, say); selfattn wants equal batches
        if B == 1:
            query = query.expand(key.shape[0], -1, -1, -1)
            B = key.shape[0]
        elif key.shape[0] == 1:
            key, value = key.expand(B, -1, -1, -1), value.expand(B, -1, -1, -1)
        else:
            raise ValueError(f"query and key: batch sizes {B} and {key.shape[0]} do not broadcast")

    bias: Optional[Tensor] = None
    backend: Optional[BackendMask] = None
    if isinstance(attention_mask, BackendMask):
        backend = attention_mask
        if Nk != backend.kv_length or B != backend.batch_size or Nq != backend.q_length:
            built = (backend.batch_size, backend.q_length, backend.kv_length)
            raise ValueError(f"attention_mask: built for (B, Nq, Nk) = {built}, but the layer passes "
                             f"{(B, Nq, Nk)} (a cache layer sized differently from the one the mask was built for?)")
        if backend.compiled_view():
            mask, K = backend.all_keys(), Nk
        else:
            mask, K = backend.mask, backend.keys
    elif attention_mask is None:
        mask, K = _none_mask(module, query, key, is_causal)
    elif isinstance(attention_mask, Tensor) and attention_mask.dim() == 4:
        t = attention_mask[..., :Nk]  # (B|1, H|1, Nq, Nk): a prepared mask may span a longer cache, as in flex
        K = Nk
        if t.dtype == torch.bool:
            mask = t
        elif t.is_floating_point():
            mask, bias = None, t.to(query.dtype)
        else:
            raise TypeError(f"attention_mask: a 4-D mask must be bool (True = attend) or float (additive), got "
                            f"dtype {t.dtype}")
    else:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else None
        raise TypeError(f"attention_mask: expected a selfattn BackendMask (register() installs the mask function), "
                        f"None or a 4-D tensor, got {type(attention_mask).__name__}"
                        + (f" of shape {shape}" if shape else ""))

    if K < Nk:  # static cache: the tail no query may see (views, no copy)
        key, value = key[:, :, :K], value[:, :, :K]
    if position_bias is not None:
        pb = position_bias[..., :K].to(query.dtype)
        bias = pb if bias is None else bias + pb
    if softcap is not None and bias is not None:
        raise ValueError("softcap together with an additive mask or position_bias: transformers caps the scores "
                         "before adding them, selfattn applies additive tensors before modifiers")
    mod = _softcap(float(softcap)) if softcap is not None else None
    p = float(dropout) if getattr(module, "training", False) else 0.0
    want_weights = _weights_requested(module, transformers_kwargs)

    sink_key = (s_aux is not None and torch.is_grad_enabled()
                and any(t.requires_grad for t in (query, key, value, s_aux)))
    if sink_key:
        # Under autograd a sink is one more key in front: score s_aux[h] (zero key + bias), value 0. Exact in
        # forward and backward (the LSE merge below would lose the LSE's gradient); costs a copy of K and V.
        mask, key, value, bias = _with_sink_key(mask, backend, K, query, key, value, bias, s_aux, is_causal, module)

    args = dict(bias=_bias_arg(bias, mod), scale=scaling)
    out, lse = attention(query, key, value, mask, dropout_p=p, return_lse=True, **args)  # (B, Hq, Nq, Dv), (B, Hq, Nq)

    if recording.active() and s_aux is None:
        # under selfattn.inspect.capture / record_attention: hand q, k and the LSE over, so that chosen layers,
        # heads and rows of any HF model are recomputed exactly without the N×N weights of every head
        bias_t = bias if isinstance(bias, Tensor) else None
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        recording.emit(recording.AttentionRecord(module, query, key, value, mask, bias_t, mod, float(scale), lse))

    sink_factor = None
    if s_aux is not None and not sink_key:
        # out already normalized over the keys; with the sink the denominator gains exp(s): scale by
        # Z / (Z + e^s) = sigmoid(lse − s); empty rows (lse = −inf) stay 0
        sink = s_aux.to(lse.dtype).reshape(1, Hq, 1)
        sink_factor = torch.sigmoid(lse - sink)  # (B, Hq, Nq)
        out = (out * sink_factor[..., None].to(out.dtype))

    weights = None
    if want_weights:
        with torch.no_grad():
            w = attention_weights(query, key, lse, mask, **args)  # (B, Hq, Nq, P + K), float32/float64
        if sink_key:
            w = w[..., 1:]
        if sink_factor is not None:
            w = w * sink_factor[..., None]
        if w.shape[-1] < Nk:  # static cache tail: weight 0, as eager returns it
            w = torch.nn.functional.pad(w, (0, Nk - w.shape[-1]))
        weights = w.to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights  # (B, Nq, Hq, Dv)


def _bias_arg(bias: Optional[Tensor], mod):
    if bias is None:
        return mod
    return bias if mod is None else [bias, mod]


def _with_sink_key(mask, backend: Optional[BackendMask], K: int, query: Tensor, key: Tensor, value: Tensor,
                   bias: Optional[Tensor], s_aux: Tensor, is_causal, module):
    """Prepend a zero key/value whose score is s_aux[h] through a bias column, and shift the mask by one key."""
    B, Hq, Nq, _ = query.shape
    Hkv = key.shape[1]
    key = torch.cat([key.new_zeros(B, Hkv, 1, key.shape[-1]), key], dim=2)  # (B, Hkv, 1 + K, D)
    value = torch.cat([value.new_zeros(B, Hkv, 1, value.shape[-1]), value], dim=2)  # (B, Hkv, 1 + K, Dv)
    col = s_aux.to(query.dtype).reshape(1, Hq, 1, 1).expand(1, Hq, Nq, 1)  # (1, Hq, Nq, 1)
    rest = torch.zeros(1, 1, 1, K, dtype=query.dtype, device=query.device)
    if bias is None:
        bias = torch.cat([col, rest.expand(1, Hq, Nq, K)], dim=3)  # (1, Hq, Nq, 1 + K)
    else:
        b4 = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        b4 = b4.expand(b4.shape[0], Hq, Nq, K)
        bias = torch.cat([col.expand(b4.shape[0], Hq, Nq, 1), b4], dim=3)
    sink = _masks.key_padding(torch.ones(B, dtype=torch.int64, device=query.device))  # key 0 for every query
    if backend is not None:
        return backend.with_phantom_key(), key, value, bias
    if mask is None:
        return None, key, value, bias
    if isinstance(mask, Tensor):  # a user's bool tensor: key 0 allowed
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        return torch.nn.functional.pad(m4, (1, 0), value=True), key, value, bias
    if isinstance(mask, _masks.Causal) and mask.align == "bottom_right":
        return mask | sink, key, value, bias  # bottom-right causal is unchanged by a key in front
    raise NotImplementedError(f"attention sinks under autograd with mask {mask!r}")
