"""See the attention: exact weights from the fast kernel's LSE, streaming statistics, capture from models,
rollout, and pictures (PNG, self-contained HTML)."""
from .stats import HeadStats, head_stats
from .weights import attention_weights

__all__ = ["attention_weights", "head_stats", "HeadStats"]
