"""Per-call cost of selfattn.attention against torch's scaled_dot_product_attention on small calls (issue 19.3),
same process, same thread count, interleaved rounds; the median of each. Prints µs per call and the ratio
(selfattn / SDPA: targets <= 1.5x for the small calls, <= 1.0x for the short shapes of bench_native's matrix).

    OMP_NUM_THREADS=1 python benchmarks/bench_percall.py [--rounds 7] [--calls 300] [--cpu-time] [--no-short]

--cpu-time times with the process's CPU clock instead of the wall clock: steadier on a machine other processes
load (one thread: the two agree on an idle machine).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import selfattn
from selfattn import masks


def _time(fn, calls, clock=time.perf_counter):
    fn()
    t = clock()
    for _ in range(calls):
        fn()
    return (clock() - t) / calls * 1e6


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


def short_cases():
    """bench_native's short shapes, causal and not, forward and forward + backward (target >= 1.0x SDPA)."""
    g = torch.Generator().manual_seed(0)
    for B, H, N, D in ((64, 12, 32, 32), (8, 12, 128, 64)):
        for backward in (False, True):
            q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_(backward) for _ in range(3))
            dout = torch.randn(B, H, N, D, generator=g)
            for causal in (False, True):
                m = masks.causal() if causal else None

                def ours(q=q, k=k, v=v, m=m, backward=backward, dout=dout):
                    with torch.set_grad_enabled(backward):
                        o = selfattn.attention(q, k, v, m)
                        if backward:
                            torch.autograd.grad(o, (q, k, v), dout)

                def sdpa(q=q, k=k, v=v, causal=causal, backward=backward, dout=dout):
                    with torch.set_grad_enabled(backward):
                        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                        if backward:
                            torch.autograd.grad(o, (q, k, v), dout)

                yield (f"({B}, {H}, {N}, {D}) {'causal' if causal else 'full'} {'fwd+bwd' if backward else 'fwd'}",
                       ours, sdpa)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock")
    ap.add_argument("--no-short", action="store_true", help="skip the short shapes of the matrix")
    a = ap.parse_args()
    clock = time.process_time if a.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel: "
          f"{selfattn.plan(1, 8, 16, 16, 64, mask=masks.causal()).kernel}")
    groups = [(cases(), a.calls)] + ([] if a.no_short else [(short_cases(), max(1, a.calls // 10))])  # short: ms
    for name, ours, sdpa, calls in ((*c, n) for grp, n in groups for c in grp):
        t_ours, t_sdpa = [], []
        for _ in range(a.rounds):
            t_ours.append(_time(ours, calls, clock))
            t_sdpa.append(_time(sdpa, calls, clock))
        mo, ms = statistics.median(t_ours), statistics.median(t_sdpa)
        print(f"{name:42s} selfattn {mo:8.1f} µs   sdpa {ms:8.1f} µs   ratio {mo / ms:5.2f}x")


if __name__ == "__main__":
    main()
