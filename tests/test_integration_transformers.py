"""selfattn as a transformers backend (attn_implementation="selfattn") against transformers' own "eager" and "sdpa".

Tiny random-weight models built from configs (no downloads). Outputs are compared at real positions only: a padded
query row that sees no key gives 0 under selfattn, where eager gives a uniform average of masked values (it never
reaches a real position). Tolerance: fp32 relative max error ≤ 1e-5 (the models are O(1); the error of a plain
fp32 implementation against fp64 is ~1e-7 here), fp64 ≤ 1e-12. Every test registers with check_masks=True, so every
mask built is also compared against transformers' dense evaluation of the same mask_function.
"""
import copy
import subprocess
import sys

import pytest
import torch
import transformers as T
from transformers import masking_utils as mu

import selfattn.integrations.transformers as sa_hf
from selfattn import masks

FP32_TOL, FP64_TOL = 1e-5, 1e-12


@pytest.fixture(autouse=True)
def _registered():
    sa_hf.register(check_masks=True)
    yield
    sa_hf.register()


def rel_err(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def assert_close(got, ref, tol=FP32_TOL, what=""):
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    err = rel_err(got, ref)
    assert err <= tol, f"{what}: relative max error {err:.3g} > {tol:g}"


def build(cfg, cls, impls=("eager", "selfattn"), dtype=torch.float32, seed=0):
    """The same random weights under several attention implementations: {impl: model}."""
    torch.manual_seed(seed)
    models = {}
    for impl in impls:
        m = cls.from_config(copy.deepcopy(cfg), attn_implementation=impl).to(dtype).eval()
        if models:
            m.load_state_dict(next(iter(models.values())).state_dict())
        assert m.config._attn_implementation == impl
        models[impl] = m
    return models


def padded(B=2, N=150, vocab=100, left=True, pad=9, seed=1):
    """(ids, attention_mask): row 1 padded by `pad` tokens on the left (or right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, N), generator=g)
    am = torch.ones(B, N, dtype=torch.long)
    if left:
        am[1, :pad] = 0
    else:
        am[1, N - pad:] = 0
    return ids, am


LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def causal_lm_parity(cfg, left=True, impls=("eager", "sdpa", "selfattn"), N=150):
    ms = build(cfg, T.AutoModelForCausalLM, impls)
    ids, am = padded(N=N, left=left)
    real = am.bool()
    with torch.no_grad():
        out = {k: m(ids, attention_mask=am).logits for k, m in ms.items()}
    for ref in impls[:-1]:
        assert_close(out["selfattn"][real], out[ref][real], what=f"logits vs {ref}")
    return ms, ids, am


# -- registration ----------------------------------------------------------------------------------------------
def test_register_idempotent_and_both_interfaces():
    assert sa_hf.register() == "selfattn"
    assert sa_hf.register() == "selfattn"
    assert T.AttentionInterface._global_mapping["selfattn"] is sa_hf.attention_forward
    assert mu.AttentionMaskInterface._global_mapping["selfattn"] is sa_hf.mask_interface
    ms = build(T.LlamaConfig(**LLAMA), T.AutoModelForCausalLM, ("eager",))
    m = ms["eager"]
    ids, am = padded(N=30)
    with torch.no_grad():
        before = m(ids, attention_mask=am).logits
        m.set_attn_implementation("selfattn")
        assert m.config._attn_implementation == "selfattn"
        after = m(ids, attention_mask=am).logits
    assert_close(after[am.bool()], before[am.bool()], what="after set_attn_implementation")


def test_transformers_imported_only_by_the_integration():
    code = "import sys, selfattn, selfattn.integrations; print('transformers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


# -- model families: logits vs eager and sdpa on padded batches -----------------------------------------------------
@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_llama_gqa_padded(left):
    causal_lm_parity(T.LlamaConfig(**LLAMA), left=left)


def test_llama_float64():
    # against sdpa: eager's softmax runs in float32 whatever the model's dtype
    ms = build(T.LlamaConfig(**LLAMA), T.AutoModelForCausalLM, ("sdpa", "selfattn"), dtype=torch.float64)
    ids, _ = padded()
    with torch.no_grad():
        a, b = (ms[k](ids).logits for k in ("sdpa", "selfattn"))
    assert_close(b, a, FP64_TOL, "float64 logits")


def test_qwen2_padded():
    cfg = T.Qwen2Config(**LLAMA)
    causal_lm_parity(cfg)


def test_gpt2_padded():
    cfg = T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                       eos_token_id=2)
    causal_lm_parity(cfg)


def test_mistral_sliding_window_padded():
    ms, _, _ = causal_lm_parity(T.MistralConfig(**LLAMA, sliding_window=16))
    # the window reaches the kernel as structure: most tiles skipped, nothing dense
    bm = sa_hf.mask_interface(batch_size=1, q_length=4096, kv_length=4096,
                              mask_function=mu.sliding_window_causal_mask_function(256))
    assert bm.dense_parts == () and isinstance(bm.mask, masks.SlidingWindow) and bm.mask.left == 255


def test_gemma2_softcap_sliding():
    cfg = T.Gemma2Config(**LLAMA, head_dim=16, sliding_window=16, attn_logit_softcapping=5.0,
                         final_logit_softcapping=30.0)
    causal_lm_parity(cfg, impls=("eager", "selfattn"), N=70)  # sdpa refuses softcap


@pytest.mark.parametrize("left", [True, False], ids=["left_pad", "right_pad"])
def test_bert_padding(left):
    cfg = T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=256)
    ms = build(cfg, T.AutoModel, ("eager", "sdpa", "selfattn"))
    ids, am = padded(left=left)
    with torch.no_grad():
        out = {k: m(ids, attention_mask=am).last_hidden_state for k, m in ms.items()}
    for ref in ("eager", "sdpa"):
        assert_close(out["selfattn"][am.bool()], out[ref][am.bool()], what=f"hidden vs {ref}")


T5 = dict(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0,
          pad_token_id=0, eos_token_id=1)


def test_t5_position_bias_padded():
    ms = build(T.T5Config(**T5), T.AutoModelForSeq2SeqLM, ("eager", "sdpa", "selfattn"))
    ids, am = padded(N=140, left=False)
    dec = torch.randint(3, 100, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = {k: m(ids, attention_mask=am, decoder_input_ids=dec).logits for k, m in ms.items()}
    for ref in ("eager", "sdpa"):
        assert_close(out["selfattn"], out[ref], what=f"T5 logits vs {ref}")


def test_vit():
    cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      image_size=64, patch_size=4)
    ms = build(cfg, T.AutoModel, ("eager", "sdpa", "selfattn"))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = {k: m(x).last_hidden_state for k, m in ms.items()}  # 257 tokens: the tiled kernel
    for ref in ("eager", "sdpa"):
        assert_close(out["selfattn"], out[ref], what=f"ViT vs {ref}")


WHISPER = dict(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8,
               max_source_positions=80, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
               eos_token_id=2, bos_token_id=1, suppress_tokens=None, begin_suppress_tokens=None)


def test_whisper_logits_and_generate():
    ms = build(T.WhisperConfig(**WHISPER), T.AutoModelForSpeechSeq2Seq, ("eager", "sdpa", "selfattn"))
    x = torch.randn(2, 8, 160, generator=torch.Generator().manual_seed(4))
    dec = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = {k: m(x, decoder_input_ids=dec).logits for k, m in ms.items()}
    for ref in ("eager", "sdpa"):
        assert_close(out["selfattn"], out[ref], what=f"Whisper vs {ref}")
    g = {k: ms[k].generate(x, max_new_tokens=8, do_sample=False) for k in ("eager", "selfattn")}
    assert torch.equal(g["selfattn"], g["eager"])


# -- generation with caches ----------------------------------------------------------------------------------------
def greedy(ms, ids, am, n=32, cache=None):
    return {k: m.generate(ids, attention_mask=am, max_new_tokens=n, do_sample=False, cache_implementation=cache,
                          pad_token_id=0) for k, m in ms.items()}


@pytest.mark.parametrize("family,extra", [("llama", {}), ("mistral", {"sliding_window": 16}),
                                          ("gemma2", {"sliding_window": 16, "head_dim": 16,
                                                      "attn_logit_softcapping": 5.0})])
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_generate_greedy_identical(family, extra, cache):
    cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "gemma2": T.Gemma2Config}[family]
    ms = build(cls(**LLAMA, **extra), T.AutoModelForCausalLM, ("eager", "selfattn"))
    ids, am = padded(N=20, pad=5)  # 20 + 32 tokens pass the window of 16
    g = greedy(ms, ids, am, cache=cache)
    assert torch.equal(g["selfattn"], g["eager"])


def test_t5_generate_static_and_dynamic():
    ms = build(T.T5Config(**T5), T.AutoModelForSeq2SeqLM, ("eager", "selfattn"))
    ids, am = padded(N=40, left=False)
    for cache in (None, "static"):
        g = greedy(ms, ids, am, n=16, cache=cache)
        assert torch.equal(g["selfattn"], g["eager"]), cache


def test_gpt2_generate():
    cfg = T.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1,
                       eos_token_id=2)
    ms = build(cfg, T.AutoModelForCausalLM, ("eager", "selfattn"))
    ids, am = padded(N=20, pad=5)
    g = greedy(ms, ids, am)
    assert torch.equal(g["selfattn"], g["eager"])


def test_dropout_in_training_only():
    ms = build(T.LlamaConfig(**LLAMA, attention_dropout=0.3), T.AutoModelForCausalLM, ("selfattn",))
    m = ms["selfattn"]
    ids, am = padded(N=40)
    with torch.no_grad():
        ev = m(ids, attention_mask=am).logits
        m.train()
        torch.manual_seed(0)
        t1 = m(ids, attention_mask=am).logits
        torch.manual_seed(0)
        t2 = m(ids, attention_mask=am).logits
    assert torch.equal(t1, t2)  # the pattern follows torch's global RNG
    assert rel_err(t1[am.bool()], ev[am.bool()]) > 1e-3


# -- packed sequences ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_sequences_stay_apart(family):
    cfg = (T.LlamaConfig(**LLAMA) if family == "llama" else T.MistralConfig(**LLAMA, sliding_window=16))
    ms = build(cfg, T.AutoModelForCausalLM, ("eager", "selfattn"))
    lengths = [37, 90, 23]
    ids = torch.randint(3, 100, (1, sum(lengths)), generator=torch.Generator().manual_seed(6))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 150): positions restart per document
    with torch.no_grad():
        # transformers detects packing only without a cache (use_cache=False, as in training)
        packed = ms["selfattn"](ids, position_ids=pos, use_cache=False).logits
        start = 0
        for n in lengths:
            alone = ms["eager"](ids[:, start:start + n]).logits
            assert_close(packed[:, start:start + n], alone, what=f"document at {start}")
            start += n
    bm = sa_hf.mask_interface(batch_size=1, q_length=150, kv_length=150,
                              mask_function=mu.and_masks(
                                  mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos),
                                  mu.packed_sequence_mask_function(mu.find_packed_sequence_indices(pos))))
    assert bm.dense_parts == ()  # documents as structure, not a dense tensor


# -- output_attentions and gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gemma2", "bert"])
def test_output_attentions_equal_eager(family):
    if family == "bert":
        cfg = T.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=256)
        ms = build(cfg, T.AutoModel)
    else:
        cfg = (T.LlamaConfig(**LLAMA) if family == "llama" else
               T.Gemma2Config(**LLAMA, head_dim=16, sliding_window=16, attn_logit_softcapping=5.0))
        ms = build(cfg, T.AutoModelForCausalLM)
    ids, am = padded(N=150)
    with torch.no_grad():
        out = {k: m(ids, attention_mask=am, output_attentions=True).attentions for k, m in ms.items()}
    assert len(out["selfattn"]) == 2
    for a, b in zip(out["eager"], out["selfattn"]):
        assert b.dtype == a.dtype and b.shape == a.shape == (2, cfg.num_attention_heads, 150, 150)
        assert_close(b[0], a[0], what="weights, unpadded row")
        assert_close(b[1, :, 9:], a[1, :, 9:], what="weights, real queries of the padded row")


def test_output_attentions_static_cache_step():
    ms = build(T.LlamaConfig(**LLAMA), T.AutoModelForCausalLM)
    ids, am = padded(N=20, pad=5)
    for k, m in ms.items():
        cache = T.StaticCache(config=m.config, max_cache_len=64)
        with torch.no_grad():
            m(ids, attention_mask=am, cache=cache)
            am2 = torch.cat([am, torch.ones(2, 1, dtype=am.dtype)], 1)
            ms[k] = m(ids[:, -1:], attention_mask=am2, cache=cache, output_attentions=True).attentions
    for a, b in zip(ms["eager"], ms["selfattn"]):
        assert b.shape == a.shape == (2, 8, 1, 64)  # the static tail: weight 0, as eager
        assert_close(b, a, what="decode-step weights")


def lm_labels(ids, am):
    """Labels a causal LM may be scored on: a token counts when it and the token before it are real (the logit
    predicting it sits at the previous position, which must not be a padded row)."""
    prev = torch.nn.functional.pad(am[:, :-1], (1, 0), value=1)
    return ids.masked_fill((am == 0) | (prev == 0), -100)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_gradients_equal_eager(family):
    if family == "llama":
        ms = build(T.LlamaConfig(**LLAMA, attention_dropout=0.0), T.AutoModelForCausalLM)
        ids, am = padded(N=150)
        kw = dict(attention_mask=am, labels=lm_labels(ids, am))
    else:
        ms = build(T.T5Config(**T5, dropout_rate=0.0), T.AutoModelForSeq2SeqLM)
        ids, am = padded(N=140, left=False)
        kw = dict(attention_mask=am, labels=torch.randint(3, 100, (2, 30), generator=torch.Generator().manual_seed(7)))
    grads = {}
    for k, m in ms.items():
        m.train()
        loss = m(ids, **kw).loss
        loss.backward()
        grads[k] = (loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert_close(grads["selfattn"][0], grads["eager"][0], what="loss")
    assert grads["selfattn"][1].keys() == grads["eager"][1].keys()
    for n, g in grads["eager"][1].items():
        assert_close(grads["selfattn"][1][n], g, 3 * FP32_TOL, what=f"grad {n}")


# -- masks: recognized as structure, or evaluated densely; never dropped ------------------------------------------
def ref_dense(bm, fn, padding=None, use_vmap=False):
    return mu.sdpa_mask(batch_size=bm.batch_size, q_length=bm.q_length, kv_length=bm.kv_length,
                        q_offset=bm.q_offset, kv_offset=bm.kv_offset, mask_function=fn, attention_mask=padding,
                        allow_is_causal_skip=False, use_vmap=use_vmap)


def got_dense(bm):
    B, Nq, Nk, K = bm.batch_size, bm.q_length, bm.kv_length, bm.keys
    d = (torch.ones(B, 1, Nq, K, dtype=torch.bool) if bm.mask is None else
         bm.mask.dense(B, 1, Nq, K).expand(B, 1, Nq, K))
    return torch.nn.functional.pad(d, (0, Nk - K), value=False)


PAD = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
GROUPS = torch.tensor([[-1, -1, 0, 0, 0, -1, 1, 1, -1, -1, -1, -1, 2, 2, 2, 2, -1, -1, -1, -1]] * 2)
CASES = {  # name: (mask_function, q_length, kv_length, q_offset, kv_offset, padding)
    "causal": (mu.causal_mask_function, 20, 20, 0, 0, PAD),
    "causal_dynamic_cache": (mu.causal_mask_function, 3, 20, 17, 0, PAD),
    "causal_static_cache": (mu.causal_mask_function, 3, 64, 12, 0, PAD),
    "window": (mu.sliding_window_causal_mask_function(5), 20, 20, 0, 0, PAD),
    "window_dynamic_cache": (mu.sliding_window_causal_mask_function(5), 1, 5, 19, 15, PAD),
    "window_static_cache_filling": (mu.sliding_window_causal_mask_function(8), 2, 8, 3, 0, PAD),
    "window_static_cache_full": (mu.sliding_window_causal_mask_function(8), 2, 9, 10, 3, PAD),
    "bidirectional": (mu.bidirectional_mask_function, 20, 20, 0, 0, PAD),
    "bidirectional_window": (mu.sliding_window_bidirectional_mask_function(3), 20, 20, 0, 0, PAD),
    "cross_attention": (mu.bidirectional_mask_function, 7, 20, 0, 0, PAD),
    "chunked": (mu.chunked_causal_mask_function(4, torch.tensor([2, 0])), 20, 20, 0, 0, PAD),
    "chunked_cache": (mu.chunked_causal_mask_function(4, torch.tensor([2, 0])), 2, 20, 18, 0, PAD),
    "blockwise": (mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(GROUPS)), 20, 20, 0, 0, PAD),
    "no_padding": (mu.causal_mask_function, 20, 20, 0, 0, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_mask_patterns_structured_and_exact(name):
    fn, Nq, Nk, qo, ko, pad = CASES[name]
    bm = sa_hf.mask_interface(batch_size=2, q_length=Nq, kv_length=Nk, q_offset=qo, kv_offset=ko,
                              mask_function=fn, attention_mask=pad)
    assert bm.dense_parts == (), bm.dense_parts
    assert torch.equal(got_dense(bm), ref_dense(bm, fn, pad).expand(2, 1, Nq, Nk))
    if name == "causal_static_cache":
        assert bm.keys == 15  # the unwritten tail is cut, not computed
    ph = bm.with_phantom_key()  # the same pattern behind an always-visible sink key
    d = ph.dense(2, 1, Nq, bm.keys + 1).expand(2, 1, Nq, bm.keys + 1)
    assert d[..., 0].all() and torch.equal(d[..., 1:], got_dense(bm)[..., :bm.keys])


def test_unrecognized_mask_function_evaluated_densely():
    def odd_keys(b, h, q, kv):  # a user's pattern selfattn cannot know
        return (kv % 2 == 1) | (kv == q)
    fn = mu.and_masks(mu.causal_mask_function, odd_keys)
    bm = sa_hf.mask_interface(batch_size=2, q_length=20, kv_length=20, mask_function=fn, attention_mask=PAD,
                              use_vmap=True)
    assert len(bm.dense_parts) == 1 and "odd_keys" in bm.dense_parts[0]  # only the unknown part is dense
    assert torch.equal(got_dense(bm), ref_dense(bm, fn, PAD, use_vmap=True).expand(2, 1, 20, 20))


def test_padded_batch_mask_never_dropped():
    """Padding changes the real positions' logits under every backend (so a dropped mask would show) and
    selfattn equals eager on them."""
    ms = build(T.LlamaConfig(**LLAMA), T.AutoModelForCausalLM)
    ids, am = padded(N=40, pad=9, left=False)
    real = am.bool()
    with torch.no_grad():
        a = ms["eager"](ids, attention_mask=am).logits
        b = ms["selfattn"](ids, attention_mask=am).logits
        ids2, am2 = padded(N=40, pad=9, left=True)
        bl = ms["selfattn"](ids2, attention_mask=am2).logits
        unmasked = ms["eager"](ids2).logits
    assert_close(b[real], a[real], what="right-padded")
    assert rel_err(bl[am2.bool()], unmasked[am2.bool()]) > 1e-2  # the left padding was honoured
    assert_close(bl[am2.bool()], ms["eager"](ids2, attention_mask=am2).logits.detach()[am2.bool()])


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_user_4d_mask_passes_as_tensor(kind):
    ms = build(T.LlamaConfig(**LLAMA), T.AutoModelForCausalLM)
    N = 30
    g = torch.Generator().manual_seed(8)
    allowed = (torch.rand(2, 1, N, N, generator=g) > 0.3) | torch.eye(N, dtype=torch.bool)
    m4 = allowed if kind == "bool" else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
    if kind == "float":
        m4 = m4 + torch.rand(2, 1, N, N, generator=g)  # a genuine additive bias, not only 0/−inf
    ids = torch.randint(3, 100, (2, N), generator=g)
    with torch.no_grad():
        eager_mask = m4 if kind == "float" else torch.where(allowed, 0.0, torch.finfo(torch.float32).min)
        a = ms["eager"](ids, attention_mask=eager_mask).logits
        b = ms["selfattn"](ids, attention_mask=m4).logits
    assert_close(b, a, what=f"{kind} 4-D mask")


def test_attention_sinks_gpt_oss_forward_and_gradients():
    cfg = T.GptOssConfig(**LLAMA, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                         attention_dropout=0.0)
    ms = build(cfg, T.AutoModelForCausalLM)
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for layer_e, layer_s in zip(ms["eager"].model.layers, ms["selfattn"].model.layers):
            layer_e.self_attn.sinks.copy_(torch.randn(layer_e.self_attn.sinks.shape, generator=g))
            layer_s.self_attn.sinks.copy_(layer_e.self_attn.sinks)
    ids, am = padded(N=60)
    real = am.bool()
    with torch.no_grad():  # inference: the sink merged by LSE
        out = {k: m(ids, attention_mask=am, output_attentions=True) for k, m in ms.items()}
    assert_close(out["selfattn"].logits[real], out["eager"].logits[real], what="logits with sinks")
    assert_close(out["selfattn"].attentions[0][0], out["eager"].attentions[0][0], what="weights with sinks")
    grads = {}
    for k, m in ms.items():  # training: the sink as one more key, gradients exact
        m.train()
        m(ids, attention_mask=am, labels=lm_labels(ids, am)).loss.backward()
        grads[k] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    for n, gr in grads["eager"].items():
        assert_close(grads["selfattn"][n], gr, 3 * FP32_TOL, what=f"grad {n}")


def test_capture_chosen_heads_and_rows_of_an_hf_model():
    """selfattn.inspect.capture on a Hugging Face model under the backend: per layer, the chosen heads' and rows'
    exact weights (no N×N per head kept) equal eager's output_attentions at those heads and rows."""
    import transformers as T
    from selfattn.inspect import capture
    from selfattn.integrations.transformers import register
    register()
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    eager = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ours = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="selfattn").eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = eager(ids, output_attentions=True).attentions
    cap = capture(ours, {"input_ids": ids}, heads=[1, 3], rows=[0, 17, 39])
    assert len(cap.layers) == 2
    for lc, w in zip(cap.layers, want):
        assert lc.weights.shape == (1, 2, 3, 40)
        ref = w[:, [1, 3]][:, :, [0, 17, 39]]
        assert (lc.weights - ref).abs().max() < 1e-5


