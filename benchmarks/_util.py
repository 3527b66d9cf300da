"""Shared timing and memory helpers for the benchmark scripts (they live in selfattn.app.measure so that the installed
``selfattn bench`` command can use them too): interleaved rounds + medians, FLOP counts, peak memory of one call
in a fresh subprocess.

    from _util import flops, interleaved_times, median, peak_memory, make_call
"""
from selfattn.app.measure import PATHS, flops, format_rows, interleaved_times, make_call, median, peak_memory  # noqa: F401

__all__ = ["PATHS", "flops", "format_rows", "interleaved_times", "make_call", "median", "peak_memory"]


def gpt2_small():
    """GPT-2-small's shape with random weights: (transformers' GPT2LMHeadModel, the same weights loaded by
    selfattn.models.load, a 16-token prompt) -- the pair bench_models.py and bench_e2e.py time."""
    import tempfile

    import torch
    import transformers

    import selfattn
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024,
                                  bos_token_id=50256, eos_token_id=50256)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        ours = selfattn.models.load(d)
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    return ref, ours, ids
