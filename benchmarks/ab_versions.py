"""A/B timing of one kernel (or the automatic choice) between two checkouts, interleaved in one run.

    python benchmarks/ab_versions.py OLD_SRC NEW_SRC [--rounds 5] [--kernel tiled|native|auto] [--small]

--kernel auto: selfattn's automatic choice (the native kernel where built) -- with SELFATTN_NATIVE left as the
environment has it; tiled forces the torch-op kernel with the native kernel switched off (the default, as in
session 2). --small adds the per-call cases (a few queries, where the Python around the kernel is the cost):
each is timed as the median of 200 calls.

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
SMALL = [  # per-call cost: (name, B, H, Nq, Nk, D, mask, backward)
    ("small 1q x 64k", 1, 1, 1, 64, 64, None, False),
    ("small 1x8x16x64 causal", 1, 8, 16, 16, 64, "causal", False),
    ("small 1x8x16x64 causal&window", 1, 8, 16, 16, 64, "window", False),
    ("small 1x8x32x64 causal fwd+bwd", 1, 8, 32, 32, 64, "causal", True),
]

CHILD = r'''
import json, sys, time, torch
import selfattn
from selfattn import masks as M
torch.manual_seed(0)
res = {}
kernel = None if sys.argv[2] == "auto" else sys.argv[2]
for name, B, H, Nq, Nk, D, mask, bwd in json.loads(sys.argv[1]):
    m = {None: None, "causal": M.causal(), "window": M.sliding_window(256) & M.causal(),
         "docs": M.document(M.document_ids([Nk // 8] * 8))}[mask]
    q = torch.randn(B, H, Nq, D, requires_grad=bwd)
    k, v = (torch.randn(B, H, Nk, D, requires_grad=bwd) for _ in range(2))
    def run():
        o = selfattn.attention(q, k, v, m, kernel=kernel)
        if bwd:
            o.sum().backward()
    run()
    small = name.startswith("small")
    ts = []
    for _ in range(200 if small else 3):
        t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
    res[name] = sorted(ts)[len(ts) // 2] if small else min(ts)
    if small:  # SDPA on the same call (a dense bool mask for the window), median of 200 calls
        dense = None if m is None else m.dense(B, H, Nq, Nk)
        def sdpa():
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
            if bwd:
                o.sum().backward()
        sdpa()
        ts = []
        for _ in range(200):
            t = time.perf_counter(); sdpa(); ts.append(time.perf_counter() - t)
        res[name + " sdpa"] = sorted(ts)[len(ts) // 2]
print(json.dumps(res))
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kernel", default="tiled", choices=["tiled", "native", "auto"])
    ap.add_argument("--small", action="store_true", help="add the per-call cases")
    a = ap.parse_args()
    cases = [(n, B, H, N, N, D, m, b) for n, B, H, N, D, m, b in CASES] + (SMALL if a.small else [])
    times = {"old": {}, "new": {}}
    for r in range(a.rounds):
        for tag in (("old", "new") if r % 2 == 0 else ("new", "old")):
            env = dict(os.environ, PYTHONPATH=getattr(a, tag))
            if a.kernel == "tiled":
                env["SELFATTN_NATIVE"] = "0"
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases), a.kernel], env=env, check=True,
                                 capture_output=True, text=True).stdout
            for k, v in json.loads(out.strip().splitlines()[-1]).items():
                times[tag].setdefault(k, []).append(v)
    print(f"load average {os.getloadavg()[0]:.2f}, torch threads default, {a.rounds} interleaved rounds, "
          f"kernel {a.kernel}")
    print(f"| case | old (s) | new (s) | old/new | SDPA (s) | new/SDPA time |\n|---|---:|---:|---:|---:|---:|")
    for name, *_ in cases:
        o, n = statistics.median(times["old"][name]), statistics.median(times["new"][name])
        row = f"| {name} | {o:.6f} | {n:.6f} | {o / n:.2f}x |"
        if name + " sdpa" in times["new"]:
            s = statistics.median(times["new"][name + " sdpa"] + times["old"][name + " sdpa"])
            row += f" {s:.6f} | {n / s:.2f}x |"
        else:
            row += " | |"
        print(row)


if __name__ == "__main__":
    main()
