"""Per-call cost of selfattn.attention against torch's scaled_dot_product_attention on small calls (issue 19.3),
same process, same thread count, interleaved rounds; the median of each. Prints µs per call and the ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_percall.py [--rounds 7] [--calls 300]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import selfattn
from selfattn import masks


def _time(fn, calls):
    fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def cases():
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g)

    q, k, v = rnd(1, 1, 1, 64), rnd(1, 1, 64, 64), rnd(1, 1, 64, 64)
    yield "1 query x 64 keys, no mask", (lambda: selfattn.attention(q, k, v)), \
        (lambda: F.scaled_dot_product_attention(q, k, v))
    q2, k2, v2 = rnd(1, 8, 16, 64), rnd(1, 8, 16, 64), rnd(1, 8, 16, 64)
    c = masks.causal()
    yield "(1, 8, 16, 64) causal", (lambda: selfattn.attention(q2, k2, v2, c)), \
        (lambda: F.scaled_dot_product_attention(q2, k2, v2, is_causal=True))
    cw = masks.causal() & masks.sliding_window(8)
    band = torch.ones(16, 16, dtype=torch.bool).tril() & ~torch.ones(16, 16, dtype=torch.bool).tril(-9)
    yield "(1, 8, 16, 64) causal & window 8", (lambda: selfattn.attention(q2, k2, v2, cw)), \
        (lambda: F.scaled_dot_product_attention(q2, k2, v2, attn_mask=band))
    q3, k3, v3 = rnd(1, 32, 1, 128), rnd(1, 8, 300, 128), rnd(1, 8, 300, 128)
    yield "decode GQA 32/8 D=128, 300 keys, causal", (lambda: selfattn.attention(q3, k3, v3, c)), \
        (lambda: F.scaled_dot_product_attention(q3, k3, v3, enable_gqa=True))
    qg, kg, vg = (rnd(1, 8, 32, 64).requires_grad_() for _ in range(3))

    def ours_bwd():
        selfattn.attention(qg, kg, vg, c).sum().backward()

    def sdpa_bwd():
        F.scaled_dot_product_attention(qg, kg, vg, is_causal=True).sum().backward()

    yield "(1, 8, 32, 64) causal fwd+bwd", ours_bwd, sdpa_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel: "
          f"{selfattn.plan(1, 8, 16, 16, 64, mask=masks.causal()).kernel}")
    for name, ours, sdpa in cases():
        t_ours, t_sdpa = [], []
        for _ in range(a.rounds):
            t_ours.append(_time(ours, a.calls))
            t_sdpa.append(_time(sdpa, a.calls))
        mo, ms = statistics.median(t_ours), statistics.median(t_sdpa)
        print(f"{name:42s} selfattn {mo:8.1f} µs   sdpa {ms:8.1f} µs   ratio {mo / ms:5.2f}x")


if __name__ == "__main__":
    main()
