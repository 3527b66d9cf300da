"""The README's first command (until `selfattn explain` takes over): attention with each kernel, checked against
each other, then a quick timing table against torch's SDPA."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import selfattn


def _median_time(fn, reps: int = 3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    torch.manual_seed(0)
    B, H, N, D = 1, 8, 1024, 64
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    print(f"selfattn {selfattn.__version__}: B={B} H={H} N={N} D={D} float32")
    for mask_name, mask in (("none", None), ("causal", selfattn.masks.causal())):
        ref = selfattn.attention(q.double(), k.double(), v.double(), mask, kernel="reference")
        for kernel in selfattn.KERNELS:
            out = selfattn.attention(q, k, v, mask, kernel=kernel)
            err = (out.double() - ref).abs().max().item()
            print(f"  mask={mask_name:7s} kernel={kernel:10s} max |err| vs float64 reference = {err:.2e}")
    print("\nforward time, median of 3 (lower is better)")
    print(f"{'mask':8s} {'N':>6s} {'sdpa ms':>9s} {'tiled ms':>9s} {'sdpa/tiled':>10s}")
    for N in (1024, 2048):
        q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
        for causal in (False, True):
            m = selfattn.masks.causal() if causal else None
            t_sdpa = _median_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
            t_ours = _median_time(lambda: selfattn.attention(q, k, v, m, kernel="tiled"))
            print(f"{'causal' if causal else 'none':8s} {N:6d} {t_sdpa * 1e3:9.1f} {t_ours * 1e3:9.1f} "
                  f"{t_sdpa / t_ours:10.2f}")


if __name__ == "__main__":
    main()