# -- weights collected the way transformers decides it (issue 17) ------------------------------------------------
GPT2 = dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def test_gpt2_output_attentions_one_tensor_per_layer_equal_eager():
    """GPT2Model.forward does not pass output_attentions to its layers: transformers collects the weights with
    hooks on the attention modules, so the backend must return them whenever the collector asks."""
    ms = build(T.GPT2Config(**GPT2), T.AutoModelForCausalLM)
    ids, am = padded(N=40, pad=5)
    with torch.no_grad():
        out = {k: m(ids, attention_mask=am, output_attentions=True).attentions for k, m in ms.items()}
    assert len(out["selfattn"]) == len(out["eager"]) == 2
    for a, b in zip(out["eager"], out["selfattn"]):
        assert b.dtype == a.dtype and b.shape == a.shape == (2, 4, 40, 40)
        assert_close(b[0], a[0], what="weights, unpadded row")
        assert_close(b[1, :, 5:], a[1, :, 5:], what="weights, real queries of the padded row")
    with torch.no_grad():  # not asked: none computed
        assert not ms["selfattn"](ids, attention_mask=am).attentions


def test_whisper_attentions_requested_through_the_config():
    """Whisper's layers pass output_attentions=False explicitly; config.output_attentions=True still collects
    every encoder, decoder and cross-attention layer's weights, equal to eager."""
    ms = build(T.WhisperConfig(**WHISPER, output_attentions=True), T.AutoModelForSpeechSeq2Seq)
    x = torch.randn(2, 8, 160, generator=torch.Generator().manual_seed(4))
    dec = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = {k: m(x, decoder_input_ids=dec) for k, m in ms.items()}
    for field in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        ref, got = getattr(out["eager"], field), getattr(out["selfattn"], field)
        assert len(got) == len(ref) == 2, field
        for a, b in zip(ref, got):
            assert b.shape == a.shape
            assert_close(b, a, what=field)


