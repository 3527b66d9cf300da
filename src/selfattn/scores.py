"""Score modifiers: functions of a tile of scores and its indices, never an N×N tensor.

A modifier is called as ``mod(s, q_idx, k_idx)`` with ``s: (B, H, Tq, Tk)`` scores already scaled (fp32 for
half inputs, fp64 for fp64), ``q_idx: (Tq, 1)`` and ``k_idx: (1, Tk)`` int64 absolute positions, and returns the
modified scores, broadcastable to ``s``'s shape. The same call serves the reference kernel (one tile covering
everything) and the tiled kernels (one call per tile). It must be written in differentiable torch ops: the tiled
backward recomputes it per tile under autograd, so the gradient to ``s`` and to the tensors listed by
``parameters()`` (a learned table, say) is exact without any hand-written derivative.

Plain additive tensors are not modifiers: pass them as ``bias=`` (the kernels add them natively and reduce their
gradient over broadcast dimensions).
"""
from __future__ import annotations

from typing import Tuple

from torch import Tensor

__all__ = ["ScoreMod", "Compose", "compose"]


class ScoreMod:
    """Base class of score modifiers. Subclasses implement ``__call__`` and, if learned, ``parameters``."""

    def __call__(self, s: Tensor, q_idx: Tensor, k_idx: Tensor) -> Tensor:
        raise NotImplementedError

    def parameters(self) -> Tuple[Tensor, ...]:
        """Tensors the modifier reads that may require grad (gradients flow to them)."""
        return ()

    def __rshift__(self, other: "ScoreMod") -> "ScoreMod":
        """``a >> b`` applies a, then b."""
        return compose(self, other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Compose(ScoreMod):
    """Apply modifiers in order: ``Compose(a, b)(s) == b(a(s))``."""

    def __init__(self, *mods: ScoreMod):
        flat = []
        for m in mods:
            if not isinstance(m, ScoreMod):
                raise TypeError(f"compose: expected ScoreMod objects, got {type(m).__name__}")
            flat.extend(m.mods if isinstance(m, Compose) else [m])
        self.mods = tuple(flat)

    def __call__(self, s, q_idx, k_idx):
        for m in self.mods:
            s = m(s, q_idx, k_idx)
        return s

    def parameters(self):
        return tuple(p for m in self.mods for p in m.parameters())

    def __repr__(self):
        return " >> ".join(repr(m) for m in self.mods)


def compose(*mods: ScoreMod) -> ScoreMod:
    """Chain modifiers, applied left to right (e.g. ``compose(alibi(), softcap(30.0))``)."""
    return Compose(*mods)
