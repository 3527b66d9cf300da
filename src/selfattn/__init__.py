"""selfattn: exact self-attention from the low level, in Python on PyTorch.

    import selfattn
    out = selfattn.attention(q, k, v, mask=selfattn.masks.causal())
"""
from . import masks, scores
from . import nn, models  # layers (Attention, MultiheadAttention, KVCache) and model families
from .functional import KERNELS, Plan, attention, plan

__version__ = "0.1.0"
__all__ = ["attention", "plan", "Plan", "KERNELS", "masks", "scores", "nn", "models", "__version__"]
