"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

How much each input token feeds each position after l layers, treating the residual connection as half of the
flow: per layer Ã = normalize_rows(0.5·mean_heads(W) + 0.5·I), then R_l = Ã_l · Ã_{l−1} ⋯ Ã_1.

Shape legend: B batch, N tokens (self-attention only: Nq == Nk == N), L layers.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

__all__ = ["rollout", "rollout_from_capture"]


def rollout(head_means: Sequence[Tensor], residual: float = 0.5) -> List[Tensor]:
    """head_means: per layer, the head-averaged weights (B, N, N), first layer first.
    residual: the identity's share (0.5 in the paper). Returns R_1 … R_L, each (B, N, N) with rows summing to 1:
    R_l[b, i, j] = how much token j's input reaches position i after layer l. Cost L matmuls of N³."""
    if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual: expected a number in [0, 1], got {residual!r}")
    if len(head_means) == 0:
        raise ValueError("head_means: expected at least one layer, got none")
    out: List[Tensor] = []
    R = None
    for i, a in enumerate(head_means):
        if not isinstance(a, Tensor) or a.dim() != 3 or a.shape[1] != a.shape[2]:
            raise ValueError(f"head_means[{i}]: expected (B, N, N) head-averaged self-attention weights, got "
                             f"{tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}")
        if R is not None and a.shape != R.shape:
            raise ValueError(f"head_means[{i}]: shape {tuple(a.shape)} differs from the previous layers' "
                             f"{tuple(R.shape)}")
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        at = (1.0 - residual) * a + residual * eye  # (B, N, N)
        at = at / at.sum(-1, keepdim=True).clamp(min=torch.finfo(a.dtype).tiny)  # rows of padded queries: 0 + I
        R = at if R is None else at @ R  # (B, N, N)
        out.append(R)
    return out


def rollout_from_capture(cap, residual: float = 0.5) -> List[Tensor]:
    """Rollout over the self-attention calls of a ``Capture`` taken with ``mean_heads=True``, in call order."""
    means = [lc.head_mean for lc in cap.layers if lc.Nq == lc.Nk]
    if not means or any(m is None for m in means):
        raise ValueError("cap: expected a Capture taken with mean_heads=True containing self-attention calls")
    return rollout(means, residual)
