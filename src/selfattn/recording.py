"""The capture contract the inspect tools read: ``record_attention(callback)`` makes every attention call of a
selfattn layer (or of a Hugging Face model through the transformers backend) hand an ``AttentionRecord`` to the
callback. ``emit`` is the one place a record reaches the recorders; ``active`` tells a caller whether to ask the
kernel for the LSE at all (with no recorder open nothing is computed or stored).

Callers: ``selfattn.nn`` (Attention, MultiheadAttention) and ``selfattn.integrations.transformers``.

Shape legend: B batch, Hq query heads, Hkv key/value heads, Nq queries, Nk keys, D q/k head dim, Dv value head dim.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional

from torch import Tensor, nn

from . import masks as _masks
from .scores import ScoreMod

__all__ = ["AttentionRecord", "record_attention", "emit", "active"]


@dataclass
class AttentionRecord:
    """One attention call as the kernel saw it.

    module: the Attention / MultiheadAttention instance (or the HF attention module). q: (B, Hq, Nq, D) exactly as
    passed to the kernel (after RoPE); k: (B, Hkv, Nk, D); v: (B, Hkv, Nk, Dv). mask: a ``selfattn.masks`` object
    or None (bool tensors are converted with ``masks.from_tensor``). bias: additive float tensor or None.
    score_mod: ``ScoreMod`` or None. scale: the float the scores were multiplied by. lse: (B, Hq, Nq) natural-log
    log-sum-exp of each row. The tensors are the live ones (not detached, not copied): a callback that keeps them
    should detach/clone."""
    module: nn.Module
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Optional[_masks.Mask]
    bias: Optional[Tensor]
    score_mod: Optional[ScoreMod]
    scale: float
    lse: Tensor


# A stack per thread: a recorder sees the attention calls made by the thread that opened it, not the calls other
# threads (a data loader, a server's other requests) make at the same time.
_local = threading.local()


def _stack() -> List[Callable[[AttentionRecord], None]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def active() -> bool:
    """True when this thread has a recorder open: the caller should then get the LSE and ``emit`` a record."""
    return bool(getattr(_local, "stack", None))


def emit(record: AttentionRecord) -> None:
    """Hand ``record`` to every recorder open in this thread, outermost first."""
    for cb in list(_stack()):  # a copy: a callback may open or close recorders
        cb(record)


@contextlib.contextmanager
def record_attention(callback: Callable[[AttentionRecord], None]) -> Iterator[None]:
    """While active, every Attention / MultiheadAttention forward (and every attention of a model running on the
    transformers backend) also asks the kernel for the LSE and calls ``callback(record)``. Recorders nest (every
    active one is called, outermost first) and see only the calls of the thread that opened them.
    With no recorder active nothing is computed or stored."""
    if not callable(callback):
        raise TypeError(f"callback: expected a callable taking an AttentionRecord, got {type(callback).__name__}")
    stack = _stack()
    stack.append(callback)
    try:
        yield
    finally:
        # remove this exact entry (identity), even if recorders were closed out of order
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is callback:
                del stack[i]
                break
