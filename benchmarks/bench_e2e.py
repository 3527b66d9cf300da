"""What users run, against what they already have (issue 19, item 5): each target beside its baseline measured in
the same run, the ratio and the goal.

1. gpt2: GPT-2-small-shaped model (124M parameters, random weights), greedy generation of 128 new tokens from a
   16-token prompt, batch 1, KV cache, against transformers' GPT2LMHeadModel.generate on the same weights (goal
   >= 1.5x), and as a fraction of the weight-streaming limit (goal >= 60%): the fp32 weight bytes one token reads
   (every parameter once, the tied embedding as the head; wpe gives one row) / the read bandwidth of a 256 MiB sum
   measured in the same run.
2. minilm: all-MiniLM-L6-v2 sentence embeddings of 64 sentences (forward + mean pooling + normalization; the
   tokenization both share is excluded) against transformers' BertModel from the same directory (goal >= 1.2x).
3. llama: a small Llama (2 layers, hidden 256, 8 query / 2 KV heads) under transformers with
   attn_implementation="selfattn" against "sdpa", greedy generation of 128 tokens from 16 (goal >= 1.0x).

    .venv/bin/python benchmarks/bench_e2e.py                        # torch's default threads, wall clock
    .venv/bin/python benchmarks/bench_e2e.py --threads 1 --clock cpu  # on a loaded machine: the thread's CPU time

Timing: best of --repeats runs after a warm-up, contenders interleaved, under torch.inference_mode. --clock cpu
reads time.thread_time (needs --threads 1): time the process was descheduled by other load does not count,
memory contention still does. Prints the load average and CPU model with the results.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import selfattn

NEW_TOKENS = 128


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def compare(fns: dict, repeats: int, clock) -> dict:
    """Best-of-``repeats`` seconds per contender after one warm-up call each, interleaved (A B A B ...)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return best


def bench_gpt2(repeats: int, clock) -> list:
    from _util import gpt2_small
    ref, ours, ids = gpt2_small()
    # bytes one decode step reads: every weight once (the tied wte as the head), one row of wpe
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters()) \
        - ours.wpe.weight.numel() * ours.wpe.weight.element_size()
    src = torch.randn(64 << 20)  # 256 MiB: far beyond the caches, like the 0.5 GB of weights

    fns = {"selfattn": lambda: selfattn.models.generate(ours, ids, NEW_TOKENS),
           "transformers": lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=50256),
           "read 256 MiB": lambda: src.sum()}
    with torch.inference_mode():
        same = torch.equal(fns["selfattn"](), fns["transformers"]())
        t = compare(fns, repeats, clock)
    bw = src.numel() * 4 / t["read 256 MiB"]
    limit = weight_bytes / bw  # seconds per token if weights streamed at the read bandwidth
    per_tok = {k: t[k] / NEW_TOKENS for k in ("selfattn", "transformers")}
    print(f"\n[gpt2] GPT-2-small shape (124M, random weights), prompt 16, {NEW_TOKENS} new tokens greedy, batch 1; "
          f"tokens identical: {same}")
    print(f"  read bandwidth {bw / 1e9:.1f} GB/s; {weight_bytes / 1e6:.0f} MB of fp32 weights per token -> "
          f"streaming limit {limit * 1e3:.2f} ms/token")
    for k, v in per_tok.items():
        print(f"  {k:12s} {v * 1e3:7.2f} ms/token  {limit / v * 100:5.1f}% of the streaming limit")
    return [("gpt2 generate vs transformers", per_tok["selfattn"], per_tok["transformers"], 1.5, same),
            ("gpt2 fraction of streaming limit", None, None, 0.60, limit / per_tok["selfattn"])]


def bench_minilm(repeats: int, clock) -> list:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from selfattn.models.bert import mean_pool, sentence_embeddings
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_models import SENTENCES
    path = selfattn.models.minilm_path()
    ours = selfattn.models.load(path)
    ref = transformers.AutoModel.from_pretrained(str(path)).eval()
    tok = selfattn.models.load_tokenizer(path)
    texts = [SENTENCES[i % len(SENTENCES)] + " " * (i // len(SENTENCES)) for i in range(64)]
    batch = tok(texts)
    ids, am = batch["input_ids"], batch["attention_mask"]
    fns = {"selfattn": lambda: sentence_embeddings(ours, ids, am),
           "transformers": lambda: F.normalize(mean_pool(ref(input_ids=ids, attention_mask=am).last_hidden_state,
                                                         am), dim=-1)}
    with torch.inference_mode():
        cos = F.cosine_similarity(fns["selfattn"](), fns["transformers"]()).min().item()
        t = compare(fns, repeats, clock)
    print(f"\n[minilm] all-MiniLM-L6-v2 sentence embeddings, 64 sentences padded to {ids.shape[1]} tokens "
          f"({int(am.sum())} real), transformers attn_implementation={ref.config._attn_implementation}; "
          f"min cosine {cos:.7f}")
    print(f"  selfattn {t['selfattn'] * 1e3:8.1f} ms   transformers {t['transformers'] * 1e3:8.1f} ms")
    return [("minilm encode 64 vs transformers", t["selfattn"], t["transformers"], 1.2, cos > 0.99999)]


def bench_llama(repeats: int, clock) -> list:
    import transformers as T
    from selfattn.integrations.transformers import register
    register()
    cfg = T.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    models = {}
    for impl in ("selfattn", "sdpa"):
        torch.manual_seed(0)
        models[impl] = T.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))

    def gen(m):
        return lambda: m.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    fns = {impl: gen(m) for impl, m in models.items()}
    with torch.inference_mode():
        same = torch.equal(fns["selfattn"](), fns["sdpa"]())
        t = compare(fns, repeats, clock)
    print(f"\n[llama] transformers Llama (2 layers, hidden 256, 8q/2kv), {NEW_TOKENS} tokens greedy from 16; "
          f"tokens identical: {same}")
    print(f"  selfattn {t['selfattn'] * 1e3:8.1f} ms   sdpa {t['sdpa'] * 1e3:8.1f} ms")
    return [("llama backend generate vs sdpa", t["selfattn"], t["sdpa"], 1.0, same)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["gpt2", "minilm", "llama"], action="append",
                    help="run only these parts (repeatable); default all")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: time.perf_counter; cpu: time.thread_time (one thread only)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu measures the calling thread only: pass --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {cpu_model()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, clock {args.clock}; load average before "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    for part, fn in (("gpt2", bench_gpt2), ("minilm", bench_minilm), ("llama", bench_llama)):
        if not args.only or part in args.only:
            rows += fn(args.repeats, clock)
    print(f"\nload average after {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'target':36s} {'selfattn':>10s} {'baseline':>10s} {'ratio':>7s} {'goal':>6s}  met")
    for name, ours, base, goal, extra in rows:
        if ours is None:  # a fraction, not a ratio of times
            print(f"{name:36s} {'':>10s} {'':>10s} {extra:7.2f} {goal:6.2f}  {'yes' if extra >= goal else 'NO'}")
            continue
        ratio = base / ours
        note = "" if extra is True else "  (outputs differ!)"
        print(f"{name:36s} {ours * 1e3:8.2f}ms {base * 1e3:8.2f}ms {ratio:6.2f}x {goal:5.2f}x  "
              f"{'yes' if ratio >= goal else 'NO'}{note}")


if __name__ == "__main__":
    main()
