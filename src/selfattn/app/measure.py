"""The core benchmark: selfattn's native and tiled (torch-op) kernels against torch SDPA, a plain materialized
implementation and the reference kernel, in one run, forward and forward+backward. ``selfattn bench`` and benchmarks/bench_core.py call
``run_core_bench``; benchmarks/_util.py re-exports the timing and memory helpers for the other benchmark scripts.

Method (see benchmarks/NOTES.md): paths are timed in interleaved rounds (round r runs every path once), so a
change of machine load hits all of them alike, and each reports the median over rounds; ratios to SDPA are
taken from the same run. FLOPs: forward 4·B·H·Nq·Nk·D (two matmuls), halved for causal; backward 2.5x the
forward (5 matmuls: recomputed S, dP, dV, dQ, dK), so forward+backward counts 3.5x. Peak memory: a fresh
subprocess per (path, shape) reports its peak resident set (``getrusage`` ru_maxrss) minus its resident set just
before the call, after the inputs exist and a small warm-up call has loaded every library; so it counts what the
call allocates (outputs, gradients, workspace), not the inputs.

Shape legend: B batch, H heads, N sequence length (Nq = Nk = N), D head dim.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F

PATHS = ("native", "tiled", "sdpa", "plain", "reference")
# the materialized paths hold B·H·N² scores (plus softmax and autograd copies): measured only up to this N
MATERIALIZED_MAX_N = 4096

__all__ = ["flops", "interleaved_times", "median", "peak_memory", "make_call", "run_core_bench", "format_rows",
           "PATHS"]


def flops(B: int, H: int, Nq: int, Nk: int, D: int, causal: bool, backward: bool) -> float:
    """Useful FLOPs of one call: 4·B·H·Nq·Nk·D forward (halved for causal), x3.5 with the backward."""
    f = 4.0 * B * H * Nq * Nk * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def interleaved_times(fns: Dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call for each fn, measured in `repeats` rounds that run every fn once (after `warmup`
    rounds), so that a change of machine load during the run hits all of them alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[name].append(time.perf_counter() - t0)
    return out


def plain_attention(q, k, v, causal: bool, scale: float):
    """The textbook materialized implementation: (B, H, N, N) scores, softmax, weights @ v."""
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if causal:
        Nq, Nk = s.shape[-2:]
        allowed = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v  # (B, H, Nq, Dv)


def make_call(path: str, q, k, v, causal: bool, backward: bool, grad_out=None) -> Callable[[], None]:
    """A no-argument callable running one forward (and backward) of `path` on these tensors."""
    import selfattn
    from selfattn import masks

    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D)
    mask = masks.causal() if causal else None
    if path == "native":
        fwd = lambda: selfattn.attention(q, k, v, mask, kernel="native")  # noqa: E731
    elif path == "tiled":
        fwd = lambda: selfattn.attention(q, k, v, mask, kernel="tiled")  # noqa: E731
    elif path == "reference":
        fwd = lambda: selfattn.attention(q, k, v, mask, kernel="reference")  # noqa: E731
    elif path == "sdpa":
        # bottom-right and top-left causal agree here (Nq == Nk)
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    elif path == "plain":
        fwd = lambda: plain_attention(q, k, v, causal, scale)  # noqa: E731
    else:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    if not backward:
        def call():
            with torch.no_grad():
                fwd()
        return call
    if grad_out is None:
        raise ValueError("grad_out: required when backward=True")

    def call_bwd():
        for t in (q, k, v):
            t.grad = None
        fwd().backward(grad_out)
    return call_bwd


def _native_available() -> bool:
    from selfattn.kernels import native
    return native.available()


def _inputs(B: int, H: int, N: int, D: int, backward: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_(backward) for _ in range(3))
    grad_out = torch.randn(B, H, N, D, generator=g) if backward else None
    return q, k, v, grad_out


_MEMORY_CHILD = r"""
import gc, json, resource, sys, torch
from selfattn.app.measure import _inputs, make_call
path, B, H, N, D, causal, backward = sys.argv[1], *map(int, sys.argv[2:6]), sys.argv[6] == "1", sys.argv[7] == "1"
small = make_call(path, *_inputs(1, 1, 64, D, backward)[:3], causal, backward, _inputs(1, 1, 64, D, backward)[3])
small()  # load every library, start thread pools, before the baseline
q, k, v, g = _inputs(B, H, N, D, backward)
call = make_call(path, q, k, v, causal, backward, g)
gc.collect()
page = __import__("os").sysconf("SC_PAGE_SIZE")
with open("/proc/self/statm") as f:
    rss0 = int(f.read().split()[1]) * page
def hwm():  # peak RSS of this process since the last reset, bytes
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
try:
    # ru_maxrss is inherited across exec from the parent's memory high-water mark (a bench that already ran big
    # cases made every child report it): reset the kernel's peak-RSS counter to the current RSS instead
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    peak0 = hwm()
    call()
    peak1 = hwm()
except OSError:  # no /proc/self/clear_refs: ru_maxrss, with what it hides reported
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    call()
    peak1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": peak1 - rss0, "hidden": max(0, peak0 - rss0)}))
