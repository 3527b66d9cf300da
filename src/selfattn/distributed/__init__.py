"""Context parallelism on torch.distributed: one sequence sharded across the ranks of a process group, attention
computed exactly across them (gloo on CPU, NCCL on GPU; no transport of selfattn's own).

    import torch.distributed as dist, selfattn
    from selfattn import distributed as cp
    dist.init_process_group("gloo")                      # torchrun sets rank / world size
    q, k, v = (cp.shard(t, layout="zigzag") for t in (q_full, k_full, v_full))   # (B, H, N/P, D)
    out = cp.ring_attention(q, k, v, selfattn.masks.causal())                     # this rank's rows
    full = cp.unshard(out)                               # == selfattn.attention(q_full, k_full, v_full, causal)

* ``ring_attention`` (ring.py): K/V travel around the ring, overlapped with the local tiles; steps the mask rules
  out are skipped; any mask, modifiers, dropout, GQA; forward and backward.
* ``ulysses_attention`` (ulysses.py): all-to-all to head shards and back (heads divisible by P).
* ``ring_plan``: the steps and tiles each rank computes for a mask, without a process group.
* layout.py: ``shard``, ``unshard``, ``positions`` for the "zigzag" (causal-balanced) and "contiguous" layouts.
* model.py: ``context_parallel(model, group)`` installs a ``ContextParallel`` strategy (positions and attend) on
  every attention layer of a model; ``shard_batch``, ``gather``, ``all_reduce_grads``, ``next_token_labels``.
"""
from .layout import LAYOUTS, positions, segments, shard, unshard
from .model import MODES, ContextParallel, all_reduce_grads, context_parallel, gather, next_token_labels, shard_batch
from .ring import PLAN_BLOCK, RingPlan, SubCall, ring_attention, ring_plan
from .ulysses import ulysses_attention

__all__ = ["ring_attention", "ulysses_attention", "ring_plan", "RingPlan", "SubCall", "PLAN_BLOCK", "shard",
           "unshard", "positions", "segments", "LAYOUTS", "MODES", "context_parallel", "ContextParallel",
           "shard_batch", "gather", "all_reduce_grads", "next_token_labels"]