def test_gpt2_assisted_generation_with_attentions():
    """Assisted decoding reads one attention tensor per layer (it used to fail with an IndexError)."""
    ms = build(T.GPT2Config(**GPT2), T.AutoModelForCausalLM)
    draft = build(T.GPT2Config(**{**GPT2, "n_layer": 1}), T.AutoModelForCausalLM, seed=1)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    g = {}
    for k, m in ms.items():
        g[k] = m.generate(ids, assistant_model=draft[k], max_new_tokens=8, do_sample=False, output_attentions=True,
                          return_dict_in_generate=True)
    assert torch.equal(g["selfattn"].sequences, g["eager"].sequences)
    assert len(g["selfattn"].attentions) == len(g["eager"].attentions)
    for a, b in zip(g["eager"].attentions, g["selfattn"].attentions):
        assert len(b) == len(a) == 2
        for x, y in zip(a, b):
            assert_close(y, x, what="assisted-decoding weights")


_COMPILED_FN = mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(4))


def _keys_plus(x):
    bm = sa_hf.mask_interface(1, 8, 8, mask_function=_COMPILED_FN)
    return x + bm.keys


def test_mask_interface_then_compile():
    """The mask function's table of transformers' factories is keyed so that dynamo can guard on it: calling the
    mask interface once eagerly, then compiling a caller, works (it failed with InternalTorchDynamoError). The
    debugging switch check_masks (transformers' own dense evaluation) stays off: it is not what users compile."""
    sa_hf.register()
    eager = sa_hf.mask_interface(1, 8, 8, mask_function=_COMPILED_FN)
    torch._dynamo.reset()
    got = torch.compile(_keys_plus, fullgraph=True)(torch.zeros(2))
    assert torch.equal(got, torch.full((2,), float(eager.keys)))
