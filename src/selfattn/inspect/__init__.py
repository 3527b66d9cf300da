"""See the attention: exact weights from the fast kernel's LSE, streaming statistics, capture from models,
rollout, and pictures (PNG, self-contained HTML).

    from selfattn.inspect import capture
    cap = capture(model, {"input_ids": ids}, heads=[0, 5])   # exact weights of heads 0 and 5, stats for all
"""
from .capture import Capture, LayerCapture, capture
from .html import attention_html
from .render import head_grid_png, heatmap_png
from .rollout import rollout, rollout_from_capture
from .stats import HeadStats, head_stats
from .summary import format_summary, summarize
from .weights import attention_weights

__all__ = ["attention_weights", "head_stats", "HeadStats", "capture", "Capture", "LayerCapture", "rollout",
           "rollout_from_capture", "heatmap_png", "head_grid_png", "attention_html", "summarize",
           "format_summary"]
