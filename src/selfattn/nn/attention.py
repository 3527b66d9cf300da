"""``Attention``: the one attention layer every model family uses (projections, GQA/MQA, RoPE, KV cache,
cross-attention), and the ``SequenceParallel`` strategy interface through which context parallelism
(``selfattn.distributed.context_parallel``) changes where the layer's positions come from and how it attends.

Shape legend: B batch, N query tokens, M context (key) tokens, E embed dim, Hq query heads, Hkv key/value heads,
D head dim, Nk keys attended (cache prefix + new), n this rank's tokens under context parallelism.
"""
from __future__ import annotations

import math
from typing import NoReturn, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks as _masks
from ._common import and_masks, as_mask, attend, check_pos_int
from .cache import KVCache
from .rope import apply_rope, rope_inv_freq

__all__ = ["Attention", "SequenceParallel"]

# constructor arguments removed when context parallelism became a strategy object: a clear error, not a bare
# "unexpected keyword argument"
_REMOVED = ("cp_group", "cp_layout", "cp_mode")


@runtime_checkable
class SequenceParallel(Protocol):
    """What a layer needs from a context-parallel strategy (``selfattn.distributed.context_parallel`` installs
    one on every ``Attention`` of a model as ``layer.parallel``; None means one process holds the sequence)."""

    def positions(self, n: int, device=None) -> Tensor:
        """(n,) int64 global positions of this rank's n tokens (RoPE, learned position embeddings)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[_masks.Mask], *, bias, scale: float,
               dropout_p: float, kernel: Optional[str]) -> Tensor:
        """This rank's rows (B, Hq, n, Dv) of attention over the whole sharded sequence."""

    def refuse(self, error: Exception, device=None) -> NoReturn:
        """Raise ``error`` on this rank after telling the other ranks, which wait in their ``attend``, so that
        they raise too instead of waiting for a rank that will not come (misuse on one rank only)."""


class Attention(nn.Module):
    """Multi-head attention as models use it: projections → (RoPE) → (cache) → attention kernel → out_proj.

    Parameters: ``qkv_proj`` (fused, E -> (Hq + 2·Hkv)·D) or ``q_proj`` / ``k_proj`` (kdim) / ``v_proj`` (vdim);
    ``out_proj`` (Hq·D -> E). num_kv_heads < num_heads is GQA (1 = MQA): K/V are never repeated.
    rope_theta: None = no rotary embedding; else RoPE on the first rope_dim (default D) dims of q and k, with the
    inverse frequencies in the non-persistent buffer ``rope_inv_freq`` (a model with scaled RoPE overwrites it).
    scale: None = 1/√D (T5 passes 1.0). causal: a bottom-right causal mask, so a query block appended to a cache
    sees the whole prefix. ``kernel`` (attribute, default None = automatic) is passed to ``selfattn.attention``.
    ``parallel`` (attribute, default None = one process): a ``SequenceParallel`` strategy; x is then this rank's
    shard of the sequence, RoPE takes the strategy's global positions and attention runs through its ``attend``.
    ``selfattn.distributed.context_parallel(model, group, layout, mode)`` installs one on every layer.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = True, qkv_fused: bool = False,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, out_bias: Optional[bool] = None,
                 rope_theta: Optional[float] = None, rope_dim: Optional[int] = None, scale: Optional[float] = None,
                 dropout: float = 0.0, causal: bool = False, device=None, dtype=None, **removed):
        super().__init__()
        if removed:
            gone = sorted(set(removed) & set(_REMOVED))
            if gone:
                raise TypeError(f"Attention: {', '.join(gone)} are no longer constructor arguments; context "
                                f"parallelism is installed on a built model by "
                                f"selfattn.distributed.context_parallel(model, group, layout=..., mode=...)")
            raise TypeError(f"Attention: unexpected keyword argument(s) {sorted(removed)}")
        check_pos_int("embed_dim", embed_dim, False)
        check_pos_int("num_heads", num_heads, False)
        num_kv_heads = num_heads if num_kv_heads is None else check_pos_int("num_kv_heads", num_kv_heads, False)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads: num_heads={num_heads} must be a multiple of it, got {num_kv_heads}")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"head_dim: embed_dim={embed_dim} is not divisible by num_heads={num_heads}; "
                                 f"pass head_dim explicitly")
            head_dim = embed_dim // num_heads
        check_pos_int("head_dim", head_dim, False)
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
        self.parallel: Optional[SequenceParallel] = None
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

    def cp_positions(self, N: int, device=None) -> Optional[Tensor]:
        """(N,) global positions of this rank's N tokens under context parallelism; None without it."""
        if self.parallel is None:
            return None
        return self.parallel.positions(N, device)

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
        cp = self.parallel is not None
        if cp and (cross or cache is not None):  # misuse on one rank: the others hear of it, none waits
            self.parallel.refuse(ValueError(
                f"{'context' if cross else 'cache'}: context parallelism (layer.parallel, installed by "
                f"selfattn.distributed.context_parallel) serves self-attention over a sharded sequence, without a "
                f"KV cache or cross-attention context"), x.device)
        q, k, v = self._project(x, context, need_kv)
        if self.rope_inv_freq is not None and not cross:
            if positions is None and cp:
                if position_offset is not None:
                    self.parallel.refuse(ValueError("position_offset: under context parallelism positions come "
                                                    "from the layout"), x.device)
                positions = self.parallel.positions(N, x.device)
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
        m = as_mask(mask)
        if self.causal and not cross and not (N == 1 and m is None and not cp):
            # one new token at the end of the keys sees every key: no mask at all, no tile classification
            m = and_masks(_masks.causal(), m)
        p = self.dropout if self.training else 0.0
        if cp:
            out = self.parallel.attend(q, k, v, m, bias=bias, scale=self.scale, dropout_p=p,
                                       kernel=self.kernel)  # (B, Hq, n, D): this rank's rows
        else:
            # a decode step (one token against the cache, no mask) gets the "decode" kernel by attention()'s rule
            out = attend(self, q, k, v, m, bias, self.scale, p, self.kernel)  # (B, Hq, N, D)
        out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, N, Hq·D)
        return self.out_proj(out)
