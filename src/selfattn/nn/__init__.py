"""Attention layers on ``selfattn.attention``, one module per job:

* ``attention.py``: ``Attention``, the one layer every model uses (fused or separate projections, GQA/MQA, RoPE,
  KV cache, cross-attention), and ``SequenceParallel``, the strategy context parallelism installs on it;
* ``mha.py``: ``MultiheadAttention``, a drop-in ``torch.nn.MultiheadAttention``;
* ``rope.py``: rotary position embedding; ``cache.py``: ``KVCache``;
* ``record_attention`` / ``AttentionRecord`` come from ``selfattn.recording`` (re-exported here: the inspect
  tools read them).

nn imports nothing above it (no models, no distributed): ``selfattn.distributed`` reaches the layers through
``Attention.parallel``.
"""
from ..recording import AttentionRecord, record_attention
from .attention import Attention, SequenceParallel
from .cache import KVCache
from .mha import MultiheadAttention
from .rope import apply_rope, rope_inv_freq

__all__ = ["Attention", "MultiheadAttention", "KVCache", "SequenceParallel", "AttentionRecord", "record_attention",
           "apply_rope", "rope_inv_freq"]
