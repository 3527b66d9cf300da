"""Rotary position embedding, Hugging Face Llama's "rotate_half" convention.

Shape legend: B batch, H heads, N tokens, D head dim, rd = 2·len(inv_freq) rotated dims (rd <= D).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rope_inv_freq", "apply_rope"]


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

