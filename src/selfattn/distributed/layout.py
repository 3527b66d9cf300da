"""How a sequence is cut across the ranks of a process group, and the global positions of each rank's tokens.

Layouts (P ranks, global length N):

* ``"contiguous"``: rank r holds positions [r·N/P, (r+1)·N/P). Simple, but under a causal mask rank P−1 has P
  times the work of rank 0.
* ``"zigzag"``: the sequence is cut into 2P chunks of c = N/(2P); rank r holds chunks r and 2P−1−r, in that
  order (ring-flash-attention's layout). Under a causal mask every rank then computes the same number of tiles.

A rank's shard is a list of *segments* ``(local_start, length, global_start)``: one for contiguous, two for
zigzag. Ring steps and Ulysses' reordering read only these, so a new layout is one more case in ``segments``.

Shape legend: B batch, H heads, N global sequence length, n = N/P this rank's length, D head dim.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("zigzag", "contiguous")

__all__ = ["LAYOUTS", "segments", "positions", "shard", "unshard", "group_size", "group_rank", "check_layout"]

Segment = Tuple[int, int, int]  # (local_start, length, global_start)


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout


def group_size(group=None) -> int:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("selfattn.distributed: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (gloo on CPU, nccl on GPU)")
    return dist.get_world_size(group)


def group_rank(group=None) -> int:
    group_size(group)
    return dist.get_rank(group)


def segments(rank: int, P: int, n_local: int, layout: str) -> List[Segment]:
    """The segments of ``rank``'s shard of length ``n_local`` (global length P·n_local)."""
    check_layout(layout)
    if layout == "contiguous":
        return [(0, n_local, rank * n_local)]
    if n_local % 2:
        raise ValueError(f"layout='zigzag': each rank holds two chunks, so the local length must be even, got "
                         f"{n_local} (the global length must be a multiple of 2P = {2 * P})")
    c = n_local // 2
    return [(0, c, rank * c), (c, c, (2 * P - 1 - rank) * c)]


def positions(n_local: int, group=None, layout: str = "zigzag", device=None, rank: Optional[int] = None,
              P: Optional[int] = None) -> Tensor:
    """(n_local,) int64 global positions of this rank's tokens (RoPE, learned position embeddings)."""
    P = group_size(group) if P is None else P
    rank = group_rank(group) if rank is None else rank
    parts = [torch.arange(g, g + n, device=device) for _, n, g in segments(rank, P, n_local, layout)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def _check_len(N: int, P: int, layout: str, what: str):
    parts = 2 * P if layout == "zigzag" else P
    if N % parts:
        raise ValueError(f"{what}: length {N} along the sequence dim is not a multiple of {parts} "
                         f"({'2P' if layout == 'zigzag' else 'P'} for layout={layout!r}, P={P})")


def shard(x: Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """This rank's part of a full tensor x (the same x on every rank), cut along ``dim`` (2 for (B, H, N, D);
    pass 1 for (B, N) token ids). Returns a contiguous copy."""
    check_layout(layout)
    P, r = group_size(group), group_rank(group)
    N = x.shape[dim]
    _check_len(N, P, layout, "shard")
    n = N // P
    return torch.cat([x.narrow(dim, g, ln) for _, ln, g in segments(r, P, n, layout)], dim=dim).contiguous()


def unshard(x_local: Tensor, group=None, layout: str = "zigzag", dim: int = 2) -> Tensor:
    """The full tensor on every rank, from each rank's shard (an all_gather; not differentiable). Every rank must
    pass a shard of the same shape."""
    check_layout(layout)
    P = group_size(group)
    n = x_local.shape[dim]
    x_local = x_local.detach().contiguous()
    parts = [torch.empty_like(x_local) for _ in range(P)]
    dist.all_gather(parts, x_local, group=group)
    pieces = []  # (global_start, tensor) for every segment of every rank
    for r, part in enumerate(parts):
        for ls, ln, g in segments(r, P, n, layout):
            pieces.append((g, part.narrow(dim, ls, ln)))
    pieces.sort(key=lambda t: t[0])
    return torch.cat([p for _, p in pieces], dim=dim)
