"""``selfattn plan``: which kernel ``selfattn.attention`` would run for a shape and mask, every kernel's reason,
the tile pattern, and the library's cost estimates (``Plan.costs``), printed. Nothing is computed here that the
library does not compute."""
from __future__ import annotations

from typing import Optional

from .common import UserError, say

__all__ = ["add_parser", "run", "parse_mask"]

_DTYPES = ("float32", "float16", "bfloat16", "float64")


def parse_mask(spec: Optional[str]):
    """'none' | comma-separated 'causal', 'window=W', 'top_left' -> a selfattn mask (or None).
    'causal,window=W' is a causal window of W keys back; 'window=W' alone is symmetric (W each side)."""
    from .. import masks
    if spec is None or spec.strip() in ("", "none"):
        return None
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    causal, window, align = False, None, "bottom_right"
    for p in parts:
        if p == "causal":
            causal = True
        elif p == "top_left":
            align = "top_left"
        elif p.startswith("window="):
            try:
                window = int(p.split("=", 1)[1])
            except ValueError:
                raise UserError(f"--mask {spec}: window=W needs an integer W, got {p!r}") from None
            if window < 0:
                raise UserError(f"--mask {spec}: window must be ≥ 0, got {window}")
        else:
            raise UserError(f"--mask {spec}: unknown part {p!r}; expected none, causal, window=W, top_left")
    if window is not None:
        return masks.sliding_window(window, 0 if causal else window, align=align)
    if causal:
        return masks.causal(align)
    raise UserError(f"--mask {spec}: top_left alone is not a mask; combine it with causal or window=W")


def _human(n: float, unit: str = "") -> str:
    for suffix, k in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: float) -> str:
    for suffix, k in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= k:
            return f"{n / k:.2f} {suffix}"
    return f"{n:.0f} B"


