"""Context parallelism on this CPU (loopback gloo): per-rank memory, work balance, overlap, bytes per layer.

    python benchmarks/bench_distributed.py                    # N=8192, H=4, D=64, fp32, causal; ~2 min on 2 cores
    python benchmarks/bench_distributed.py --seq 4096 --repeats 2   # quicker

One attention layer (``selfattn.distributed.ring_attention``, causal, B=1) over P ranks, each a process:

1. Peak memory per rank against P at fixed N: the RSS high-water mark of one forward+backward (q, k, v and
   their gradients, the ring buffers, the kernel's scratch), above the RSS before it (reset by
   /proc/self/clear_refs as selfattn.app.measure does). A first call of the same shapes takes the one-time costs, and
   glibc's mmap threshold is pinned at 64 KiB so freed tensors leave the RSS: the second call's peak is what it
   holds live. Should fall as ~1/P.
2. Work balance, most/least over ranks, zigzag vs contiguous: tiles from ``ring_plan``, and each rank's measured
   compute time for its sub-calls (forward+backward, no communication), timed one rank after another in this
   process on 1 thread, so no rank's time is inflated by the others sharing the cores.
3. Communication hidden behind compute (forward, P processes), at N and N/8: t_ring (ring_attention, transfers
   posted before each step's tiles), t_compute (the same tiles, no transfers), t_comm (the same transfers, no
   tiles); hidden = (t_compute + t_comm − t_ring) / t_comm, clipped to [0, 1]. The slowest rank's times.
4. Bytes sent per layer, counted at the ring's isend (forward and backward), and Ulysses' by its formula.

The machine's cores are shared: P ranks get max(1, cores // P) threads each; P > cores oversubscribes (the
output says so) and every time then includes waiting for a core. Ratios within one run, not absolute speeds.

Shape legend: B batch (1), H heads, N global length, n = N/P per rank, D head dim.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from selfattn import distributed as cp
from selfattn import masks as M
from selfattn.distributed import ring as ring_mod

MIB = 2 ** 20


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _spec(plan, rank, P, group=None, ranks=None):
    """A ring call's description for rank (group None: for local compute only; no transfer is made)."""
    return ring_mod._Spec(group, ranks or tuple(range(P)), rank, P, plan, M.causal(), None, None, 0.0, 0, None)


def compute_only(spec, q, k, v, backward: bool = False):
    """This rank's sub-calls of the plan on its own K/V (the tiles and offsets are those of the real steps; the
    values do not change the work): the ring's compute with no transfer."""
    B, H, n, _ = q.shape
    acc_o = torch.zeros(B, H, n, v.shape[3])  # (B, H, n, Dv)
    acc_l = torch.full((B, H, n), -math.inf)  # (B, H, n)
    subs = [sub for w in spec.plan.work[spec.rank] for sub in w]
    for sub in subs:
        call, module = ring_mod._step_call(spec, q, k, v, sub)
        o, lse = module.forward(call)
        rows = slice(sub.q_start, sub.q_start + sub.q_len)
        ring_mod._merge(acc_o[:, :, rows], acc_l[:, :, rows], o, lse)
    if backward:
        dout = torch.ones_like(acc_o)
        for sub in subs:
            call, module = ring_mod._step_call(spec, q, k, v, sub)
            rows = slice(sub.q_start, sub.q_start + sub.q_len)
            module.backward(call, dout[:, :, rows], acc_o[:, :, rows], acc_l[:, :, rows], (True, True, True, False, False))


def comm_only(spec, k, v):
    """The ring's forward K/V transfers (the same hops, skipped as the plan skips them) with no compute."""
    kv = ring_mod._pack(k, v)
    numel = k.numel() + v.numel()
    for s in range(spec.P):
        reqs, nxt = ring_mod._post_kv(spec, s, kv, numel, k.dtype, k.device)
        for what, w in reqs:
            ring_mod._wait(w, spec, what)
        kv = nxt if s + 1 < spec.P else None


def _inputs(H, n, D, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, n, D, generator=g).requires_grad_(grad) for _ in range(3)]  # (1, H, n, D) each


