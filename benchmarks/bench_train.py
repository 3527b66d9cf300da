"""Training throughput (issue 20): tokens/s of a full training step (forward, backward, AdamW) of the small GPT
of ``selfattn.train`` on selfattn's kernels against the same model, same weights, same batches, with torch's
``F.scaled_dot_product_attention`` (``GPT.set_attention("sdpa")``), measured in the same run.

Cases (the issue's targets):
1. seq 256, full causal attention: at least 1.0x;
2. seq 4096 with a sliding window of 256 keys: at least 1.5x (SDPA has no window: it gets a dense (N, N) bool
   mask, computes every score and takes the slow masked path; selfattn visits only the band's tiles).

    .venv/bin/python benchmarks/bench_train.py                       # both cases, torch's default threads
    .venv/bin/python benchmarks/bench_train.py --threads 2 --steps 5
    .venv/bin/python benchmarks/bench_train.py --tiny                # seconds: checks the script runs

Timing: after one warm-up step each, --steps interleaved rounds (one selfattn step, one SDPA step, ...); the
median step time of each gives tokens/s = batch · seq / time. Both models start from the same weights and see
the same batches; their parameters drift apart (different rounding), which does not change the work done.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from selfattn.train import GPT, GPTConfig


def step_fn(model: GPT, opt, x, y):
    def step():
        logits = model(x)  # (B, N, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_case(name: str, cfg: GPTConfig, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    ours = GPT(cfg)
    base = copy.deepcopy(ours).set_attention("sdpa")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=g)
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len), generator=g)
    fns = {}
    for label, m in (("selfattn", ours), ("sdpa", base)):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        fns[label] = step_fn(m, opt, x, y)
    for fn in fns.values():  # warm-up: allocations, thread pools, AdamW state
        fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    tok = batch * cfg.max_seq_len
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "tokens": tok, **{f"{k}_tok_s": tok / v for k, v in med.items()},
            "speedup": med["sdpa"] / med["selfattn"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per contender (default 5)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script runs, numbers mean nothing")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    d, L, H = (32, 1, 2) if args.tiny else (256, 4, 8)
    cases = [("seq 256, causal", GPTConfig(vocab_size=256, n_layer=L, n_head=H, d_model=d, max_seq_len=64 if args.tiny
                                           else 256), 4 if args.tiny else 16),
             ("seq 4096, causal window 256", GPTConfig(vocab_size=256, n_layer=L, n_head=H, d_model=d,
                                                       max_seq_len=256 if args.tiny else 4096,
                                                       window=32 if args.tiny else 256), 1)]
    print(f"GPT: {L} layers, {H} heads, d_model {d}, RoPE, MLP; AdamW step; float32; {torch.get_num_threads()} "
          f"threads; median of {args.steps} interleaved steps")
    print(f"{'case':<30} {'tokens/step':>11} {'selfattn tok/s':>15} {'SDPA tok/s':>12} {'speedup':>8}")
    for name, cfg, batch in cases:
        r = bench_case(name, cfg, batch, args.steps)
        print(f"{name:<30} {r['tokens']:>11} {r['selfattn_tok_s']:>15,.0f} {r['sdpa_tok_s']:>12,.0f} "
              f"{r['speedup']:>7.2f}x")


if __name__ == "__main__":
    main()