def run(args) -> int:
    import torch

    from .. import cost
    from ..functional import plan as _planf
    from ..kernels.reference import max_bytes

    for flag, val in (("--batch", args.batch), ("--heads", args.heads), ("--seq", args.seq), ("--dim", args.dim),
                      ("--kv-heads", args.kv_heads), ("--kv-seq", args.kv_seq), ("--dv", args.dv),
                      ("--block-q", args.block_q), ("--block-k", args.block_k)):
        if val is not None and val < 1:  # (0 would otherwise read as "not given" below)
            raise UserError(f"{flag}: expected a positive integer, got {val}")
    Hkv = args.kv_heads if args.kv_heads is not None else args.heads
    Nk = args.kv_seq if args.kv_seq is not None else args.seq
    Dv = args.dv if args.dv is not None else args.dim
    if Hkv < 1 or args.heads % Hkv:
        raise UserError(f"--kv-heads {Hkv}: must divide --heads {args.heads} (GQA/MQA groups query heads)")
    if Nk < 1 or Dv < 1:
        raise UserError("--kv-seq/--dv: expected positive integers")
    dtype = getattr(torch, args.dtype)
    mask = parse_mask(args.mask)
    B, Hq, Nq, D = args.batch, args.heads, args.seq, args.dim
    kernel = None if args.kernel == "auto" else args.kernel
    try:
        pl = _planf(B, Hq, Nq, Nk, D, Dv=Dv, Hkv=Hkv, mask=mask, kernel=kernel, dtype=dtype, block_q=args.block_q,
                    block_k=args.block_k)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    bq, bk = pl.block_q, pl.block_k  # the tiles of the kernel that runs (or the one named)
    est = pl.costs(dtype)
    ref = est["reference"]
    run_name = pl.kernel if pl.kernel != "reference" else "reference"
    til = est[run_name]  # the kernel that runs (or the one named), at its own tiles
    scores = cost.score_bytes(pl, dtype)
    rp = None  # the ring plan, computed before anything is printed (an error is then the only output)
    if args.ring is not None:
        from ..distributed import ring_plan
        if args.ring < 1:
            raise UserError(f"--ring: expected a positive number of ranks, got {args.ring}")
        if Nk != Nq:
            raise UserError("--ring: context parallelism shards one sequence: --kv-seq must equal --seq")
        try:
            rp = ring_plan(mask, B, Hq, Nq, args.ring, args.layout)
        except ValueError as e:
            raise UserError(f"--ring: {str(e).splitlines()[0]}") from None

    say(f"problem: B={B} Hq={Hq} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {args.dtype} "
        f"mask={args.mask or 'none'}{' (' + repr(mask) + ')' if mask is not None else ''}")
    say(f"kernel: {pl.kernel} — {pl.reason}")
    for name, why in pl.reasons:  # every kernel's answer for this call (xformers' not_supported_reasons)
        say(f"  {name:10s} {'can serve' if why is None else 'no: ' + why}")
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    say(f"tiles ({bq}×{bk}): {nqb}×{nkb} = {pl.tiles_total}, computed {pl.tiles_computed} "
        f"({100.0 * pl.tiles_computed / max(1, pl.tiles_total):.1f}%), partial {pl.tiles_partial}, "
        f"skipped {pl.tiles_total - pl.tiles_computed}")
    if mask is not None:
        # the picture: the kernel's own tiles when they fit in 32 rows × 64 columns, else a coarser grid
        vq, vk = max(bq, -(-Nq // 32)), max(bk, -(-Nk // 64))
        pic = mask.to_string(Nq, Nk, vq, vk, B=1, H=1).splitlines()[1:]
        say(f"  tile pattern{'' if (vq, vk) == (bq, bk) else f' (coarse view, {vq}×{vk} cells)'}: "
            f"█ full, ░ partial, · skipped")
        for line in pic:
            say("  " + line)
    w = 22
    say(f"{'':{w}s}{'materialized':>16s}{run_name + ' (runs)':>16s}   (forward; estimates from shapes)")
    say(f"{'FLOPs':{w}s}{_human(ref.flops):>16s}{_human(til.flops):>16s}")
    say(f"{'bytes moved':{w}s}{_bytes(ref.bytes_moved):>16s}{_bytes(til.bytes_moved):>16s}")
    say(f"{'peak extra memory':{w}s}{_bytes(ref.peak_bytes):>16s}{_bytes(til.peak_bytes):>16s}")
    if scores > max_bytes():
        say(f"reference: refused at this size (scores {_bytes(scores)} > "
            f"SELFATTN_REFERENCE_MAX_BYTES={_bytes(max_bytes())})")
    if rp is not None:
        say(f"context parallelism over {args.ring} ranks, layout {args.layout}:")
        for line in str(rp).splitlines():
            say("  " + line)
    return 0


def kernel_choices():
    """--kernel's choices: 'auto' and every kernel the library knows."""
    from ..kernels.registry import names
    return ["auto", *names()]


def add_parser(sub) -> None:
    pl = sub.add_parser("plan", help="which kernel would run, and what it costs, before running anything",
                        description="Print the kernel selfattn.attention would choose and why, the tile pattern, "
                                    "and FLOPs, bytes moved and peak memory for the reference and tiled kernels.")
    pl.add_argument("--batch", type=int, required=True, metavar="B")
    pl.add_argument("--heads", type=int, required=True, metavar="H", help="query heads")
    pl.add_argument("--kv-heads", type=int, metavar="K", help="key/value heads (GQA/MQA; default: H)")
    pl.add_argument("--seq", type=int, required=True, metavar="N", help="query length")
    pl.add_argument("--kv-seq", type=int, metavar="M", help="key length (default: N)")
    pl.add_argument("--dim", type=int, required=True, metavar="D", help="head dim")
    pl.add_argument("--dv", type=int, metavar="DV", help="value head dim (default: D)")
    pl.add_argument("--mask", metavar="SPEC", help="none | causal | window=W | causal,window=W [,top_left]")
    pl.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    pl.add_argument("--kernel", default="auto", choices=kernel_choices())
    pl.add_argument("--block-q", type=int, metavar="TQ", help="tile rows (default: the tiles of the kernel that runs)")
    pl.add_argument("--block-k", type=int, metavar="TK", help="tile columns (default: the tiles of the kernel that runs)")
    pl.add_argument("--ring", type=int, metavar="P", help="also plan context parallelism over P ranks "
                    "(selfattn.distributed.ring_attention): steps and tiles per rank")
    pl.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"], help="sequence layout for --ring")
    pl.set_defaults(func=run)