# ---------------------------------------------------------------------------------------------------------------
# one rank of a P-process run
# ---------------------------------------------------------------------------------------------------------------
def _worker(rank, P, store, out_dir, a):
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // P))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=600))
    res = {}
    n, H, D = a.seq // P, a.heads, a.head_dim
    causal = M.causal()
    # 1. memory: a warm-up call of the same shapes takes the one-time costs (~40 MB at the first real-size
    # backward: thread scratch, allocator arenas); with glibc's mmap threshold pinned at 64 KiB (main() sets it
    # before spawning) every freed tensor leaves the RSS, so the second call's peak is what it holds live
    for i in range(2):
        dist.barrier()
        base = _status("VmRSS")
        exact = _reset_peak()
        q, k, v = _inputs(H, n, D, rank, grad=True)  # this rank's shard
        t0 = time.perf_counter()
        cp.ring_attention(q, k, v, causal, layout="zigzag").backward(torch.ones(1, H, n, D))
        res["fwd_bwd_s"] = time.perf_counter() - t0
        res["peak"], res["first_peak"] = _status("VmHWM") - base, res.get("peak")
        res["exact"] = exact
        del q, k, v
    dist.barrier()
    # 3. overlap, forward, per layout, at N and at N/8 (where the transfer is a larger share of the step)
    for N_ov, reps in ((a.seq, a.repeats), (a.seq // 8, 4 * a.repeats)):
        n_ov = N_ov // P
        q, k, v = _inputs(H, n_ov, D, rank)
        for layout in ("zigzag", "contiguous"):
            plan = cp.ring_plan(causal, 1, H, N_ov, P, layout)
            spec = _spec(plan, rank, P, dist.group.WORLD, ring_mod._group_ranks(dist.group.WORLD, P))
            fns = {"ring": lambda: cp.ring_attention(q, k, v, causal, layout=layout),
                   "compute": lambda: compute_only(spec, q, k, v),
                   "comm": lambda: comm_only(spec, k, v)}
            times = {name: [] for name in fns}
            with torch.no_grad():
                for i in range(reps + 1):  # round 0 warms up
                    for name, fn in fns.items():  # interleaved, so load changes hit all three alike
                        dist.barrier()
                        t0 = time.perf_counter()
                        fn()
                        if i:
                            times[name].append(time.perf_counter() - t0)
            res[f"{layout}_{N_ov}"] = {name: _median(ts) for name, ts in times.items()}
    # 4. bytes sent, forward and backward, counted at the ring's isend
    sent = {"n": 0}
    orig = ring_mod._isend

    def counting(t, dst, tag, spec):
        sent["n"] += t.numel() * t.element_size()
        return orig(t, dst, tag, spec)

    ring_mod._isend = counting
    try:
        for layout in ("zigzag", "contiguous"):
            q, k, v = _inputs(H, n, D, rank, grad=True)
            sent["n"] = 0
            out = cp.ring_attention(q, k, v, causal, layout=layout)
            fwd = sent["n"]
            out.backward(torch.ones_like(out))
            res["bytes_" + layout] = [fwd, sent["n"] - fwd]
    finally:
        ring_mod._isend = orig
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def run_p(P, a):
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_worker, args=(P, os.path.join(d, "store"), d, a), nprocs=P, join=True,
                           start_method="spawn")
        return [json.load(open(os.path.join(d, f"rank{r}.json"))) for r in range(P)]


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def balance_rows(a, P):
    """Tiles (plan) and measured per-rank compute seconds (fwd+bwd, 1 thread, ranks one after another)."""
    rows = []
    n, H, D = a.seq // P, a.heads, a.head_dim
    q, k, v = _inputs(H, n, D, 0)
    for layout in ("zigzag", "contiguous"):
        plan = cp.ring_plan(M.causal(), 1, H, a.seq, P, layout)
        secs = []
        if P in a.ps:
            for r in range(P):
                spec = _spec(plan, r, P)
                compute_only(spec, q, k, v)  # warm
                t0 = time.perf_counter()
                compute_only(spec, q, k, v, backward=True)
                secs.append(time.perf_counter() - t0)
        rows.append((P, layout, plan, secs))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192, help="global length N (a multiple of 2·max(P))")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ps", default="1,2,4", help="process counts to run (comma-separated)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of the overlap measurement")
    a = p.parse_args(argv)
    a.ps = tuple(int(x) for x in a.ps.split(","))
    for P in a.ps:
        if a.seq % (16 * P):
            p.error(f"--seq: {a.seq} is not a multiple of 16P = {16 * P} (zigzag at N and at N/8)")
    cores = os.cpu_count() or 1
    t_start = time.perf_counter()
    la0 = os.getloadavg()
    print(f"# Context parallelism on {cpu_model()}, {cores} cores, torch {torch.__version__}, gloo loopback")
    print(f"causal ring_attention, B=1, H={a.heads}, D={a.head_dim}, fp32, N={a.seq}; "
          f"load average at start {la0[0]:.2f} / {la0[1]:.2f} / {la0[2]:.2f}")
    over = [P for P in a.ps if P > cores]
    print(f"P ranks get max(1, {cores} // P) threads each" +
          (f"; P={','.join(map(str, over))} oversubscribes the {cores} cores (times include waiting for a core)"
           if over else ""))
    # freed tensors leave the RSS at once (children inherit it): else glibc keeps them for reuse and a peak
    # hides under memory the process already holds
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    results = {}
    for P in a.ps:
        print(f"... P={P}", file=sys.stderr, flush=True)
        results[P] = run_p(P, a)
    elem = 4  # fp32

    print("\n## Peak memory per rank (one forward+backward after a warm-up call of the same shapes)\n")
    print("| P | n per rank | peak MiB (max over ranks) | vs P=1 | ideal 1/P | first call MiB | fwd+bwd s (slowest rank) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ref = max(r["peak"] for r in results[a.ps[0]]) * a.ps[0]
    for P in a.ps:
        peak = max(r["peak"] for r in results[P])
        first = max(r["first_peak"] for r in results[P])
        print(f"| {P} | {a.seq // P} | {peak / MIB:.1f} | {peak * a.ps[0] / ref:.2f} | {a.ps[0] / P:.2f} | "
              f"{first / MIB:.1f} | {max(r['fwd_bwd_s'] for r in results[P]):.2f} |")
    if not all(r["exact"] for res in results.values() for r in res):
        print("(clear_refs refused: peaks include the warm-up's)")

    print("\n## Work balance, causal (most / least over ranks)\n")
    print("| P | layout | tiles per rank (plan) | tiles most/least | compute s per rank (fwd+bwd, 1 thread) "
          "| time most/least |")
    print("|---:|---|---|---:|---|---:|")
    torch.set_num_threads(1)
    for P in sorted(set(x for x in a.ps if x > 1) | {8}):
        if a.seq % (2 * P):
            continue
        for P_, layout, plan, secs in balance_rows(a, P):
            t = plan.tiles_per_rank
            ts = ", ".join(f"{s:.2f}" for s in secs) if secs else "(plan only)"
            tb = f"{max(secs) / min(secs):.2f}" if secs else "-"
            print(f"| {P} | {layout} | {', '.join(map(str, t))} | {plan.balance:.2f} | {ts} | {tb} |")

    print("\n## Communication hidden behind compute (forward, slowest rank, median of rounds)\n")
    print("hidden = (t_compute + t_comm - t_ring) / t_comm, clipped to [0, 1]; noisy where t_comm is a few % of "
          "t_compute (then ring / compute is the number to read)\n")
    print("| P | N | layout | t_ring ms | t_compute ms | t_comm ms | comm / compute | hidden share | ring / compute |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for P in a.ps:
        if P == 1:
            continue
        for N_ov in (a.seq, a.seq // 8):
            for layout in ("zigzag", "contiguous"):
                key = f"{layout}_{N_ov}"
                tr, tc, tm = (max(r[key][x] for r in results[P]) for x in ("ring", "compute", "comm"))
                hidden = min(1.0, max(0.0, (tc + tm - tr) / tm)) if tm > 0 else float("nan")
                flag = " (oversubscribed)" if P > cores else ""
                print(f"| {P}{flag} | {N_ov} | {layout} | {tr * 1e3:.1f} | {tc * 1e3:.1f} | {tm * 1e3:.1f} | "
                      f"{tm / tc:.2f} | {hidden:.0%} | {tr / tc:.2f} |")

    print("\n## Bytes sent per layer (all ranks together; counted at isend)\n")
    print("| P | layout | forward MiB | backward MiB | per rank fwd+bwd MiB (max) | one K/V shard MiB | "
          "Ulysses fwd+bwd MiB (formula) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for P in a.ps:
        if P == 1:
            continue
        n = a.seq // P
        shard = 2 * a.heads * n * a.head_dim * elem  # K and V of one rank
        # Ulysses: forward all-to-alls of q, k, v, out, backward of dout, dq, dk, dv; each rank keeps 1/P
        uly = 8 * a.heads * n * a.head_dim * elem * (P - 1) / P * P
        for layout in ("zigzag", "contiguous"):
            f_b = [r["bytes_" + layout] for r in results[P]]
            fw, bw = sum(x[0] for x in f_b), sum(x[1] for x in f_b)
            per = max(x[0] + x[1] for x in f_b)
            print(f"| {P} | {layout} | {fw / MIB:.1f} | {bw / MIB:.1f} | {per / MIB:.1f} | {shard / MIB:.1f} | "
                  f"{uly / MIB:.1f} |")
    la1 = os.getloadavg()
    print(f"\nload average at end {la1[0]:.2f} / {la1[1]:.2f} / {la1[2]:.2f}; "
          f"{time.perf_counter() - t_start:.0f} s in all")
    print(f"command: python benchmarks/bench_distributed.py --seq {a.seq} --heads {a.heads} --head-dim {a.head_dim} "
          f"--ps {','.join(map(str, a.ps))} --repeats {a.repeats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
