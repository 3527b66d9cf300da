"""selfattn's Triton kernels on a CUDA GPU, in one call: correctness by the oracle rule, then speed against SDPA's
flash / cuDNN / efficient backends and compiled FlexAttention in the same run (issue 14).

    .venv/bin/python benchmarks/bench_gpu.py              # on a GPU machine: everything, < 10 min on an H100/H200
    .venv/bin/python benchmarks/bench_gpu.py --quick      # fewer lengths
    .venv/bin/python benchmarks/bench_gpu.py --dry-run    # anywhere: print the plan, exit 0

1. Correctness (bf16 unless noted): out, dq, dk, dv (and dbias / the T5 table) against a float64 reference computed
   on the GPU (``kernels.reference.math_``), required ≤ 2× (outputs) / 3× (gradients) the error of a plain bf16
   implementation (STYLE.md #3): no mask, causal, window, documents, GQA 32/8, bias + ALiBi + softcap, T5,
   dropout (the same kept entries as the CPU kernels), D = 64 / 128 / 80 (padded), fp16 and fp32, decode.
2. Speed, bf16, B·N = 16k tokens, H = 16: D = 64, 128; N = 1k … 16k; causal and not; forward and forward +
   backward; TFLOP/s (4·B·H·N²·D forward, halved causal, ×3.5 with the backward) and the ratio to the fastest SDPA
   backend. Window 4096 and 8 packed documents against ``torch.compile(flex_attention)`` with its BlockMask.
   Decode: 1 token vs 32k / 128k keys, 32 query / 8 KV heads, D = 128, as a fraction of the copy bandwidth
   measured in the same run (bytes of K and V read once).
Targets (H100/H200, bf16): forward ≥ 0.9×, backward ≥ 0.8× SDPA's fastest; window / documents ≥ 1.0× Flex;
decode ≥ 70% of copy bandwidth. Writes bench_gpu.md and bench_gpu.json to $OUT (or --out).
Timing: ``triton.testing.do_bench`` (median of CUDA-event timed runs after warm-up, L2 flushed between runs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import selfattn
from selfattn import functional, masks, scores
from selfattn.app.measure import flops
from selfattn.kernels import reference
from selfattn.kernels import triton as tk

DEV = "cuda"
BUDGET_S = 540  # stop starting new timing rows after this long: the whole run stays under 10 minutes


def ensure_registered():
    """kernel="triton" for selfattn.attention, also before functional.py lists the kernel."""
    if "triton" not in functional.KERNELS:
        functional.KERNELS = functional.KERNELS + ("triton",)
        functional._BY_NAME["triton"] = tk


# -- correctness -------------------------------------------------------------------------------------------------
def plain(q, k, v, allowed, bias_t, mod, scale, dropout_p, seed):
    """Textbook attention, every op in q's dtype (the baseline whose error sets the tolerance)."""
    B, Hq, Nq, D = q.shape
    G = Hq // k.shape[1]
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # (B, Hq, Nk, D)
    s = (q @ kr.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    if bias_t is not None:
        s = s + bias_t.to(q.dtype)
    if mod is not None:
        s = mod.apply(s, torch.arange(Nq, device=q.device)[:, None], torch.arange(k.shape[2], device=q.device)[None],
                      None).to(q.dtype)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
        empty = ~allowed.any(-1, keepdim=True)
        w = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    else:
        w = torch.softmax(s, -1)
    if dropout_p > 0:
        from selfattn.kernels.common import dropout_keep
        keep = dropout_keep(seed, dropout_p, torch.arange(B), torch.arange(Hq),
                            torch.arange(Nq, device=q.device)[:, None], torch.arange(k.shape[2], device=q.device)[None])
        w = w * keep.to(w.dtype) / (1 - dropout_p)
    return w @ vr


def check_case(name, B, Hq, Hkv, Nq, Nk, D, dtype=torch.bfloat16, mask=None, bias_shape=None, mod=None,
               dropout_p=0.0):
    dev = DEV
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dev)  # noqa: E731
    q64, k64, v64 = mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D)
    b64 = mk(*bias_shape) if bias_shape else None
    dout64 = mk(B, Hq, Nq, D)
    leaves = lambda ts, dt: [t.to(dt).requires_grad_(True) if t is not None else None for t in ts]  # noqa: E731
    seed = 1234
    bias_arg = lambda b: ([b] if b is not None else []) + ([mod] if mod is not None else [])  # noqa: E731
    # the float64 reference on the GPU (materialized scores: keep the shapes moderate)
    r = leaves((q64, k64, v64, b64), torch.float64)
    call64, _, _ = functional.prepare(*r[:3], mask, bias=bias_arg(r[3]) or None, dropout_p=dropout_p, seed=seed)
    ref, _ = reference.math_(call64)
    wrt = [t for t in r if t is not None]
    ref_g = torch.autograd.grad(ref, wrt, dout64)
    # the kernel
    x = leaves((q64, k64, v64, b64), dtype)
    call, _, _ = functional.prepare(*x[:3], mask, bias=bias_arg(x[3]) or None, dropout_p=dropout_p, seed=seed,
                                    kernel="triton")
    out = functional._KernelFunction.apply(tk, call, *x[:3], call.bias)[0]
    kx = [t for t in x if t is not None]
    ker_g = torch.autograd.grad(out, kx, dout64.to(dtype))
    # the plain same-dtype baseline
    p = leaves((q64, k64, v64, b64), dtype)
    allowed = call.dense_mask()
    pout = plain(*p[:3], allowed, p[3], call.score_mod, call.scale, dropout_p, seed)
    pl_g = torch.autograd.grad(pout, [t for t in p if t is not None], dout64.to(dtype))
    names = ["dq", "dk", "dv", "dbias"][:len(wrt)]
    rows, ok = [], True
    for nm, a, b_, c, fac in [("out", out, ref, pout, 2.0)] + [(n, *t, 3.0) for n, t in zip(names, zip(ker_g, ref_g,
                                                                                                       pl_g))]:
        ek = float((a.detach().double() - b_.detach()).abs().max())
        ep = float((c.detach().double() - b_.detach()).abs().max())
        lim = fac * ep + (1e-5 if dtype == torch.float32 else 1e-6) * max(float(b_.detach().abs().max()), 1.0)
        good = math.isfinite(ek) and ek <= lim
        ok &= good
        rows.append(f"{nm} {ek:.2e}/{lim:.2e}{'' if good else ' FAIL'}")
    print(f"  {'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(rows), flush=True)
    return {"case": name, "ok": ok, "errors": rows}


def correctness():
    ids = masks.document_ids([[300, 500, 224]])
    tab = torch.randn(32, 8, device=DEV, dtype=torch.float32)
    cases = [
        ("plain D64", 2, 8, 8, 1000, 1000, 64, torch.bfloat16, None),
        ("causal GQA 32/8 D128", 1, 32, 8, 777, 1024, 128, torch.bfloat16, masks.causal()),
        ("window 128 D64", 1, 8, 2, 1024, 1024, 64, torch.bfloat16, masks.sliding_window(128)),
        ("documents & causal D64", 1, 8, 8, 1024, 1024, 64, torch.bfloat16, masks.document(ids) & masks.causal()),
        ("padding D80 (padded to 128)", 2, 4, 4, 300, 513, 80, torch.bfloat16, masks.key_padding([513, 100])),
        ("causal fp16 D64", 1, 8, 8, 1024, 1024, 64, torch.float16, masks.causal()),
        ("causal fp32 D64 (IEEE fp32 dots)", 1, 4, 4, 512, 512, 64, torch.float32, masks.causal()),
    ]
    res = [check_case(*c[:7], dtype=c[7], mask=c[8]) for c in cases]
    res.append(check_case("bias + ALiBi + softcap", 1, 8, 8, 512, 512, 64, mask=masks.causal(),
                          bias_shape=(1, 8, 512, 512), mod=scores.alibi(num_heads=8) >> scores.softcap(20.0)))
    res.append(check_case("T5 buckets", 1, 8, 8, 512, 512, 64, mod=scores.t5_relative(tab)))
    res.append(check_case("dropout 0.1 causal", 1, 8, 8, 512, 512, 64, mask=masks.causal(), dropout_p=0.1))
    res.append(check_case("decode 32/8 x 8192 keys", 1, 32, 8, 1, 8192, 128))
    return res


# -- timing ------------------------------------------------------------------------------------------------------
def bench(fn):
    import triton.testing
    try:
        return triton.testing.do_bench(fn, warmup=25, rep=100)  # ms
    except Exception as e:  # a backend that refuses the shape
        print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
        return float("nan")


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timing(quick, t0):
    from torch.nn.attention import sdpa_kernel
    rows = []
    lengths = [1024, 4096, 16384] if quick else [1024, 2048, 4096, 8192, 16384]
    H = 16
    for D in (64, 128):
        for N in lengths:
            for causal in (False, True):
                if time.time() - t0 > BUDGET_S:
                    print("  time budget reached: remaining rows skipped")
                    return rows
                B = max(1, 16384 // N)
                q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                do = torch.randn_like(q)
                m = masks.causal() if causal else None
                row = {"D": D, "N": N, "B": B, "causal": causal}
                for bwd in (False, True):
                    def run_t():
                        o = selfattn.attention(q, k, v, m, kernel="triton")
                        if bwd:
                            torch.autograd.grad(o, (q, k, v), do)
                    row[f"triton_{'fb' if bwd else 'f'}"] = bench(run_t)
                    for name, be in sdpa_backends().items():
                        def run_s(be=be):
                            with sdpa_kernel(be):
                                o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                            if bwd:
                                torch.autograd.grad(o, (q, k, v), do)
                        row[f"{name}_{'fb' if bwd else 'f'}"] = bench(run_s)
                rows.append(row)
                _print_row(row)
    return rows


def _print_row(row):
    B, D, N, c = row["B"], row["D"], row["N"], row["causal"]
    parts = []
    for kind, bwd in (("f", False), ("fb", True)):
        fl = flops(B, 16, N, N, D, c, bwd)
        best = min((row[f"{n}_{kind}"] for n in ("flash", "cudnn", "efficient")
                    if not math.isnan(row[f"{n}_{kind}"])), default=float("nan"))
        t = row[f"triton_{kind}"]
        row[f"tflops_{kind}"] = fl / (t * 1e-3) / 1e12
        row[f"ratio_{kind}"] = best / t
        parts.append(f"{'fwd' if kind == 'f' else 'fwd+bwd'} {t:.3f} ms {row[f'tflops_{kind}']:.0f} TFLOP/s "
                     f"x{row[f'ratio_{kind}']:.2f} vs best SDPA {best:.3f} ms")
    print(f"  D={D} N={N} B={B} {'causal' if c else 'full  '}: " + " | ".join(parts), flush=True)


def timing_flex(t0):
    rows = []
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        print(f"  FlexAttention unavailable: {e}")
        return rows
    flex = torch.compile(flex_attention, dynamic=False)
    H, D = 16, 128
    for N in (8192, 16384):
        for kind in ("window4096", "docs8"):
            if time.time() - t0 > BUDGET_S:
                print("  time budget reached: remaining rows skipped")
                return rows
            q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            do = torch.randn_like(q)
            if kind == "window4096":
                m = masks.sliding_window(4096)

                def mod(b, h, qi, ki):
                    return (ki <= qi) & (qi - ki <= 4096)
                causal_frac = 4096 / N
            else:
                ids = masks.document_ids([N // 8] * 8).cuda()
                m = masks.document(ids) & masks.causal()

                def mod(b, h, qi, ki):
                    return (ids[qi] == ids[ki]) & (ki <= qi)
                causal_frac = 1 / 16
            bm = create_block_mask(mod, None, None, N, N, device="cuda")
            row = {"mask": kind, "N": N}
            for bwd in (False, True):
                def run_t():
                    o = selfattn.attention(q, k, v, m, kernel="triton")
                    if bwd:
                        torch.autograd.grad(o, (q, k, v), do)

                def run_f():
                    o = flex(q, k, v, block_mask=bm)
                    if bwd:
                        torch.autograd.grad(o, (q, k, v), do)
                tag = "fb" if bwd else "f"
                row[f"triton_{tag}"], row[f"flex_{tag}"] = bench(run_t), bench(run_f)
                fl = 4.0 * H * N * N * D * causal_frac * (3.5 if bwd else 1.0)
                row[f"tflops_{tag}"] = fl / (row[f"triton_{tag}"] * 1e-3) / 1e12
                row[f"ratio_{tag}"] = row[f"flex_{tag}"] / row[f"triton_{tag}"]
            rows.append(row)
            print(f"  {kind} N={N}: fwd {row['triton_f']:.3f} ms x{row['ratio_f']:.2f} vs flex, fwd+bwd "
                  f"{row['triton_fb']:.3f} ms x{row['ratio_fb']:.2f} vs flex", flush=True)
    return rows


def timing_decode():
    rows = []
    Hq, Hkv, D = 32, 8, 128
    for Nk in (32768, 131072):
        q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, Hkv, Nk, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        nbytes = 2 * k.numel() * k.element_size()
        t_copy = bench(lambda: (k.clone(), v.clone())) / 2  # clone reads + writes: half is one pass of reads
        t = bench(lambda: selfattn.attention(q, k, v, kernel="triton"))
        from torch.nn.attention import sdpa_kernel
        best = float("nan")
        for be in sdpa_backends().values():
            def run_s(be=be):
                with sdpa_kernel(be):
                    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            tt = bench(run_s)
            best = tt if math.isnan(best) else min(best, tt)
        row = {"Nk": Nk, "triton_ms": t, "copy_ms": t_copy, "sdpa_ms": best, "GBps": nbytes / (t * 1e-3) / 1e9,
               "frac_copy": t_copy / t, "ratio_sdpa": best / t}
        rows.append(row)
        print(f"  decode 1 x {Nk} keys, GQA 32/8, D=128: {t * 1e3:.1f} us, {row['GBps']:.0f} GB/s = "
              f"{100 * row['frac_copy']:.0f}% of copy bandwidth, x{row['ratio_sdpa']:.2f} vs best SDPA", flush=True)
    return rows


def write_table(out_dir, res):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_gpu.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    lines = [f"# bench_gpu on {res['device']} (torch {torch.__version__}, triton {res['triton']})", "",
             "## correctness (err / limit)", ""]
    lines += [f"- {'ok' if r['ok'] else 'FAIL'} {r['case']}: {', '.join(r['errors'])}" for r in res["correctness"]]
    lines += ["", "## dense / causal, bf16, H=16, B·N=16k", "",
              "| D | N | causal | fwd ms | fwd TFLOP/s | fwd x best SDPA | fwd+bwd ms | fwd+bwd TFLOP/s "
              "| x best SDPA |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["timing"]:
        lines.append(f"| {r['D']} | {r['N']} | {r['causal']} | {r['triton_f']:.3f} | {r['tflops_f']:.0f} | "
                     f"{r['ratio_f']:.2f} | {r['triton_fb']:.3f} | {r['tflops_fb']:.0f} | {r['ratio_fb']:.2f} |")
    lines += ["", "## window / documents vs compiled FlexAttention, D=128", "",
              "| mask | N | fwd ms | x flex | fwd+bwd ms | x flex |", "|---|---|---|---|---|---|"]
    for r in res["flex"]:
        lines.append(f"| {r['mask']} | {r['N']} | {r['triton_f']:.3f} | {r['ratio_f']:.2f} | {r['triton_fb']:.3f} | "
                     f"{r['ratio_fb']:.2f} |")
    lines += ["", "## decode (1 token, GQA 32/8, D=128)", "", "| Nk | us | GB/s | % copy bw | x best SDPA |",
              "|---|---|---|---|---|"]
    for r in res["decode"]:
        lines.append(f"| {r['Nk']} | {r['triton_ms'] * 1e3:.1f} | {r['GBps']:.0f} | {100 * r['frac_copy']:.0f} | "
                     f"{r['ratio_sdpa']:.2f} |")
    with open(os.path.join(out_dir, "bench_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out_dir}/bench_gpu.md and bench_gpu.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    ap.add_argument("--quick", action="store_true", help="fewer lengths")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_gpu_out"), help="directory for the table")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny correctness cases on CPU through triton's "
                    "interpreter (TRITON_INTERPRET=1 SELFATTN_TRITON_ON_CPU=1): checks this script, not speed")
    a = ap.parse_args(argv)
    if a.cpu_smoke:
        global DEV
        DEV = "cpu"
        ensure_registered()
        res = [check_case("smoke causal GQA", 1, 4, 2, 33, 40, 16, mask=masks.causal()),
               check_case("smoke bias+alibi+softcap, dropout", 1, 2, 2, 20, 30, 16, mask=masks.causal(),
                          bias_shape=(1, 2, 20, 30), mod=scores.alibi(num_heads=2) >> scores.softcap(5.0),
                          dropout_p=0.2),
               check_case("smoke decode", 1, 4, 2, 1, 70, 16)]
        return 0 if all(r["ok"] for r in res) else 1
    if a.dry_run or not torch.cuda.is_available():
        if not torch.cuda.is_available():
            print("no CUDA device: nothing to measure (the plan follows)")
        print(__doc__)
        print(f"triton kernel: {'available' if tk.available() else tk._IMPORT_ERROR}")
        return 0
    if not tk.available():
        print(f"triton unavailable: {tk._IMPORT_ERROR}")
        return 1
    import triton
    ensure_registered()
    t0 = time.time()
    dev = torch.cuda.get_device_name()
    print(f"device {dev}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    res = {"device": dev, "triton": triton.__version__}
    print("correctness:", flush=True)
    res["correctness"] = [] if a.skip_correctness else correctness()
    print(f"timing (after {time.time() - t0:.0f} s):", flush=True)
    res["decode"] = timing_decode()
    res["timing"] = timing(a.quick, t0)
    res["flex"] = timing_flex(t0)
    write_table(a.out, res)
    print(f"total {time.time() - t0:.0f} s")
    return 0 if all(r["ok"] for r in res["correctness"]) else 1


if __name__ == "__main__":
    sys.exit(main())
