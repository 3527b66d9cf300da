"""Shared timing and memory helpers for the benchmark scripts (they live in selfattn.app.measure so that the installed
``selfattn bench`` command can use them too): interleaved rounds + medians, FLOP counts, peak memory of one call
in a fresh subprocess.

    from _util import flops, interleaved_times, median, peak_memory, make_call
"""
from selfattn.app.measure import PATHS, flops, format_rows, interleaved_times, make_call, median, peak_memory  # noqa: F401

__all__ = ["PATHS", "flops", "format_rows", "interleaved_times", "make_call", "median", "peak_memory"]
