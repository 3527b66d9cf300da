"""Dropout on the attention weights: reproducible from a generator, identical in the reference and the tiled
kernel (pattern regenerated per tile from a counter-based hash, never stored), independent of the tiling,
the kept fraction right, gradients by the oracle rule.

Shape legend: B batch, Hq/Hkv heads, Nq queries, Nk keys, D head dim.
"""
import math

import pytest
import torch
from oracle import check_attention, dropout_seed

import selfattn
from selfattn import masks as M
from selfattn.kernels.common import dropout_keep

SMALL = dict(block_q=32, block_k=64)


def inputs(B=2, Hq=8, Hkv=2, Nq=113, Nk=203, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, D))
    return [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) for s in shapes]


def run(q, k, v, seed, p=0.3, kernel="tiled", **kw):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = selfattn.attention(q, k, v, dropout_p=p, generator=gen, kernel=kernel, **kw)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return out.detach(), grads


@pytest.mark.parametrize("kernel", ["reference", "tiled"])
def test_same_seed_same_output_and_gradients(kernel):
    q, k, v = inputs(Nq=113, Nk=113)
    out1, g1 = run(q, k, v, 7, kernel=kernel, mask=M.causal(), **SMALL)
    for _ in range(2):
        out2, g2 = run(q, k, v, 7, kernel=kernel, mask=M.causal(), **SMALL)
        assert torch.equal(out1, out2)
        assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    out3, g3 = run(q, k, v, 8, kernel=kernel, mask=M.causal(), **SMALL)
    assert not torch.equal(out1, out3) and not torch.equal(g1[0], g3[0])
    # without a generator the global RNG supplies the seed
    torch.manual_seed(123)
    a, _ = run(q, k, v, None, kernel=kernel)
    torch.manual_seed(123)
    b, _ = run(q, k, v, None, kernel=kernel)
    assert torch.equal(a, b)


def test_pattern_independent_of_tiling():
    """The backward regenerates the pattern tile by tile: any tiling gives the same function, forward and
    backward (float64, so only summation order differs)."""
    q, k, v = inputs(dtype=torch.float64)
    ref_out, ref_g = run(q, k, v, 3, kernel="reference", mask=M.sliding_window(60, 10))
    for bq, bk in ((32, 64), (17, 40), (128, 256)):
        out, g = run(q, k, v, 3, kernel="tiled", mask=M.sliding_window(60, 10), block_q=bq, block_k=bk)
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
        for a, b in zip(g, ref_g):
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("mask,bias,dtype,Nq,Nk,p", [
    (None, None, torch.float32, 113, 203, 0.3),
    (M.causal(), (1, 8, 1, 203), torch.float32, 203, 203, 0.1),
    (M.document(M.document_ids([50, 0, 63])), None, torch.float32, 113, 113, 0.5),
    (M.key_padding([0, 90]), None, torch.float32, 17, 113, 0.3),  # empty rows with dropout
    (M.sliding_window(30) & M.causal(), None, torch.float64, 203, 113, 0.2),
    (None, None, torch.bfloat16, 113, 17, 0.3),
], ids=["plain", "causal_bias", "documents", "padding_empty_rows", "window_fp64", "bf16"])
def test_dropout_oracle(mask, bias, dtype, Nq, Nk, p):
    """Reference (float64) and tiled give the same function for the same seed; gradients by the oracle rule."""
    check_attention(2, 8, 2, Nq, Nk, 16, dtype=dtype, mask=mask, bias=bias, dropout_p=p, seed=11, **SMALL)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.9])
def test_kept_fraction(p):
    """Over ~1e6 weights the kept fraction is 1 − p within 5 sigma, measured through the kernel itself: with
    q = 0 every weight is 1/Nk, and with v = 1 each output is (kept count) / (Nk (1 − p))."""
    B, H, Nq, Nk = 1, 4, 250, 1000
    q = torch.zeros(B, H, Nq, 8, dtype=torch.float64)
    k = torch.randn(B, H, Nk, 8, dtype=torch.float64)
    v = torch.ones(B, H, Nk, 1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(2024)
    out = selfattn.attention(q, k, v, dropout_p=p, generator=gen, kernel="tiled")
    kept_per_row = (out[..., 0] * Nk * (1 - p))  # (B, H, Nq)
    assert torch.allclose(kept_per_row, kept_per_row.round(), atol=1e-6)
    n = B * H * Nq * Nk
    frac = float(kept_per_row.sum()) / n
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac - (1 - p)) < 5 * sigma, f"kept {frac:.5f}, expected {1 - p} ± {5 * sigma:.5f}"
    # the counts are exactly those of the hash pattern the oracle uses
    keep = dropout_keep(dropout_seed(2024), p, torch.arange(B), torch.arange(H), torch.arange(Nq)[:, None],
                        torch.arange(Nk)[None, :])
    assert torch.equal(kept_per_row.round().long(), keep.sum(-1))


def test_pattern_has_no_visible_structure():
    """Rows, columns, heads and seeds decorrelated: agreement of two patterns is p² + (1 − p)² within 5 sigma."""
    p, Nq, Nk = 0.3, 256, 1024
    qi, ki = torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]
    keep = dropout_keep(12345, p, torch.arange(2), torch.arange(2), qi, ki)  # (2, 2, Nq, Nk)
    other_seed = dropout_keep(12346, p, torch.arange(2), torch.arange(2), qi, ki)
    expected = p * p + (1 - p) * (1 - p)
    pairs = {
        "next row": (keep[..., 1:, :], keep[..., :-1, :]),
        "next column": (keep[..., 1:], keep[..., :-1]),
        "next head": (keep[:, 1], keep[:, 0]),
        "next batch": (keep[1], keep[0]),
        "next seed": (keep, other_seed),
    }
    for name, (a, b) in pairs.items():
        n = a.numel()
        agree = float((a == b).double().mean())
        sigma = math.sqrt(expected * (1 - expected) / n)
        assert abs(agree - expected) < 5 * sigma, f"{name}: agreement {agree:.4f}, expected {expected:.4f}"


def test_dropout_expectation_is_attention():
    """Inverted dropout is unbiased: averaged over many patterns, the output approaches the dropout-free one.
    400 copies of one problem in one batch draw 400 independent patterns (the hash sees the batch row)."""
    q, k, v = (t.detach() for t in inputs(B=1, Hq=2, Hkv=1, Nq=8, Nk=64, dtype=torch.float64))
    n = 400
    base = selfattn.attention(q, k, v, kernel="tiled", block_q=8, block_k=16)
    gen = torch.Generator().manual_seed(0)
    runs = selfattn.attention(q.expand(n, -1, -1, -1).contiguous(), k.expand(n, -1, -1, -1).contiguous(),
                              v.expand(n, -1, -1, -1).contiguous(), dropout_p=0.5, generator=gen, kernel="tiled",
                              block_q=8, block_k=16)  # (n, 2, 8, 16)
    se = runs.std(0) / math.sqrt(n)  # standard error of the mean, per entry
    z = ((runs.mean(0) - base[0]).abs() / se).max()
    assert z < 5.5  # the largest |z| of 256 entries; fixed seeds, so this is deterministic
