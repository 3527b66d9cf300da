"""Core benchmark: selfattn's tiled kernel vs torch SDPA vs a plain materialized implementation (and the reference
kernel), forward and forward+backward, non-causal and causal, float32, in ONE run; GFLOP/s, ratio to SDPA from the
same run, peak extra memory per path measured in fresh subprocesses.

    python benchmarks/bench_core.py                 # N = 1024..8192, B=1 H=8 D=64, 5 rounds, memory
    python benchmarks/bench_core.py --quick         # a few seconds (what `selfattn bench --quick` runs)
    python benchmarks/bench_core.py --markdown      # the README table
    python benchmarks/bench_core.py --memory-target # fwd+bwd peak extra memory at N=32768, H=1, D=64

Method and history: benchmarks/NOTES.md. Never used by tests (timings are not asserted anywhere).
"""
import argparse
import sys

from selfattn.app.measure import _main, peak_memory


def memory_target(N: int = 32768, H: int = 1, D: int = 64) -> int:
    """Peak extra memory of forward+backward at long N, tiled and SDPA; the materialized path at N/4 (its scores
    alone are B·H·N²·4 bytes = 4 GiB at N=32768, times the softmax and autograd copies)."""
    print(f"# forward+backward peak extra memory (ru_maxrss - RSS before the call, fresh subprocess), "
          f"B=1 H={H} D={D} float32; inputs q, k, v, dO not counted")
    print(f"{'path':>10s} {'mask':>7s} {'N':>7s} {'MiB':>9s}")
    for causal in (False, True):
        for path, n in (("tiled", N), ("sdpa", N), ("plain", N // 4)):
            m = peak_memory(path, 1, H, n, D, causal, True)
            val = f"{m['extra'] / 2**20:9.1f}" if m else "   failed"
            hidden = m["hidden"] if m else 0
            note = f"  (earlier peak {hidden / 2**20:.1f} MiB above the baseline)" if hidden > 2**20 else ""
            print(f"{path:>10s} {'causal' if causal else 'none':>7s} {n:>7d} {val}{note}", flush=True)
    return 0


if __name__ == "__main__":
    if "--memory-target" in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument("--memory-target", action="store_true")
        ap.add_argument("--n", type=int, default=32768)
        a = ap.parse_args()
        sys.exit(memory_target(a.n))
    sys.exit(_main())
