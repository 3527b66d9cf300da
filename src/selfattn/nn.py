"""Attention layers on ``selfattn.attention``: the one layer every model uses, a drop-in
``torch.nn.MultiheadAttention``, a KV cache, and the capture hook ``record_attention`` that the inspect tools read.

Shape legend: B batch, N query tokens, M context (key) tokens, E embed dim, Hq query heads, Hkv key/value heads,
D head dim, Nk keys attended (cache prefix + new), L/S torch's target/source lengths.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as _cp
from . import masks as _masks
from .functional import _split_bias, attention
from .scores import ScoreMod

__all__ = ["Attention", "MultiheadAttention", "KVCache", "AttentionRecord", "record_attention",
           "apply_rope", "rope_inv_freq", "activation"]

# Hugging Face's names for the activations the model families use (config.json hidden_act / activation_function)
_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),  # exact (erf) GELU: BERT, ViT
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # tanh approximation: GPT-2
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,  # T5 v1.0
    "silu": F.silu,  # Llama (SwiGLU gate)
    "swish": F.silu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function a Hugging Face config names (``hidden_act``, ``activation_function``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


# ---------------------------------------------------------------------------------------------------------------
# Capture: the contract the inspect tools rely on.
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class AttentionRecord:
    """One attention call as the kernel saw it.

    module: the Attention / MultiheadAttention instance. q: (B, Hq, Nq, D) exactly as passed to the kernel (after
    RoPE); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv). mask: a ``selfattn.masks`` object or None (bool tensors are
    converted with ``masks.from_tensor``). bias: additive float tensor or None. score_mod: ``ScoreMod`` or None.
    scale: the float the scores were multiplied by. lse: (B, Hq, Nq) natural-log log-sum-exp of each row.
    The tensors are the live ones (not detached, not copied): a callback that keeps them should detach/clone."""
    module: nn.Module
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Optional[_masks.Mask]
    bias: Optional[Tensor]
    score_mod: Optional[ScoreMod]
    scale: float
    lse: Tensor


class _PerThreadList:
    """A list per thread: a recorder sees the attention calls made by the thread that opened it, not the calls
    other threads (a data loader, a server's other requests) make at the same time."""

    def __init__(self):
        self._local = threading.local()

    def _items(self) -> list:
        items = getattr(self._local, "items", None)
        if items is None:
            items = self._local.items = []
        return items

    def append(self, x):
        self._items().append(x)

    def __len__(self):
        return len(self._items())

    def __iter__(self):
        return iter(list(self._items()))

    def __getitem__(self, i):
        return self._items()[i]

    def __delitem__(self, i):
        del self._items()[i]


_RECORDERS = _PerThreadList()  # Callable[[AttentionRecord], None] per thread


@contextlib.contextmanager
def record_attention(callback: Callable[[AttentionRecord], None]) -> Iterator[None]:
    """While active, every Attention / MultiheadAttention forward also asks the kernel for the LSE and calls
    ``callback(record)``. Recorders nest (a per-thread stack; every active one is called, outermost first) and
    see only the calls of the thread that opened them.
    With no recorder active nothing is computed or stored."""
    if not callable(callback):
        raise TypeError(f"callback: expected a callable taking an AttentionRecord, got {type(callback).__name__}")
    _RECORDERS.append(callback)
    try:
        yield
    finally:
        # remove this exact entry (identity), even if recorders were closed out of order
        for i in range(len(_RECORDERS) - 1, -1, -1):
            if _RECORDERS[i] is callback:
                del _RECORDERS[i]
                break


def _selfattn_runs_the_attention(module, args):
    return None  # see MultiheadAttention.__init__: its presence turns torch's fused encoder fast path off


def _as_mask(mask, name: str = "mask") -> Optional[_masks.Mask]:
    if mask is None or isinstance(mask, _masks.Mask):
        return mask
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise TypeError(f"{name}: expected a bool tensor (True = may attend) or a selfattn.masks object, got "
                            f"dtype {mask.dtype}, shape {tuple(mask.shape)}")
        return _masks.from_tensor(mask)
    raise TypeError(f"{name}: expected None, a bool tensor or a selfattn.masks object, got {type(mask).__name__}")


def _and(a: Optional[_masks.Mask], b: Optional[_masks.Mask]) -> Optional[_masks.Mask]:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def _run(module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask, bias, scale: float, dropout_p: float,
         kernel: Optional[str]) -> Tensor:
    """Call the kernel; under ``record_attention`` also get the LSE and hand a record to every recorder."""
    if not _RECORDERS:
        return attention(q, k, v, mask, bias=bias, scale=scale, dropout_p=dropout_p, kernel=kernel)
    mask = _as_mask(mask)
    bias_t, mod = _split_bias(bias)
    out, lse = attention(q, k, v, mask, bias=bias, scale=scale, dropout_p=dropout_p, kernel=kernel,
                         return_lse=True)
    rec = AttentionRecord(module, q, k, v, mask, bias_t, mod, float(scale), lse)
    for cb in list(_RECORDERS):
        cb(rec)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding (Hugging Face Llama "rotate_half" convention)
# ---------------------------------------------------------------------------------------------------------------
def rope_inv_freq(rope_dim: int, theta: float, device=None) -> Tensor:
    """(rope_dim // 2,) float32 inverse frequencies theta^(-2i/rope_dim), computed as HF Llama does (float32)."""
    return 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.int64, device=device).float() / rope_dim))


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """x: (B, H, N, D); positions: (N,) or (B, N) int; rotates the first 2·len(inv_freq) dims of each head.
    cos/sin are built in float32 then cast to x's dtype (HF does the same, so half-precision results agree)."""
    rd = 2 * inv_freq.shape[0]
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)  # (B|-, N, rd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B|-, N, rd)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, N, rd)
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + _rotate_half(xr) * sin, xp), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------------------
class KVCache:
    """One layer's keys and values, (B, Hkv, Nk, D) and (B, Hkv, Nk, Dv).

    ``max_len`` given: static -- storage for max_len positions is allocated on the first ``update`` and never
    moves (exceeding it raises). ``max_len=None``: growing -- capacity doubles when full, so the prefix is copied
    O(log N) times over a whole generation, not once per step. ``update`` writes only the new positions and
    returns views of the filled prefix (no copy). Batch, heads, dims, dtype and device come from the first update.
    For cross-attention (T5) the layer fills the cache once from the encoder output and reuses it afterwards.
    """

    def __init__(self, max_len: Optional[int] = None):
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len: expected None (growing) or a positive int, got {max_len!r}")
        self.max_len = max_len
        self.length = 0
        self.cross = False  # set by a cross-attention layer: filled once from the encoder output, then reused
        self._k: Optional[Tensor] = None
        self._v: Optional[Tensor] = None

    @classmethod
    def for_model(cls, num_layers: int, max_len: Optional[int] = None) -> List["KVCache"]:
        """One cache per layer, in layer order."""
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        return [cls(max_len) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def reset(self) -> None:
        """Forget the contents, keep the storage (a static cache is reused without reallocating)."""
        self.length = 0

    def _allocate(self, k_new: Tensor, v_new: Tensor, cap: int, keep: int) -> None:
        B, H, _, D = k_new.shape
        k = torch.empty(B, H, cap, D, dtype=k_new.dtype, device=k_new.device)  # (B, Hkv, cap, D)
        v = torch.empty(B, H, cap, v_new.shape[-1], dtype=v_new.dtype, device=v_new.device)
        if keep:
            k[:, :, :keep] = self._k[:, :, :keep]
            v[:, :, :keep] = self._v[:, :, :keep]
        self._k, self._v = k, v

    def update(self, k_new: Tensor, v_new: Tensor) -> Tuple[Tensor, Tensor]:
        """Append k_new (B, Hkv, n, D), v_new (B, Hkv, n, Dv); return (k_all, v_all), views of the first
        length + n positions."""
        if not isinstance(k_new, Tensor) or not isinstance(v_new, Tensor) or k_new.dim() != 4 or v_new.dim() != 4:
            raise ValueError(f"k_new, v_new: expected 4-dim tensors (B, Hkv, n, D), got "
                             f"{getattr(k_new, 'shape', type(k_new))} and {getattr(v_new, 'shape', type(v_new))}")
        if k_new.shape[:3] != v_new.shape[:3]:
            raise ValueError(f"v_new: expected (B, Hkv, n) = {tuple(k_new.shape[:3])} like k_new, got "
                             f"{tuple(v_new.shape)}")
        n = k_new.shape[2]
        need = self.length + n
        if self._k is not None and (self._k.shape[:2] != k_new.shape[:2] or self._k.shape[3] != k_new.shape[3]
                                    or self._v.shape[3] != v_new.shape[3] or self._k.dtype != k_new.dtype
                                    or self._k.device != k_new.device):
            raise ValueError(f"k_new: cache holds (B, Hkv, ·, D) = {tuple(self._k.shape)} {self._k.dtype} on "
                             f"{self._k.device}, got {tuple(k_new.shape)} {k_new.dtype} on {k_new.device}")
        if self.max_len is not None:
            if need > self.max_len:
                raise ValueError(f"k_new: static cache of max_len={self.max_len} holds {self.length} positions, "
                                 f"cannot append {n} more")
            if self._k is None:
                self._allocate(k_new, v_new, self.max_len, 0)
        elif need > self.capacity:
            self._allocate(k_new, v_new, max(need, 2 * self.capacity, 16), self.length)
        self._k[:, :, self.length:need] = k_new
        self._v[:, :, self.length:need] = v_new
        self.length = need
        return self._k[:, :, :need], self._v[:, :, :need]  # (B, Hkv, Nk, D), (B, Hkv, Nk, Dv): views

    def get(self) -> Tuple[Tensor, Tensor]:
        """(k_all, v_all) views of what is stored."""
        if self._k is None:
            raise ValueError("cache: empty, nothing stored yet")
        return self._k[:, :, :self.length], self._v[:, :, :self.length]

    def __repr__(self) -> str:
        kind = f"static max_len={self.max_len}" if self.max_len is not None else "growing"
        return f"KVCache({kind}, length={self.length}, capacity={self.capacity})"


# ---------------------------------------------------------------------------------------------------------------
# The layer every model uses
# ---------------------------------------------------------------------------------------------------------------
def _pos_int(name: str, x, allow_none: bool = True):
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {x!r}")
    return x


class Attention(nn.Module):
    """Multi-head attention as models use it: projections → (RoPE) → (cache) → attention kernel → out_proj.

    Parameters: ``qkv_proj`` (fused, E -> (Hq + 2·Hkv)·D) or ``q_proj`` / ``k_proj`` (kdim) / ``v_proj`` (vdim);
    ``out_proj`` (Hq·D -> E). num_kv_heads < num_heads is GQA (1 = MQA): K/V are never repeated.
    rope_theta: None = no rotary embedding; else RoPE on the first rope_dim (default D) dims of q and k, with the
    inverse frequencies in the non-persistent buffer ``rope_inv_freq`` (a model with scaled RoPE overwrites it).
    scale: None = 1/√D (T5 passes 1.0). causal: a bottom-right causal mask, so a query block appended to a cache
    sees the whole prefix. ``kernel`` (attribute, default None = automatic) is passed to ``selfattn.attention``.
    cp_group: a torch.distributed process group for context parallelism (default None: one process): x is then
    this rank's shard of the sequence in ``cp_layout`` ("zigzag" or "contiguous"), RoPE takes the shard's global
    positions, and attention runs across the group by ``cp_mode`` ("ring" or "ulysses"); see
    ``selfattn.distributed`` (``context_parallel(model, group)`` sets it on every layer of a model).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = True, qkv_fused: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, out_bias: Optional[bool] = None,
                 rope_theta: Optional[float] = None, rope_dim: Optional[int] = None, scale: Optional[float] = None,
                 dropout: float = 0.0, causal: bool = False, device=None, dtype=None, cp_group=None,
                 cp_layout: str = "zigzag", cp_mode: str = "ring"):
        super().__init__()
        _pos_int("embed_dim", embed_dim, False)
        _pos_int("num_heads", num_heads, False)
        num_kv_heads = num_heads if num_kv_heads is None else _pos_int("num_kv_heads", num_kv_heads, False)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: num_heads={num_heads} must be a multiple of it, got {num_kv_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"head_dim: embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                                 f"pass head_dim explicitly")
            head_dim = embed_dim // num_heads
        _pos_int("head_dim", head_dim, False)
        if qkv_fused and (kdim not in (None, embed_dim) or vdim not in (None, embed_dim)):
            raise ValueError(f"qkv_fused: a fused projection reads one input of width embed_dim={embed_dim}, got "
                             f"kdim={kdim}, vdim={vdim}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        if rope_theta is not None:
            rope_dim = head_dim if rope_dim is None else rope_dim
            if rope_dim % 2 or not (0 < rope_dim <= head_dim):
                raise ValueError(f"rope_dim: expected an even number in (0, head_dim={head_dim}], got {rope_dim}")
        elif rope_dim is not None:
            raise ValueError(f"rope_dim: only meaningful with rope_theta, got rope_dim={rope_dim}, rope_theta=None")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.qkv_fused, self.causal, self.dropout = qkv_fused, causal, float(dropout)
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        self.kernel: Optional[str] = None
        self.set_context_parallel(cp_group, cp_layout, cp_mode)
        fk = dict(device=device, dtype=dtype)
        q_out, kv_out = num_heads * head_dim, num_kv_heads * head_dim
        if qkv_fused:
            self.qkv_proj = nn.Linear(embed_dim, q_out + 2 * kv_out, bias=bias, **fk)
        else:
            self.q_proj = nn.Linear(embed_dim, q_out, bias=bias, **fk)
            self.k_proj = nn.Linear(kdim or embed_dim, kv_out, bias=bias, **fk)
            self.v_proj = nn.Linear(vdim or embed_dim, kv_out, bias=bias, **fk)
        self.out_proj = nn.Linear(q_out, embed_dim, bias=bias if out_bias is None else out_bias, **fk)
        self.rope_theta = rope_theta
        if rope_theta is not None:
            self.register_buffer("rope_inv_freq", rope_inv_freq(rope_dim, float(rope_theta), device), persistent=False)
        else:
            self.rope_inv_freq = None

    def set_context_parallel(self, group, layout: str = "zigzag", mode: str = "ring") -> None:
        """Attend across ``group`` (None: one process, the default) with this layout and mode."""
        _cp.layout.check_layout(layout)
        if mode not in _cp.MODES:
            raise ValueError(f"cp_mode: expected one of {_cp.MODES}, got {mode!r}")
        self.cp_group, self.cp_layout, self.cp_mode = group, layout, mode

    def cp_positions(self, N: int, device=None) -> Optional[Tensor]:
        """(N,) global positions of this rank's N tokens under context parallelism; None without it."""
        if self.cp_group is None:
            return None
        return _cp.positions(N, self.cp_group, self.cp_layout, device)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not round the RoPE frequencies: in bf16 the angle pos·f is off by ~pos·2⁻⁸ rad
        # (HF keeps inv_freq in float32 too); device moves still apply
        inv = self.rope_inv_freq
        super()._apply(fn, recurse)
        if inv is not None:
            self.rope_inv_freq = inv.to(self.rope_inv_freq.device)
        return self

    def _project(self, x: Tensor, context: Optional[Tensor], need_kv: bool):
        """-> q (B, Hq, N, D), k, v (B, Hkv, M, D) or None when the K/V come from a filled cross cache."""
        B, N, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_fused:
            w, b = self.qkv_proj.weight, self.qkv_proj.bias
            if context is None:
                qkv = self.qkv_proj(x)  # (B, N, (Hq + 2Hkv)·D): one matmul
                q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            else:
                q = F.linear(x, w[:H * D], None if b is None else b[:H * D])
                k, v = (F.linear(context, w[H * D:], None if b is None else b[H * D:]).split([Hkv * D, Hkv * D], -1)
                        if need_kv else (None, None))
        else:
            q = self.q_proj(x)
            src = x if context is None else context
            k, v = (self.k_proj(src), self.v_proj(src)) if need_kv else (None, None)
        q = q.view(B, N, H, D).transpose(1, 2)  # (B, Hq, N, D)
        if k is not None:
            M = k.shape[1]
            k = k.view(B, M, Hkv, D).transpose(1, 2)  # (B, Hkv, M, D)
            v = v.view(B, M, Hkv, D).transpose(1, 2)
        return q, k, v

    def forward(self, x: Tensor, context: Optional[Tensor] = None, mask=None, bias=None,
                cache: Optional[KVCache] = None, position_offset: Optional[int] = None,
                positions: Optional[Tensor] = None) -> Tensor:
        """x: (B, N, E); context: (B, M, kdim) for cross-attention (None = self-attention).
        mask: None, bool tensor broadcastable to (B, Hq, N, Nk) (True = may attend) or a ``selfattn.masks`` object,
        combined (AND) with the causal mask when ``causal``. bias: tensor / ScoreMod / list, as ``attention``.
        cache: self-attention appends this call's K/V and attends to everything stored; cross-attention fills it
        once from ``context`` and reuses it (``context`` is then ignored and may be None).
        position_offset: RoPE position of x's first token (default: the cache length, else 0); positions: explicit
        (N,) or (B, N) RoPE positions instead. Returns (B, N, E)."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected (B, N, E={self.embed_dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a selfattn.nn.KVCache, got {type(cache).__name__}")
        cross = context is not None or (cache is not None and cache.cross)
        B, N, _ = x.shape
        need_kv = not (cross and cache is not None and cache.length > 0)
        if cross and need_kv and context is None:
            raise ValueError("context: a cross-attention cache is empty, pass the encoder output as context")
        cp = self.cp_group is not None
        if cp and (cross or cache is not None):
            raise ValueError("cp_group: context parallelism serves self-attention over a sharded sequence, without "
                             "a KV cache or cross-attention context")
        q, k, v = self._project(x, context, need_kv)
        if self.rope_inv_freq is not None and not cross:
            if positions is None and cp:
                if position_offset is not None:
                    raise ValueError("position_offset: under context parallelism positions come from the layout")
                positions = self.cp_positions(N, x.device)
            if positions is None:
                off = position_offset if position_offset is not None else (cache.length if cache is not None else 0)
                positions = torch.arange(off, off + N, device=x.device)
            elif position_offset is not None:
                raise ValueError("positions, position_offset: pass one of them, not both")
            q = apply_rope(q, positions, self.rope_inv_freq)  # (B, Hq, N, D)
            k = apply_rope(k, positions, self.rope_inv_freq)  # (B, Hkv, N, D)
        if cache is not None:
            if cross:
                cache.cross = True
                k, v = cache.update(k, v) if need_kv else cache.get()
            else:
                k, v = cache.update(k, v)  # (B, Hkv, Nk, D) views of prefix + new
        m = _as_mask(mask)
        if self.causal and not cross and not (N == 1 and m is None and not cp):
            # one new token at the end of the keys sees every key: no mask at all, no tile classification
            m = _and(_masks.causal(), m)
        p = self.dropout if self.training else 0.0
        if cp:
            fn = _cp.ring_attention if self.cp_mode == "ring" else _cp.ulysses_attention
            out = fn(q, k, v, m, bias=bias, scale=self.scale, dropout_p=p, group=self.cp_group,
                     layout=self.cp_layout, kernel=self.kernel)  # (B, Hq, n, D): this rank's rows
        else:
            # a decode step (one token against the cache, no mask) gets the "decode" kernel by attention()'s rule
            out = _run(self, q, k, v, m, bias, self.scale, p, self.kernel)  # (B, Hq, N, D)
        out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, Hq·D)
        return self.out_proj(out)


# ---------------------------------------------------------------------------------------------------------------
# Drop-in torch.nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------------------------
class MultiheadAttention(nn.Module):
    """Same constructor, parameters (state_dict keys), forward and return as ``torch.nn.MultiheadAttention``;
    the attention itself runs in selfattn's kernels.

    Masks keep torch's conventions: bool True = NOT allowed; float masks are added to the scores. Bool masks
    become ``selfattn.masks`` objects (so fully masked tiles are skipped), float masks a bias tensor.
    need_weights=False: automatic kernel (tiled for long sequences). need_weights=True: the reference kernel with
    exact weights; rows where every key is masked give output 0 and weights 0 (torch gives NaN there).
    is_causal is, as in torch, a hint that attn_mask is causal: without key_padding_mask and need_weights it
    runs a top-left causal mask (tiles above the diagonal skipped) instead of reading attn_mask.
    Dropout draws its pattern from selfattn's counter-based generator, so it is not bit-equal to torch's; the
    returned weights are the ones before dropout.
    """

    __constants__ = ["batch_first"]

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        _pos_int("embed_dim", embed_dim, False)
        _pos_int("num_heads", num_heads, False)
        if embed_dim % num_heads:
            raise ValueError(f"num_heads: embed_dim={embed_dim} must be divisible by it, got {num_heads}")
        if not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **fk))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **fk))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **fk))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **fk))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        # torch's Transformer layers take a fused fast path in eval / no_grad that reads this module's weights and
        # runs torch's own kernel instead of calling forward; they skip it when any submodule has a forward hook.
        # This no-op pre-hook keeps selfattn's kernel the one that runs inside nn.TransformerEncoderLayer.
        self.register_forward_pre_hook(_selfattn_runs_the_attention)

    def merge_masks(self, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                    query: Tensor) -> Tuple[Optional[Tensor], Optional[int]]:
        """As torch.nn.MultiheadAttention.merge_masks: (merged mask, type), type 1 for key_padding_mask alone, 2
        when attn_mask is given (expanded to (N, H, L, S), plus the padding if any), (None, None) for neither."""
        mask_type, merged = None, None
        if key_padding_mask is not None:
            mask_type, merged = 1, key_padding_mask
        if attn_mask is not None:
            Nb, L, _ = query.shape
            mask_type = 2
            if attn_mask.dim() == 3:
                merged = attn_mask.view(Nb, -1, L, L)  # (N, H, L, L)
            else:
                merged = attn_mask.view(1, 1, L, L).expand(Nb, self.num_heads, -1, -1)  # (N, H, L, L)
            if key_padding_mask is not None:
                merged = merged + key_padding_mask.view(Nb, 1, 1, L).expand(-1, self.num_heads, -1, -1)
        return merged, mask_type

    def _reset_parameters(self):
        # torch's initialization, so a freshly built layer is distributed like torch's
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _in_proj(self, query, key, value):
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            wq, wk, wv = w.chunk(3)
            if query is key and key is value:
                return F.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)  # self-attention: one matmul
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)

    @staticmethod
    def _check_mask(name: str, m, shapes):
        if m is None:
            return None
        if not isinstance(m, Tensor):
            raise TypeError(f"{name}: expected a bool or float tensor, got {type(m).__name__}")
        if m.dtype != torch.bool and not m.is_floating_point():
            raise TypeError(f"{name}: expected a bool (True = not allowed) or float (added) tensor, got {m.dtype}")
        if tuple(m.shape) not in shapes:
            raise ValueError(f"{name}: expected shape {' or '.join(str(s) for s in shapes)}, got {tuple(m.shape)}")
        return m

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        """query (L, N, E) / (N, L, E) with batch_first / (L, E) unbatched; key (S, N, kdim), value (S, N, vdim).
        key_padding_mask (N, S) or (S,); attn_mask (L, S) or (N·H, L, S). Returns (output like query,
        weights (N, L, S) averaged over heads or (N, H, L, S), unbatched without N; None if not need_weights)."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"query, key, value: expected all 3-dim (batched) or all 2-dim (unbatched), got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)  # (L, 1, E)
            if key_padding_mask is not None and isinstance(key_padding_mask, Tensor):
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)  # (L, N, E)
        L, Nb, E = query.shape
        S = key.shape[0]
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(f"query, key, value: expected last dims ({self.embed_dim}, {self.kdim}, {self.vdim}), "
                             f"got {E}, {key.shape[-1]}, {value.shape[-1]}")
        if key.shape[:2] != value.shape[:2] or key.shape[1] != Nb:
            raise ValueError(f"key, value: expected (S, N={Nb}) leading dims alike, got {tuple(key.shape)}, "
                             f"{tuple(value.shape)}")
        key_padding_mask = self._check_mask("key_padding_mask", key_padding_mask, [(Nb, S)])
        if is_causal and attn_mask is None:
            raise RuntimeError("is_causal: torch.nn.MultiheadAttention needs attn_mask with the is_causal hint "
                               "(e.g. nn.Transformer.generate_square_subsequent_mask); pass it too")
        use_causal = is_causal and key_padding_mask is None and not need_weights
        # under the hint torch ignores attn_mask (and so never checks its shape); otherwise it is read
        attn_mask = None if use_causal else self._check_mask("attn_mask", attn_mask, [(L, S), (Nb * H, L, S)])

        q, k, v = self._in_proj(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        extra = 0  # keys appended after S (bias_k, zero attention): always allowed
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, Nb, E)])  # (S+1, N, E)
            v = torch.cat([v, self.bias_v.expand(1, Nb, E)])
            extra += 1
        q = q.reshape(L, Nb, H, D).permute(1, 2, 0, 3)  # (N, H, L, D)
        k = k.reshape(k.shape[0], Nb, H, D).permute(1, 2, 0, 3)  # (N, H, S', D)
        v = v.reshape(v.shape[0], Nb, H, D).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            z = torch.zeros(Nb, H, 1, D, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, z], dim=2), torch.cat([v, z], dim=2)  # (N, H, S'+1, D)
            extra += 1

        mask, bias = None, None
        if use_causal:
            mask = _masks.causal("top_left")  # torch ignores attn_mask under the hint; so do we
        else:
            for m, shape4 in ((attn_mask, (1, 1, L, S) if attn_mask is not None and attn_mask.dim() == 2
                               else (Nb, H, L, S)),
                              (key_padding_mask, (Nb, 1, 1, S))):
                if m is None:
                    continue
                m = m.reshape(shape4)
                if extra:
                    m = F.pad(m, (0, extra), value=False if m.dtype == torch.bool else 0.0)
                if m.dtype == torch.bool:
                    mask = _and(mask, _masks.from_tensor(~m))  # torch: True = not allowed
                else:
                    m = m.to(q.dtype)
                    bias = m if bias is None else bias + m
        p = self.dropout if self.training else 0.0
        scale = 1.0 / math.sqrt(D)
        weights = None
        if need_weights:
            out, lse, weights = self._weights_path(q, k, v, mask, bias, scale, p)
            if _RECORDERS:
                rec = AttentionRecord(self, q, k, v, mask, bias, None, scale, lse)
                for cb in list(_RECORDERS):
                    cb(rec)
        else:
            out = _run(self, q, k, v, mask, bias, scale, p, None)  # (N, H, L, D)
        out = out.permute(2, 0, 1, 3).reshape(L, Nb, E)  # (L, N, E)
        out = self.out_proj(out)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)  # (N, L, S')
        if not batched:
            out = out.squeeze(1)
            if weights is not None:
                weights = weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)  # (N, L, E)
        return out, weights

    def _weights_path(self, q, k, v, mask, bias, scale, p):
        """The reference kernel: exact weights (B, H, L, S') beside the output, rows with no key all 0."""
        out, lse, w = attention(q, k, v, mask, bias=bias, scale=scale, dropout_p=p, return_lse=True,
                                return_weights=True)
        return out, lse, w
