"""KVCache: one layer's keys and values across generation steps (static or growing storage).

Shape legend: B batch, Hkv key/value heads, Nk positions stored, D / Dv key / value head dims.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["KVCache"]


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

