"""The native kernel against torch SDPA in the same run: interleaved rounds, medians, ratios (>1 = native faster).

    .venv/bin/python benchmarks/bench_native.py --threads 2          # the issue-10 matrix, fp32 + bf16 + decode
    .venv/bin/python benchmarks/bench_native.py --threads 1 --quick  # fewer shapes and rounds

Prints the CPU, the ISA the native kernel runs, the load average before and after, the GEMM ceiling (faster of
torch.mm and numpy matmul at 2048², fp32) and, per case, times, ratio to SDPA and GFLOP/s (fwd 4·B·H·Nq·Nk·D,
halved causal; fwd+bwd 3.5x). Decode: 1 query token vs a 32k cache, 32 q / 8 kv heads, D=128, as a fraction of
the same-run copy bandwidth (bytes of K and V read once).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np
import torch
import torch.nn.functional as F

import selfattn
from selfattn import masks
from selfattn.app.measure import flops, interleaved_times, median
from selfattn.kernels import native

SHAPES = [(64, 12, 32, 32), (8, 12, 128, 64), (4, 12, 512, 64), (1, 8, 1024, 64), (1, 8, 4096, 64),
          (1, 8, 2048, 128)]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def gemm_ceiling(repeats: int) -> float:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    an, bn = a.numpy(), b.numpy()
    t = interleaved_times({"torch": lambda: torch.mm(a, b), "numpy": lambda: an @ bn}, repeats)
    return max(2 * n ** 3 / median(v) for v in t.values()) / 1e9


def bench_case(B, H, N, D, causal, backward, dtype, repeats):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(dtype).requires_grad_(backward) for _ in range(3))
    m = masks.causal() if causal else None
    dout = torch.randn(B, H, N, D, generator=g).to(dtype)

    def nat():
        o = selfattn.attention(q, k, v, m, kernel="native")
        if backward:
            torch.autograd.grad(o, (q, k, v), dout)

    def sdpa():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            torch.autograd.grad(o, (q, k, v), dout)

    with torch.set_grad_enabled(backward):
        t = interleaved_times({"native": nat, "sdpa": sdpa}, repeats)
    tn, ts = median(t["native"]), median(t["sdpa"])
    return tn, ts, flops(B, H, N, N, D, causal, backward) / tn / 1e9


def bench_decode(repeats):
    B, Hq, Hkv, Nk, D = 1, 32, 8, 32768, 128
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, 1, D, generator=g)
    k, v = torch.randn(B, Hkv, Nk, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g)
    dst_k, dst_v = torch.empty_like(k), torch.empty_like(v)
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)

    def copy():
        dst_k.copy_(k)
        dst_v.copy_(v)

    t = interleaved_times({
        "native": lambda: selfattn.attention(q, k, v, kernel="native"),
        "sdpa": lambda: F.scaled_dot_product_attention(q, kr, vr),
        "copy": copy,
    }, repeats)
    nbytes = 2 * k.numel() * 4
    tn, ts, tc = (median(t[n]) for n in ("native", "sdpa", "copy"))
    copy_bw = 2 * nbytes / tc  # a copy reads and writes every byte
    return tn, ts, nbytes / tn / 1e9, copy_bw / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    la0 = os.getloadavg()
    print(f"cpu: {cpu_model()}, threads {args.threads}, native isa {native.isa()}, torch {torch.__version__}, "
          f"load {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}")
    if native.why_not(selfattn.functional.prepare(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8),
                                                  torch.zeros(1, 1, 1, 8), kernel="tiled")[0]):
        raise SystemExit(f"native kernel unavailable: {native._load_error or native._disabled()}")
    rep = 3 if args.quick else args.repeats
    ceil = gemm_ceiling(rep)
    print(f"GEMM ceiling (best of torch.mm / numpy, 2048², fp32): {ceil:.1f} GFLOP/s")
    shapes = SHAPES[1:5:2] if args.quick else SHAPES
    print(f"{'B,H,N,D':>16} {'case':>18} {'native ms':>10} {'sdpa ms':>10} {'ratio':>6} {'GFLOP/s':>8}")
    for dtype, cases in ((torch.float32, [(c, b) for b in (False, True) for c in (False, True)]),
                         (torch.bfloat16, [(False, False), (True, False)])):
        for shape in shapes:
            for causal, backward in cases:
                tn, ts, gf = bench_case(*shape, causal, backward, dtype, rep)
                name = f"{str(dtype)[6:]} {'causal' if causal else 'full'} {'fwd+bwd' if backward else 'fwd'}"
                extra = f" ({gf / ceil:.0%} of GEMM)" if shape == (1, 8, 4096, 64) and dtype == torch.float32 \
                    and not causal else ""
                print(f"{str(shape):>16} {name:>18} {tn * 1e3:10.2f} {ts * 1e3:10.2f} {ts / tn:6.2f} {gf:8.1f}{extra}",
                      flush=True)
    tn, ts, bw, cbw = bench_decode(rep)
    print(f"decode 1 x 32k, 32q/8kv, D=128 fp32: native {tn * 1e3:.2f} ms, sdpa {ts * 1e3:.2f} ms "
          f"({ts / tn:.2f}x), {bw:.1f} GB/s = {bw / cbw:.0%} of copy bandwidth {cbw:.1f} GB/s")
    la1 = os.getloadavg()
    print(f"load after: {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}")


if __name__ == "__main__":
    main()
