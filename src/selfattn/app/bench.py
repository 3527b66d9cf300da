"""``selfattn bench``: selfattn's kernels against torch SDPA and a plain implementation — a progress bar, the
table and the plot around the measurements of ``measure.py``."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import UserError, check_outs, say

__all__ = ["add_parser", "run", "QUICK_SIZES", "BENCH_PATHS"]

# --quick: three lengths (a curve, not a point), forward memory only (one subprocess per path and length)
QUICK_SIZES = (256, 512, 1024)
BENCH_PATHS = ("native", "tiled", "sdpa", "plain")  # native dropped where its library is not built


def run(args) -> int:
    (out,) = check_outs([args.out], suffixes=(".png",))
    try:
        from tqdm import tqdm
        import matplotlib  # noqa: F401  (the plot, checked before minutes of measuring)
    except ImportError as e:
        raise UserError(f"bench needs {e.name} (pip install 'selfattn[bench,viz]')") from None

    from . import measure as _b
    from .plots import bench_png
    B, H, D = 1, 8, 64
    sizes = QUICK_SIZES if args.quick else (1024, 2048, 4096, 8192)
    n_time = len(sizes) * 4  # (fwd, fwd+bwd) x (none, causal) per length
    from ..kernels import native as _native
    paths = tuple(p for p in BENCH_PATHS if p != "native" or _native.available())
    n_mem = len(sizes) * len(paths) if args.quick else n_time
    bar = tqdm(total=n_time + n_mem, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)

    def progress(done: int, total: int, what: str, base: int = 0) -> None:
        bar.n = base + min(done, total)
        bar.set_postfix_str(what, refresh=False)
        bar.refresh()

    try:
        # full run: run_core_bench measures the memory of every case itself; quick: forward, no mask, below
        rows = _b.run_core_bench(quick=args.quick, progress=progress, sizes=sizes, B=B, H=H, D=D,
                                 memory=not args.quick, paths=paths)
        if args.quick:
            i = 0
            for N in sizes:
                for path in paths:
                    progress(i, n_mem, f"memory {path} N={N}", base=n_time)
                    m = _b.peak_memory(path, B, H, N, D, causal=False, backward=False)
                    for r in rows:
                        if (r["path"], r["N"], r["mask"], r["mode"]) == (path, N, "none", "fwd"):
                            r["peak_mib"] = m["extra"] / 2 ** 20 if m else None
                    i += 1
            progress(n_mem, n_mem, "done", base=n_time)
    finally:
        bar.close()
    import torch
    say(f"B={B} H={H} D={D} float32, {sys.platform}, {torch.get_num_threads()} threads; median of "
        f"{'3' if args.quick else '5'} interleaved rounds; 'vs SDPA' = SDPA time / this time (same run)")
    say(_b.format_rows(rows))
    bench_png(rows, out, title=f"selfattn bench{' --quick' if args.quick else ''}: B={B} H={H} D={D} float32, "
                               f"forward")
    say(f"wrote {Path(out)}")
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmark selfattn against torch SDPA and a plain implementation",
                       description="Time the forward pass of selfattn's kernels, torch's scaled_dot_product_attention "
                                   "and a plain materialized implementation across sequence lengths; print the "
                                   "table and plot throughput and peak memory.")
    b.add_argument("--quick", action="store_true",
                   help=f"N in {QUICK_SIZES}, 3 rounds, forward memory only (about a minute on 2 cores; the full run "
                        f"takes many minutes)")
    b.add_argument("--out", default="bench.png", metavar="FILE.png", help="plot file (default: bench.png)")
    b.set_defaults(func=run)
