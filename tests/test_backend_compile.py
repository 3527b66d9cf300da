"""Models on the transformers backend (attn_implementation="selfattn") under torch.compile(fullgraph=True).

Tiny random-weight models built from configs (no downloads), one or two layers so that tracing stays short. The
compiled forward is compared with the same model's uncompiled forward at real positions (a padded query row sees
no key; both give it the same value, but only real rows are what a model is for). Dynamo's "eager" backend runs
the traced graph with the ops themselves: it checks tracing (no graph break, no host read of tensor data) without
a C++ compile; one test compiles with inductor. Tolerance as in test_integration_transformers.py: fp32 relative
max error <= 1e-5 (under compile a sliding-window layer's mask is evaluated densely, which changes which tiles
are skipped, so the sums may be ordered differently).
"""
import copy

import pytest
import torch
import transformers as T

import selfattn.integrations.transformers as sa_hf

FP32_TOL = 1e-5

LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
T5 = dict(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
WHISPER = dict(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8,
               max_source_positions=80, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
               eos_token_id=2, bos_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)
GPT2 = dict(vocab_size=100, n_embd=64, n_layer=1, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
FAMILIES = {  # name: (config, model class)
    "llama": lambda: (T.LlamaConfig(**LLAMA), T.AutoModelForCausalLM),
    "mistral": lambda: (T.MistralConfig(**LLAMA, sliding_window=8), T.AutoModelForCausalLM),  # window < N
    "qwen2": lambda: (T.Qwen2Config(**LLAMA), T.AutoModelForCausalLM),
    # two layers: one sliding, one global; scores capped
    "gemma2": lambda: (T.Gemma2Config(**{**LLAMA, "num_hidden_layers": 2}, head_dim=16, sliding_window=8,
                                      attn_logit_softcapping=5.0), T.AutoModelForCausalLM),
    "gpt2": lambda: (T.GPT2Config(**GPT2), T.AutoModelForCausalLM),
    "t5": lambda: (T.T5Config(**T5), T.AutoModelForSeq2SeqLM),
    "whisper": lambda: (T.WhisperConfig(**WHISPER), T.AutoModelForSpeechSeq2Seq),
}


@pytest.fixture(autouse=True)
def _registered():
    # check_masks (transformers' dense evaluation compared on the host) is a debugging switch and reads data:
    # it stays off here, as it is for users
    sa_hf.register()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def model(family):
    cfg, cls = FAMILIES[family]()
    torch.manual_seed(0)
    return cls.from_config(copy.deepcopy(cfg), attn_implementation="selfattn").eval()


def forward_and_inputs(family, N=16, pad=5):
    """(the function to compile, its keyword inputs, the real query positions (B, Nq) bool): row 1 left-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (2, N), generator=g)
    am = torch.ones(2, N, dtype=torch.long)
    am[1, :pad] = 0
    m = model(family)
    if family == "t5":  # encoder padded; the decoder's queries all real
        dec = ids[:, :6]
        return m.forward, dict(input_ids=ids, attention_mask=am, decoder_input_ids=dec), torch.ones_like(dec).bool()
    if family == "whisper":  # the decoder alone, its own tokens padded, cross-attending to encoder states
        enc = torch.randn(2, 10, 64, generator=g)
        return m.model.decoder.forward, dict(input_ids=ids, attention_mask=am, encoder_hidden_states=enc), am.bool()
    return m.forward, dict(input_ids=ids, attention_mask=am), am.bool()


def out_of(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_compiles_fullgraph_with_padding(family):
    fn, kw, real = forward_and_inputs(family)
    with torch.no_grad():
        ref = out_of(fn(**kw))
        got = out_of(torch.compile(fn, fullgraph=True, backend="eager")(**kw))
    assert got.shape == ref.shape
    err = rel_err(got[real], ref[real])
    assert err <= FP32_TOL, f"{family}: compiled vs eager, relative max error {err:.3g}"


def test_explain_finds_no_graph_break():
    fn, kw, _ = forward_and_inputs("gemma2")  # softcap, a sliding layer and a global one, padding
    with torch.no_grad():
        ex = torch._dynamo.explain(fn)(**kw)
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_inductor_forward_equals_eager():
    fn, kw, real = forward_and_inputs("llama")
    with torch.no_grad():
        ref = fn(**kw).logits
        got = torch.compile(fn, fullgraph=True, backend="inductor")(**kw).logits
    err = rel_err(got[real], ref[real])
    assert err <= FP32_TOL, f"inductor vs eager, relative max error {err:.3g}"


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_static_cache_generation_compiled_fullgraph_once(family):
    """transformers' own compiled decoding: generate() with a static cache builds each step's mask ahead (eagerly,
    the cache length as a tensor offset) and runs the decode step through a fullgraph-compiled forward. Tokens
    equal the uncompiled run's, and the step compiles once: the compiled forward reads only what every step shares
    (a mask reading the step's key count made dynamo compile again at every token)."""
    m = model(family)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 100, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :4] = 0  # left padding (T5: its encoder's keys)
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, cache_implementation="static", pad_token_id=0)
    ref = m.generate(ids, **kw)
    cc = T.CompileConfig(fullgraph=True, backend="eager", mode=None, dynamic=False)
    cc._compile_all_devices = True  # transformers compiles the step by itself on GPUs; on a CPU it is asked to
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = m.generate(ids, compile_config=cc, **kw)
    assert getattr(m, "_compiled_call", None) is not None, "generate did not compile the forward"
    assert torch.equal(got, ref)


def test_static_cache_forward_compiled_prefill_and_step():
    """A compiled forward that builds its own masks with a static cache (the cache length reaches mask_interface
    inside the trace as a tensor offset): a padded prefill and one decode step equal the uncompiled run's."""
    m = model("llama")
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 100, (2, 12), generator=g)
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :4] = 0

    def run(fn):
        cache = T.StaticCache(config=m.config, max_cache_len=24)
        prefill = fn(input_ids=ids, attention_mask=am, past_key_values=cache).logits  # (2, 12, V)
        am2 = torch.cat([am, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = fn(input_ids=prefill[:, -1:].argmax(-1), attention_mask=am2, past_key_values=cache).logits
        return prefill, step

    with torch.no_grad():
        ref = run(m.forward)
        got = run(torch.compile(m.forward, fullgraph=True, backend="eager"))
    real = am.bool()
    assert rel_err(got[0][real], ref[0][real]) <= FP32_TOL
    assert rel_err(got[1], ref[1]) <= FP32_TOL


def test_forward_and_backward_compiled_equal_eager():
    """Training-style compile (aot_eager: the backward traced too) of T5 with padding: the position bias reaches
    the attention op as a differentiable tensor; loss and every parameter's gradient equal the uncompiled run's."""
    fn, kw, _ = forward_and_inputs("t5")
    params = [p for p in fn.__self__.parameters() if p.requires_grad]

    def loss(**kw):
        return (fn(**kw).logits.float() ** 2).mean()

    ref = loss(**kw)
    ref_g = torch.autograd.grad(ref, params, allow_unused=True)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(**kw)
    got_g = torch.autograd.grad(got, params, allow_unused=True)
    assert rel_err(got, ref) <= FP32_TOL
    bias = fn.__self__.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert got_g[[q is bias for q in params].index(True)] is not None  # its gradient flows through the op
    for p, a, b in zip(params, got_g, ref_g):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) <= FP32_TOL
