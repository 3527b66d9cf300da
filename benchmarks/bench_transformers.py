"""A tiny Mistral-like Hugging Face model (2 layers, hidden 256, 8 query / 2 KV heads, sliding window) run with
attn_implementation="sdpa" and "selfattn" (and "eager") in one process, interleaved: forward time per
implementation and the largest difference to the first one.

    .venv/bin/python benchmarks/bench_transformers.py [--seq 4096] [--window 256] [--threads 1] [--rounds 3]
"""
import argparse
import copy
import os
import statistics
import time

import torch
import transformers as T

from selfattn.integrations.transformers import register


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--impls", default="sdpa,selfattn")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    register()
    cfg = T.MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, sliding_window=a.window,
                          max_position_embeddings=a.seq)
    ids = torch.randint(0, 1000, (1, a.seq), generator=torch.Generator().manual_seed(0))
    impls = a.impls.split(",")
    models = {}
    for impl in impls:
        torch.manual_seed(0)  # same weights for every implementation
        models[impl] = T.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    times = {impl: [] for impl in impls}
    outs = {}
    with torch.no_grad():
        for impl in impls:
            outs[impl] = models[impl].model(ids, use_cache=False).last_hidden_state  # warm-up
        for r in range(a.rounds):
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                t = time.perf_counter()
                models[impl].model(ids, use_cache=False)
                times[impl].append(time.perf_counter() - t)
    base = impls[0]
    print(f"seq {a.seq}, window {a.window}, {a.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    for impl in impls:
        med = statistics.median(times[impl])
        diff = float((outs[impl] - outs[base]).abs().max())
        print(f"{impl:9s} median {med:.3f} s   {statistics.median(times[base]) / med:.2f}x {base}   "
              f"max|diff| vs {base} {diff:.1e}")


if __name__ == "__main__":
    main()
