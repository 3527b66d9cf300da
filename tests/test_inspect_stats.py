"""Streaming per-head statistics: equal to a dense computation on small inputs; bounded memory at 16k tokens."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import selfattn
from selfattn import masks, scores
from selfattn.inspect import head_stats
from selfattn.kernels.reference import attention_reference


def _dense_stats(w, Nq, Nk, special, k):
    """The same statistics from full (B, H, Nq, Nk) float64 weights."""
    i = torch.arange(Nq, dtype=w.dtype)[:, None] + (Nk - Nq)
    j = torch.arange(Nk, dtype=w.dtype)[None, :]
    logw = torch.where(w > 0, w.log(), torch.zeros_like(w))
    ent = -(w * logw).sum(-1)
    dist = (w * (i - j).abs()).sum(-1)
    spw = w[..., special].sum(-1)
    tw, ti = torch.topk(w, k, dim=-1)
    return ent, dist, spw, tw, ti


@pytest.mark.parametrize("B,Hq,Hkv,Nq,Nk,mask", [(2, 4, 2, 37, 37, None), (1, 4, 1, 45, 300, "causal"),
                                                 (1, 2, 2, 300, 45, "causal"), (2, 4, 2, 50, 50, "padding+alibi")])
def test_stats_match_dense(B, Hq, Hkv, Nq, Nk, mask):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Hq, Nq, 16, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, Nk, 16, generator=g, dtype=torch.float64)
    m, bias, mod = (masks.causal() if mask else None), None, None
    if mask == "padding+alibi":  # a per-batch mask, an additive tensor and a per-head modifier together
        m = masks.key_padding(torch.tensor([Nk, Nk - 9]))
        bias = torch.randn(B, 1, 1, Nk, generator=g, dtype=torch.float64)
        mod = scores.alibi(symmetric=True)  # slopes come from the head count: every head must be computed
    bias_arg = [b for b in (bias, mod) if b is not None] or None
    _, lse = selfattn.attention(q, k, k, m, bias=bias_arg, kernel="tiled", return_lse=True)
    special = [0, Nk - 1]
    st = head_stats(q, k, lse, m, bias=bias_arg, special=special, topk=3, block_q=16, block_k=32)
    w = attention_reference(q, k, k, mask=m, bias=bias, score_mod=mod, scale=0.25, return_weights=True)[-1]
    ent, dist, spw, tw, ti = _dense_stats(w, Nq, Nk, special, 3)
    torch.testing.assert_close(st.entropy, ent, atol=1e-10, rtol=0)
    torch.testing.assert_close(st.distance, dist, atol=1e-9, rtol=0)
    torch.testing.assert_close(st.special, spw, atol=1e-10, rtol=0)
    torch.testing.assert_close(st.top_weight, tw, atol=1e-12, rtol=0)
    # indices agree wherever the weights are not tied (tied → either index is right)
    # (−1 pads rows that see fewer than k keys, with weight 0)
    got = torch.where(st.top_index < 0, torch.zeros_like(tw), torch.gather(w, -1, st.top_index.clamp(min=0)))
    same = (st.top_index == ti) | (tw == got)
    assert bool(same.all()) and bool((st.top_weight[st.top_index < 0] == 0).all())
    valid = torch.isfinite(lse)
    assert torch.equal(st.valid, valid)
    # per-head aggregates are the mean over valid rows
    expect = torch.where(valid, ent, torch.zeros_like(ent)).sum((0, 2)) / valid.sum((0, 2))
    torch.testing.assert_close(st.head_entropy, expect)
    rows = st.table()
    assert len(rows) == Hq and set(rows[0]) == {"head", "entropy", "distance", "max_weight", "special"}


def test_stats_uniform_and_one_hot():
    # q = 0: uniform over N keys -> entropy log N; a huge score on one key -> entropy ~0, all weight there
    N = 50
    q = torch.zeros(1, 1, N, 8, dtype=torch.float64)
    k = torch.randn(1, 1, N, 8, dtype=torch.float64)
    _, lse = selfattn.attention(q, k, k, return_lse=True)
    st = head_stats(q, k, lse)
    torch.testing.assert_close(st.entropy, torch.full((1, 1, N), math.log(N), dtype=torch.float64))
    q2 = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    q2[..., 0] = 1e3
    k2 = torch.zeros(1, 1, N, 8, dtype=torch.float64)
    k2[0, 0, 7, 0] = 1.0
    _, lse2 = selfattn.attention(q2, k2, k2, return_lse=True)
    st2 = head_stats(q2, k2, lse2, special=[7])
    assert st2.entropy.item() < 1e-9 and st2.top_index[0, 0, 0, 0].item() == 7
    assert abs(st2.special.item() - 1) < 1e-12
    assert abs(st2.distance.item() - (N - 1 - 7)) < 1e-9  # the one query sits at key position N - 1


_BIG = textwrap.dedent("""
    import resource, torch, selfattn
    from selfattn.inspect import head_stats
    torch.manual_seed(0)
    N, H, D = 16384, 2, 8
    q, k = torch.randn(1, H, N, D), torch.randn(1, H, N, D)
    m = selfattn.masks.sliding_window(300)  # local attention keeps the test fast: ~3 of 32 key tiles per row
    _, lse = selfattn.attention(q, k, k, m, kernel="tiled", return_lse=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    st = head_stats(q, k, lse, m, special=[0], topk=4)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # causal: the first row sees only key 0
    assert st.top_index[0, 0, 0, 0].item() == 0 and abs(st.top_weight[0, 0, 0, 0].item() - 1) < 1e-6
    assert bool(torch.isfinite(st.entropy).all()) and st.valid.all()
    print((after - before) * 1024, H * N * N * 4)
""")


def test_stats_16k_tokens_bounded_memory():
    """16,384 tokens: the dense weights would take 2 GiB; the streaming pass must stay within a few tiles."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: spinning OpenMP workers crawl on a busy machine
    res = subprocess.run([sys.executable, "-c", _BIG], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    grew, dense = (int(x) for x in res.stdout.split())
    # peak resident memory grew by less than 1/16 of the dense (H, N, N) weights
    assert grew < dense / 16, f"peak RSS grew by {grew / 2**20:.0f} MiB; dense weights are {dense / 2**20:.0f} MiB"
