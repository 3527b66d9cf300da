"""Capture attention from any model built on selfattn's layers: per layer and head, exact weights for the heads
and query rows asked for, and streaming statistics for every row.

    cap = capture(model, {"input_ids": ids}, heads=[0, 3], rows=None, special=[0, n - 1])
    cap.layers[2].weights        # (B, 2, Nq, Nk): heads 0 and 3 of the third attention call, every row
    cap.layers[2].stats.table()  # per-head entropy, distance, max weight, special-token weight (all heads)

Runs the model once under ``selfattn.recording.record_attention``: every attention call hands over q, k and the kernel's
LSE, and the weights/statistics are computed right there, one call at a time, so the model's q/k tensors are never
all kept. Memory: one layer's q/k (the model holds them anyway) + the weights asked for + O(Hq·Nq·topk) statistics.

Shape legend: B batch, Hq query heads, Hkv key/value heads, Nq queries, Nk keys, h selected heads, r selected rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

from ..kernels.reference import max_bytes
from ..recording import AttentionRecord, record_attention
from .stats import HeadStats, head_stats
from .weights import Index, as_index, attention_weights

__all__ = ["capture", "Capture", "LayerCapture", "MEAN_HEADS_MAX_TOKENS"]

# Averaging every head's full N×N (for rollout and the HTML overview) holds B·Nq·Nk floats per layer: fine for the
# short texts rollout is meant for, refused beyond this many keys so a long input never allocates N² by surprise.
MEAN_HEADS_MAX_TOKENS = 4096


@dataclass
class LayerCapture:
    """One attention call (one layer, or one self/cross-attention block of a layer)."""
    index: int  # order of the call within the forward pass
    name: str  # the attention module's path in the model, e.g. "layers.3.attn"
    Hq: int
    Hkv: int
    Nq: int
    Nk: int
    heads: Tensor  # (h,) the heads whose weights were kept
    rows: Tensor  # (r,) the query rows whose weights were kept
    weights: Tensor  # (B, h, r, Nk) exact weights, float32 (float64 for float64 models)
    stats: HeadStats  # every head, every row
    head_mean: Optional[Tensor] = None  # (B, Nq, Nk) mean of all heads' weights, when asked for (rollout)


@dataclass
class Capture:
    """What ``capture`` returns: the model's own output and one ``LayerCapture`` per attention call, in order."""
    output: Any
    layers: List[LayerCapture] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def head_table(self) -> List[dict]:
        """Per-head statistics of every layer: dicts with layer, name, head, entropy, distance, max_weight, special."""
        return [{"layer": lc.index, "name": lc.name, **row} for lc in self.layers for row in lc.stats.table()]


def _call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def capture(model: nn.Module, inputs, *, heads: Index = None, rows: Index = None, special=None, topk: int = 5,
            mean_heads: bool = False, block_k: int = 512) -> Capture:
    """Run ``model`` on ``inputs`` (a tensor, a tuple of positional arguments, or a dict of keyword arguments)
    without gradients and capture every selfattn attention call.

    heads, rows: which weights to keep for every call (None = all; an int, slice, list; ``[]`` keeps none).
        The statistics always cover every head and row. Raises ValueError if a selection is out of range for a
        call (say heads=[11] on a 4-head layer).
    special: key positions (or a bool (Nk,) / (B, Nk) tensor) of special tokens, for the special-token weight;
        ignored for calls whose Nk differs (cross-attention to another sequence).
    mean_heads: also keep the mean over all heads of the full weights (B, Nq, Nk) per call (rollout, overview);
        refused when Nk > MEAN_HEADS_MAX_TOKENS.
    The weights kept over all calls are limited to SELFATTN_REFERENCE_MAX_BYTES (4 GiB by default): beyond it a
    ValueError asks for fewer heads/rows instead of exhausting memory. Weights are the softmax before dropout
    (models loaded by selfattn.models are in eval mode, where there is none).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module built on selfattn layers, got {type(model).__name__}")
    names = {id(m): n for n, m in model.named_modules()}
    out = Capture(output=None)
    kept = [0]  # bytes of weights kept so far, over all calls

    def on_record(rec: AttentionRecord) -> None:
        q, k, lse = rec.q.detach(), rec.k.detach(), rec.lse.detach()
        B, Hq, Nq, _ = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        bias_t = rec.bias.detach() if rec.bias is not None else None
        bias = [b for b in (bias_t, rec.score_mod) if b is not None] or None  # attention()'s bias= convention
        sp = special
        if sp is not None and not isinstance(sp, Tensor) and Nk != Nq:
            sp = None  # positions given for the input sequence do not index another sequence's keys
        if isinstance(sp, Tensor) and sp.shape[-1] != Nk:
            sp = None
        h_idx, r_idx = as_index("heads", heads, Hq, q.device), as_index("rows", rows, Nq, q.device)
        kept[0] += B * h_idx.numel() * r_idx.numel() * Nk * (8 if q.dtype == torch.float64 else 4)
        if kept[0] > max_bytes():
            raise ValueError(f"heads, rows: keeping these weights for every attention call needs more than "
                             f"{max_bytes() / 2**30:.1f} GiB (SELFATTN_REFERENCE_MAX_BYTES) by call "
                             f"{len(out.layers)} (Nq={Nq}, Nk={Nk}); pass fewer heads= / rows= (heads=[] keeps only "
                             f"the statistics, which cover every row)")
        w = attention_weights(q, k, lse, rec.mask, bias=bias, scale=rec.scale, heads=h_idx, rows=r_idx,
                              block_k=block_k)
        st = head_stats(q, k, lse, rec.mask, bias=bias, scale=rec.scale, special=sp, topk=topk, block_k=block_k)
        mean = None
        if mean_heads:
            if Nk > MEAN_HEADS_MAX_TOKENS:
                raise ValueError(f"mean_heads: a call has Nk={Nk} keys, above MEAN_HEADS_MAX_TOKENS="
                                 f"{MEAN_HEADS_MAX_TOKENS}; rollout and the head mean are for short inputs")
            mean = torch.zeros(B, Nq, Nk, dtype=w.dtype, device=q.device)
            for h in range(Hq):  # one head at a time: B·Nq·Nk memory, not Hq times that
                mean += attention_weights(q, k, lse, rec.mask, bias=bias, scale=rec.scale, heads=[h],
                                          block_k=block_k)[:, 0]
            mean /= Hq
        out.layers.append(LayerCapture(len(out.layers), names.get(id(rec.module), type(rec.module).__name__),
                                       Hq, Hkv, Nq, Nk, h_idx, r_idx, w, st, mean))

    with torch.no_grad(), record_attention(on_record):
        out.output = _call(model, inputs)
    return out
