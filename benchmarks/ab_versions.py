"""A/B timing of the tiled (torch-op) kernel between two checkouts, interleaved in one run.

    python benchmarks/ab_versions.py OLD_SRC NEW_SRC [--rounds 5]

Each round runs one subprocess per checkout (alternating order) that times the same cases; the table prints the
median time per case and the ratio old/new (> 1: the new checkout is faster). Used to check that the kernel
contract refactor did not slow the tiled kernel down (benchmarks/NOTES.md).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = [  # (name, B, H, N, D, mask, backward)
    ("fwd 8x12x128x64", 8, 12, 128, 64, None, False),
    ("fwd 1x8x2048x64", 1, 8, 2048, 64, None, False),
    ("fwd causal 1x8x2048x64", 1, 8, 2048, 64, "causal", False),
    ("fwd+bwd 1x8x1024x64", 1, 8, 1024, 64, None, True),
    ("fwd+bwd causal 1x8x1024x64", 1, 8, 1024, 64, "causal", True),
    ("fwd window256 1x8x8192x64", 1, 8, 8192, 64, "window", False),
    ("fwd docs 1x8x4096x64", 1, 8, 4096, 64, "docs", False),
]

CHILD = r'''
import json, sys, time, torch
import selfattn
from selfattn import masks as M
torch.manual_seed(0)
res = {}
for name, B, H, N, D, mask, bwd in json.loads(sys.argv[1]):
    m = {None: None, "causal": M.causal(), "window": M.sliding_window(256) & M.causal(),
         "docs": M.document(M.document_ids([N // 8] * 8))}[mask]
    q, k, v = (torch.randn(B, H, N, D, requires_grad=bwd) for _ in range(3))
    def run():
        o = selfattn.attention(q, k, v, m, kernel="tiled")
        if bwd:
            o.sum().backward()
    run()
    ts = []
    for _ in range(3):
        t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
    res[name] = min(ts)
print(json.dumps(res))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    times = {"old": {}, "new": {}}
    for r in range(a.rounds):
        for tag in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = dict(os.environ, PYTHONPATH=getattr(a, tag), SELFATTN_NATIVE="0")
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            for k, v in json.loads(out.strip().splitlines()[-1]).items():
                times[tag].setdefault(k, []).append(v)
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads default, {a.rounds} interleaved rounds")
    print(f"| case | old (s) | new (s) | old/new |\n|---|---:|---:|---:|")
    for name, *_ in CASES:
        o, n = statistics.median(times["old"][name]), statistics.median(times["new"][name])
        print(f"| {name} | {o:.4f} | {n:.4f} | {o / n:.2f}x |")


if __name__ == "__main__":
    main()