"""


def peak_memory(path: str, B: int, H: int, N: int, D: int, causal: bool, backward: bool,
                timeout: float = 600.0) -> Optional[Dict[str, int]]:
    """Peak extra resident memory (bytes) of one call of `path`, measured in a fresh subprocess (see the module
    docstring). Returns {"extra": bytes, "hidden": bytes} -- "hidden" > 0 means an earlier peak of the process
    exceeded the baseline by that much, so growth below it would not show -- or None if the child failed."""
    args = [sys.executable, "-c", _MEMORY_CHILD, path, str(B), str(H), str(N), str(D), str(int(causal)),
            str(int(backward))]
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_core_bench(quick: bool = False, progress: Optional[Callable[[int, int, str], None]] = None,
                   sizes: Optional[Iterable[int]] = None, B: int = 1, H: int = 8, D: int = 64,
                   repeats: Optional[int] = None, memory: Optional[bool] = None,
                   paths: Sequence[str] = PATHS) -> List[Dict]:
    """Time every path on B x H x N x D float32 inputs, non-causal and causal, forward and forward+backward.

    quick: N = 1024 only, 3 rounds, no reference kernel, no memory (a few seconds on an idle 2-core machine).
    Otherwise N in (1024, 2048, 4096, 8192), 5 rounds, and peak memory per path at each N in subprocesses.
    Returns one dict per (N, mask, mode, path): impl ('tiled', 'sdpa', ... with ' fwd+bwd' for the backward
    rows), path, mode, mask ('none' | 'causal'), N, B, H, D, ms (median), gflops, tokens_per_s, vs_sdpa (SDPA's
    median time / this path's, same run), peak_mib (or None), threads."""
    sizes = list(sizes) if sizes is not None else ([1024] if quick else [1024, 2048, 4096, 8192])
    if not _native_available():
        paths = [p for p in paths if p != "native"]  # not built here: the table says so through its absence
    if quick and tuple(paths) in (PATHS, PATHS[1:]):
        paths = tuple(p for p in ("native", "tiled", "sdpa", "plain") if p in paths)
    repeats = repeats or (3 if quick else 5)
    memory = (not quick) if memory is None else memory
    plan = []
    for N in sizes:
        for backward in (False, True):
            for causal in (False, True):
                plan.append((N, causal, backward))
    rows: List[Dict] = []
    total = len(plan) * (2 if memory else 1)
    for i, (N, causal, backward) in enumerate(plan):
        mode = "fwd+bwd" if backward else "fwd"
        mask = "causal" if causal else "none"
        if progress:
            progress(i, total, f"N={N} {mask} {mode}")
        q, k, v, g = _inputs(B, H, N, D, backward)
        use = [p for p in paths if p in ("native", "tiled", "sdpa") or N <= MATERIALIZED_MAX_N]
        fns = {p: make_call(p, q, k, v, causal, backward, g) for p in use}
        times = interleaved_times(fns, repeats)
        fl = flops(B, H, N, N, D, causal, backward)
        sdpa_t = median(times["sdpa"]) if "sdpa" in times else None
        for p in use:
            t = median(times[p])
            rows.append({"impl": p + ("" if not backward else " fwd+bwd"), "path": p, "mode": mode, "mask": mask,
                         "N": N, "B": B, "H": H, "D": D, "ms": t * 1e3, "gflops": fl / t / 1e9,
                         "tokens_per_s": B * N / t, "vs_sdpa": (sdpa_t / t) if sdpa_t else None,
                         "peak_mib": None, "threads": torch.get_num_threads()})
    if memory:
        done = len(plan)
        for i, (N, causal, backward) in enumerate(plan):
            if progress:
                progress(done + i, total, f"memory N={N}")
            for r in rows:
                if r["N"] == N and r["mask"] == ("causal" if causal else "none") and \
                        r["mode"] == ("fwd+bwd" if backward else "fwd"):
                    m = peak_memory(r["path"], B, H, N, D, causal, backward)
                    r["peak_mib"] = m["extra"] / 2 ** 20 if m else None
    if progress:
        progress(total, total, "done")
    return rows


def format_rows(rows: Sequence[Dict], markdown: bool = False) -> str:
    """A table of run_core_bench rows: plain text, or a GitHub markdown table for the README."""
    head = ["N", "mask", "mode", "path", "ms (median)", "GFLOP/s", "vs SDPA", "peak extra MiB"]
    body = []
    for r in rows:
        body.append([str(r["N"]), r["mask"], r["mode"], r["path"], f"{r['ms']:.1f}", f"{r['gflops']:.1f}",
                     f"{r['vs_sdpa']:.2f}x" if r.get("vs_sdpa") is not None else "—",
                     f"{r['peak_mib']:.1f}" if r.get("peak_mib") is not None else "—"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i != 1 and i != 2 and i != 3 else "---"
                                                              for i in range(len(head))) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def _main(argv=None) -> int:  # pragma: no cover - exercised through benchmarks/bench_core.py
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few seconds: N=1024, 3 rounds, no reference, no memory")
    ap.add_argument("--markdown", action="store_true", help="print a GitHub markdown table (README)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="comma-separated N values (default 1024,2048,4096,8192; quick: 1024)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=None, help="timing rounds (median reported)")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="measure peak memory per path in subprocesses (default: on unless --quick)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {PATHS}")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    a = ap.parse_args(argv)
    paths = [p for p in a.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            ap.error(f"--paths: unknown path {p!r}, expected a subset of {PATHS}")
    if "sdpa" not in paths:
        paths.append("sdpa")  # ratios need the baseline in the same run
    t0 = time.perf_counter()
    rows = run_core_bench(quick=a.quick, sizes=a.sizes, H=a.heads, D=a.dim, repeats=a.repeats, memory=a.memory,
                          paths=paths)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, float32, B=1 H={a.heads} D={a.dim}, "
          f"{os.cpu_count()} CPUs; {time.perf_counter() - t0:.0f} s")
    print(format_rows(rows, markdown=a.markdown))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
