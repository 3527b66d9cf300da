"""Context parallelism for layers and models: install a ``ContextParallel`` strategy on every
``selfattn.nn.Attention`` of a model, shard a batch's sequence, gather outputs, and sum parameter gradients over
the group.

Under context parallelism each rank runs the whole model on its shard of the sequence. Every op but attention is
per token, so the only cross-rank traffic in the forward is the attention's; positions (RoPE, learned position
embeddings) come from the layout. In the backward every parameter's gradient on a rank is the part of its own
tokens: ``all_reduce_grads`` sums them, which gives the single-process gradient of the summed loss.

Shape legend: B batch, N global sequence length, n = N/P local length, E embed dim.
"""
from __future__ import annotations

from typing import NoReturn, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..nn import Attention
from .agreement import agree, call_fields, mask_fingerprint, mod_fingerprint
from .layout import LAYOUTS, check_layout, group_rank, group_size, positions, shard, unshard
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["context_parallel", "ContextParallel", "shard_batch", "gather", "all_reduce_grads", "next_token_labels",
           "MODES"]

MODES = ("ring", "ulysses")


class ContextParallel:
    """The strategy ``context_parallel`` installs on each ``selfattn.nn.Attention`` (``layer.parallel``): the
    layer's input is this rank's shard of the sequence in ``layout``, its positions are the shard's global ones,
    and it attends across ``group`` by ``mode`` ("ring": ``ring_attention``; "ulysses": ``ulysses_attention``)."""

    def __init__(self, group=None, layout: str = "zigzag", mode: str = "ring"):
        check_layout(layout)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.group = group  # None: the default group
        self.layout, self.mode = layout, mode

    def positions(self, n: int, device=None) -> Tensor:
        """(n,) int64 global positions of this rank's n tokens (a length the layout cannot hold is refused on
        every rank)."""
        try:
            return positions(n, self.group, self.layout, device)
        except ValueError as e:
            self.refuse(e, device)

    def refuse(self, error: Exception, device=None) -> NoReturn:
        """Raise ``error`` here after telling the other ranks: they wait in the agreement that opens their next
        ``attend`` (ring_attention / ulysses_attention) and raise naming this rank."""
        if not dist.is_available() or not dist.is_initialized():
            raise error  # no group: no peer is waiting
        P, rank = group_size(self.group), group_rank(self.group)
        fields = call_fields(None, None, None, layout=self.layout, layouts=LAYOUTS, dropout_p=None, scale=None,
                             kernel=None, grad=False)
        agree(self.group, f"{self.mode} context parallelism", rank, P, fields, mask_fingerprint(None, 0),
              mod_fingerprint(None), error, 0, device)
        raise error  # pragma: no cover - agree raises the error it was handed

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask, *, bias, scale: float, dropout_p: float,
               kernel: Optional[str]) -> Tensor:
        """q (B, Hq, n, D), k (B, Hkv, n, D), v (B, Hkv, n, Dv): this rank's shard -> its rows (B, Hq, n, Dv)."""
        fn = ring_attention if self.mode == "ring" else ulysses_attention
        return fn(q, k, v, mask, bias=bias, scale=scale, dropout_p=dropout_p, group=self.group, layout=self.layout,
                  kernel=kernel)

    def __repr__(self) -> str:
        return f"ContextParallel(layout={self.layout!r}, mode={self.mode!r})"


def context_parallel(module: nn.Module, group=None, layout: str = "zigzag", mode: str = "ring") -> nn.Module:
    """Install a ``ContextParallel(group, layout, mode)`` strategy on every ``selfattn.nn.Attention`` inside
    ``module`` (Llama, GPT-2, your own stack); ``group=None`` is the default group, ``group=False`` switches
    context parallelism back off. Returns module. The model then takes this rank's shard of the tokens
    (``shard_batch``)."""
    strategy = None if group is False else ContextParallel(group, layout, mode)
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"module: {type(module).__name__} holds no selfattn.nn.Attention layer")
    for m in layers:
        m.parallel = strategy  # one strategy object shared by every layer: it holds no per-layer state
    return module


def shard_batch(*tensors: Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> Tuple[Tensor, ...]:
    """This rank's part of each full tensor along the sequence dim (1 for (B, N) ids / labels / (B, N, E))."""
    out = tuple(shard(t, group, layout, dim) for t in tensors)
    return out if len(out) != 1 else out[0]


def gather(x_local: Tensor, group=None, layout: str = "zigzag", dim: int = 1) -> Tensor:
    """The full tensor (every rank's shard in global order) on every rank; not differentiable."""
    return unshard(x_local, group, layout, dim)


def all_reduce_grads(module: nn.Module, group=None) -> None:
    """Sum every parameter's .grad over the group (one flat all_reduce): each rank then holds the gradient of the
    loss summed over all tokens, as one process on the full sequence would."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, group=group)
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.grad.numel()].view_as(p.grad))
        i += p.grad.numel()


def next_token_labels(input_ids: Tensor, ignore_index: int = -100) -> Tensor:
    """(B, N) labels for next-token prediction on the *full* sequence (label i = token i+1, the last ignored):
    shift before sharding, since a shard's last token predicts a token another rank holds."""
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    return labels
