"""Tiny causal Llama (2 layers, hidden 256, 8 query / 2 KV heads) through the transformers backend vs
attn_implementation="sdpa", one thread, interleaved: prefill of N=2048 tokens (use_cache=False) and greedy generation
of 128 tokens from a 16-token prompt (median of the rounds; tokens compared).

    .venv/bin/python benchmarks/bench_transformers_llama.py
"""
import copy, os, statistics, time, torch, transformers as T
from selfattn.integrations.transformers import register
torch.set_num_threads(1); register()
cfg = T.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
ms = {}
for impl in ("sdpa", "selfattn"):
    torch.manual_seed(0); ms[impl] = T.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0))
pt = {i: [] for i in ms}; gt = {i: [] for i in ms}; outs = {}
with torch.no_grad():
    for i in ms: ms[i](ids[:, :64])
    for r in range(3):
        for i in (ms if r % 2 == 0 else list(ms)[::-1]):
            t = time.perf_counter(); ms[i](ids, use_cache=False); pt[i].append(time.perf_counter() - t)
    for r in range(4):
        for i in (ms if r % 2 == 0 else list(ms)[::-1]):
            t = time.perf_counter(); outs[i] = ms[i].generate(ids[:, :16], max_new_tokens=128, do_sample=False, min_new_tokens=128); gt[i].append(time.perf_counter() - t)
print("load", os.getloadavg()[0], "1 thread, tiny Llama 2 layers h256 8q/2kv")
for i in ms:
    print(i, "prefill N=2048 median %.3f s" % statistics.median(pt[i]), "generate 128 median %.3f s" % statistics.median(gt[i]))
print("prefill sdpa/selfattn %.2fx, generate %.2fx, same tokens %s" % (statistics.median(pt["sdpa"]) / statistics.median(pt["selfattn"]), statistics.median(gt["sdpa"]) / statistics.median(gt["selfattn"]), bool(torch.equal(outs["sdpa"], outs["selfattn"]))))
