"""Llama, T5 and ViT against transformers (test-only reference), end to end (STYLE.md #12).

Each family: a tiny transformers model with random weights is saved with ``save_pretrained`` into a temp dir,
``selfattn.models.load`` reads it back, and logits / hidden states must match transformers' eager attention with
float32 relative error <= 1e-5 (max |ours - theirs| / max |theirs|); Llama and T5 must also produce the same 32
greedy tokens as ``transformers.generate(do_sample=False)``, with and without the KV cache.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

import selfattn
from selfattn.models import load
from selfattn.models import llama as sl
from selfattn.models import t5 as st
from selfattn.models import vit as sv
from selfattn.models.generation import generate

REL_TOL = 1e-5
NEW_TOKENS = 32
# transformers' default std 0.02 leaves q·k tiny and attention nearly uniform, so a wrong RoPE theta moves the
# logits by only ~1e-3; at 0.2 the attention pattern matters (the same mistake moves them by ~1)
INIT = 0.2


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    if ours.shape != theirs.shape:
        raise AssertionError(f"shapes differ: ours {tuple(ours.shape)}, transformers {tuple(theirs.shape)}")
    diff = (ours.detach().double() - theirs.detach().double()).abs().max()
    return float(diff / theirs.detach().double().abs().max())


def _save(model, root, name):
    path = root / name
    model.eval()
    model.save_pretrained(path)
    return path


# -- fixtures: tiny random-weight transformers models, saved once per session -------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # models this small gain nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP workers
    # made this module ~10x slower (150 s vs 15 s measured); restored for the modules that follow
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_models")


def _no_eos(model):
    # random weights emit the eos id by chance; both generators must run the full 32 steps
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="session")
def llama_gqa(hf_dir):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=INIT,
                                   attn_implementation="eager")
    m = _no_eos(transformers.LlamaForCausalLM(cfg)).eval()
    return m, _save(m, hf_dir, "llama_gqa")


@pytest.fixture(scope="session")
def llama_tied(hf_dir):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=89, hidden_size=24, intermediate_size=36, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=3, head_dim=12,
                                   max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True,
                                   initializer_range=INIT, attn_implementation="eager")
    m = _no_eos(transformers.LlamaForCausalLM(cfg)).eval()
    return m, _save(m, hf_dir, "llama_tied")


@pytest.fixture(scope="session")
def t5_gated(hf_dir):
    # v1.1 / flan layout: gated-gelu FFN, no decoder-output scaling
    torch.manual_seed(2)
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                decoder_start_token_id=0, attn_implementation="eager")
    m = _no_eos(transformers.T5ForConditionalGeneration(cfg)).eval()
    # transformers 5 ties lm_head to `shared` whatever the config says; a different lm_head is saved as its own
    # tensor (the v1.1 checkpoint layout) and keeps greedy decoding from echoing its input token
    m.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
    return m, _save(m, hf_dir, "t5_gated")


@pytest.fixture(scope="session")
def t5_relu(hf_dir):
    # original T5 layout: relu FFN, tied lm_head with decoder output scaled by d_model**-0.5
    torch.manual_seed(3)
    cfg = transformers.T5Config(vocab_size=83, d_model=24, d_kv=6, d_ff=32, num_layers=2, num_heads=3,
                                relative_attention_num_buckets=16, relative_attention_max_distance=12,
                                feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0,
                                attn_implementation="eager")
    m = _no_eos(transformers.T5ForConditionalGeneration(cfg)).eval()
    with torch.no_grad():
        # with the tied head, a unit-scale embedding dominates the residual stream and greedy decoding repeats the
        # start token forever; a small one lets the layers decide, so the 32-token comparison means something
        m.shared.weight.mul_(0.01)
    return m, _save(m, hf_dir, "t5_relu")


@pytest.fixture(scope="session")
def vit_cls(hf_dir):
    torch.manual_seed(4)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                 image_size=16, patch_size=4, num_channels=3, num_labels=5,
                                 initializer_range=INIT, attn_implementation="eager")
    m = transformers.ViTForImageClassification(cfg).eval()
    return m, _save(m, hf_dir, "vit_cls")


@pytest.fixture(scope="session")
def vit_base(hf_dir):
    torch.manual_seed(5)
    cfg = transformers.ViTConfig(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=30,
                                 image_size=(12, 8), patch_size=4, num_channels=2, qkv_bias=False,
                                 initializer_range=INIT, attn_implementation="eager")
    m = transformers.ViTModel(cfg).eval()
    return m, _save(m, hf_dir, "vit_base")


def _ids(seed, B, N, V):
    # ids from 3 up: 0/1/2 are pad/eos/bos in these configs, and transformers' generate masks pad ids in prompts
    return torch.randint(3, V, (B, N), generator=torch.Generator().manual_seed(seed))


# -- Llama ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama_gqa", "llama_tied"])
def test_llama_logits_match_transformers(which, request):
    hf, path = request.getfixturevalue(which)
    model = load(path)
    assert isinstance(model, sl.Llama)
    ids = _ids(0, 2, 13, hf.config.vocab_size)
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert rel_err(ours, theirs) <= REL_TOL


def test_llama_config_reads_gqa_rope_and_tying(llama_gqa, llama_tied):
    c = load(llama_gqa[1]).config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == (4, 2, 8, 500.0)
    t = load(llama_tied[1])
    assert t.config.tie_word_embeddings and t.lm_head is None and t.config.attention_bias
    assert t.config.head_dim == 12 != t.config.hidden_size // t.config.num_heads


def test_llama_generate_32_greedy_tokens_like_transformers(llama_gqa):
    hf, path = llama_gqa
    model = load(path)
    ids = _ids(1, 2, 7, hf.config.vocab_size)
    theirs = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    cached = generate(model, ids, NEW_TOKENS)
    uncached = generate(model, ids, NEW_TOKENS, use_cache=False)
    assert cached.shape == (2, 7 + NEW_TOKENS)
    assert len(set(cached[:, 7:].flatten().tolist())) >= 4  # a non-degenerate sequence to compare
    assert torch.equal(cached, theirs)
    assert torch.equal(uncached, cached)


def test_llama_kv_cache_chunks_match_full_forward(llama_gqa):
    hf, path = llama_gqa
    model = load(path)
    ids = _ids(2, 2, 12, hf.config.vocab_size)
    caches = selfattn.nn.KVCache.for_model(model.config.num_layers)  # growing
    with torch.no_grad():
        full = model(ids)
        parts = [model(ids[:, a:b], caches=caches) for a, b in ((0, 7), (7, 10), (10, 11), (11, 12))]
    assert rel_err(torch.cat(parts, dim=1), full) <= REL_TOL
    k, v = caches[0].get()
    assert k.shape == (2, 2, 12, 8)  # GQA: the cache holds Hkv = 2 heads, never repeated to 4


def test_llama_right_padding_matches_transformers(llama_gqa):
    hf, path = llama_gqa
    model = load(path)
    ids = _ids(3, 3, 10, hf.config.vocab_size)
    am = torch.ones(3, 10, dtype=torch.long)
    am[1, 6:] = 0
    am[2, 3:] = 0
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=am), hf(ids, attention_mask=am).logits
    real = am.bool()
    assert rel_err(ours[real], theirs[real]) <= REL_TOL


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    torch.manual_seed(6)
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   rope_parameters=rope, initializer_range=INIT, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(cfg).eval()
    model = load(_save(hf, tmp_path, "llama3"))
    assert model.config.rope_type == "llama3"
    ids = _ids(4, 1, 40, 61)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) <= REL_TOL


@pytest.mark.parametrize("rope, match", [({"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "yarn"),
                                          ({"rope_type": "default", "rope_theta": 1e4,
                                            "partial_rotary_factor": 0.5}, "partial_rotary_factor")])
def test_llama_unsupported_config_raises(rope, match):
    hf = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
          "num_attention_heads": 2, "rope_parameters": rope}
    with pytest.raises(ValueError, match=match):
        sl.LlamaConfig.from_hf(hf)


def test_llama_strict_load_lists_unexpected_and_missing(llama_gqa, tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = llama_gqa
    sd = load_file(str(path / "model.safetensors"))
    sd.pop("model.layers.1.mlp.down_proj.weight")
    sd["model.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): layers\.1\.down\.weight.*unexpected keys \(1\): "
                                         r"model\.layers\.0\.self_attn\.rotary\.weight"):
        load(bad)


# -- T5 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["t5_gated", "t5_relu"])
def test_t5_encoder_states_and_logits_match_transformers(which, request):
    hf, path = request.getfixturevalue(which)
    model = load(path)
    assert isinstance(model, st.T5)
    V = hf.config.vocab_size
    ids, dec = _ids(5, 2, 13, V), _ids(6, 2, 9, V)
    with torch.no_grad():
        assert rel_err(model.encode(ids), hf.encoder(input_ids=ids).last_hidden_state) <= REL_TOL
        assert rel_err(model(ids, dec), hf(input_ids=ids, decoder_input_ids=dec).logits) <= REL_TOL


def test_t5_config_variants(t5_gated, t5_relu):
    g, r = load(t5_gated[1]).config, load(t5_relu[1]).config
    assert (g.gated, g.act, g.scale_decoder_outputs, g.num_decoder_layers) == (True, "gelu_new", False, 3)
    assert g.separate_lm_head
    assert (r.gated, r.act, r.scale_decoder_outputs, r.separate_lm_head) == (False, "relu", True, False)


@pytest.mark.parametrize("which", ["t5_gated", "t5_relu"])
def test_t5_generate_32_greedy_tokens_like_transformers(which, request):
    hf, path = request.getfixturevalue(which)
    model = load(path)
    ids = _ids(7, 2, 11, hf.config.vocab_size)
    # transformers 5.24 sizes its decoder cache by num_layers, so with more decoder layers it runs uncached
    hf_cache = hf.config.num_decoder_layers == hf.config.num_layers
    theirs = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=hf_cache)
    cached = generate(model, ids, NEW_TOKENS)
    uncached = generate(model, ids, NEW_TOKENS, use_cache=False)
    assert cached.shape == (2, 1 + NEW_TOKENS) and bool((cached[:, 0] == 0).all())  # decoder start token first
    assert len(set(cached[:, 1:].flatten().tolist())) >= 4  # a non-degenerate sequence to compare
    assert torch.equal(cached, theirs)
    assert torch.equal(uncached, cached)


def test_t5_decoding_computes_cross_kv_once_and_feeds_one_token(t5_relu):
    _, path = t5_relu
    model = load(path)
    calls = {"cross_kv": 0, "self_tokens": []}
    for layer in model.decoder.layers:
        layer.cross_attn.k_proj.register_forward_hook(lambda *a: calls.__setitem__("cross_kv", calls["cross_kv"] + 1))
    model.decoder.layers[0].self_attn.qkv_proj.register_forward_hook(
        lambda mod, inp, out: calls["self_tokens"].append(inp[0].shape[1]))
    generate(model, _ids(8, 1, 6, model.config.vocab_size), 5)
    assert calls["cross_kv"] == len(model.decoder.layers)  # encoder K/V projected once per layer, then reused
    assert calls["self_tokens"] == [1] * 5  # start token, then one new token per step


def test_t5_padded_encoder_matches_transformers(t5_gated):
    hf, path = t5_gated
    model = load(path)
    V = hf.config.vocab_size
    ids, dec = _ids(9, 2, 10, V), _ids(10, 2, 5, V)
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 4:] = 0
    with torch.no_grad():
        ours = model(ids, dec, attention_mask=am)
        theirs = hf(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits
    assert rel_err(ours, theirs) <= REL_TOL


def test_t5_relative_bias_gradient_matches_transformers(t5_relu):
    hf, path = t5_relu
    model = load(path).train()
    V = hf.config.vocab_size
    ids, dec = _ids(11, 2, 9, V), _ids(12, 2, 7, V)
    w = torch.randn(2, 7, V, generator=torch.Generator().manual_seed(0))
    (model(ids, dec) * w).sum().backward()
    hf.zero_grad()
    (hf(input_ids=ids, decoder_input_ids=dec).logits * w).sum().backward()
    for ours, stack in ((model.encoder.relative_bias, hf.encoder), (model.decoder.relative_bias, hf.decoder)):
        theirs = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
        assert rel_err(ours.grad, theirs) <= REL_TOL
    hf.zero_grad()


def test_t5_encoder_only_checkpoint(tmp_path):
    torch.manual_seed(7)
    cfg = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                dropout_rate=0.0, attn_implementation="eager")
    hf = transformers.T5EncoderModel(cfg).eval()
    model = load(_save(hf, tmp_path, "t5_encoder"))
    assert model.decoder is None and not model.config.has_decoder
    ids = _ids(14, 2, 21, 50)  # 21 > max_distance: the logarithmic buckets and the clamp are exercised
    with torch.no_grad():
        assert rel_err(model.encode(ids), hf(input_ids=ids).last_hidden_state) <= REL_TOL
    with pytest.raises(ValueError, match="no decoder"):
        model.decode(ids[:, :1], model.encode(ids))


def _with_config(src, dst, edit):
    """A copy of model directory src whose config.json went through edit(dict) (weights shared by a link)."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def test_transformers_4_config_layouts_load_the_same_models(llama_gqa, t5_gated, tmp_path):
    # checkpoints on the Hub were written by transformers 4.x: rope_theta + rope_scaling instead of
    # rope_parameters; T5 v1.1 / Flan say tie_word_embeddings=false and have no scale_decoder_outputs
    def llama4(c):
        c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
        c["rope_scaling"] = None

    def t5_4(c):
        del c["scale_decoder_outputs"]
        c["tie_word_embeddings"] = False

    for (hf, path), edit in ((llama_gqa, llama4), (t5_gated, t5_4)):
        old, new = load(path), load(_with_config(path, tmp_path / path.name, edit))
        assert new.config == old.config
    t5_small = {"vocab_size": 10, "d_model": 8, "d_kv": 2, "d_ff": 8, "num_layers": 1, "num_heads": 4}
    assert st.T5Config.from_hf(t5_small).scale_decoder_outputs  # v1.0: tied head, scaled decoder output


def _force_kernel(model, kernel):
    for m in model.modules():
        if isinstance(m, selfattn.nn.Attention):
            m.kernel = kernel
    return model


def test_long_inputs_through_the_tiled_kernel_match_transformers(llama_gqa, t5_relu):
    # 600 keys > one 512-key tile: causal tile skipping (Llama) and the T5 bucket modifier applied per tile,
    # beyond max_distance, in encoder self-attention and decoder cross-attention
    hf, path = llama_gqa
    model = _force_kernel(load(path), "tiled")
    ids = _ids(15, 1, 600, hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(model(ids), hf(ids).logits) <= REL_TOL
    hf, path = t5_relu
    model = _force_kernel(load(path), "tiled")
    ids, dec = _ids(16, 1, 600, hf.config.vocab_size), _ids(17, 1, 20, hf.config.vocab_size)
    with torch.no_grad():
        assert rel_err(model(ids, dec), hf(input_ids=ids, decoder_input_ids=dec).logits) <= REL_TOL


# -- ViT -----------------------------------------------------------------------------------------------------------
def test_vit_classifier_hidden_states_and_logits_match_transformers(vit_cls):
    hf, path = vit_cls
    model = load(path)
    assert isinstance(model, sv.ViT) and model.config.num_labels == 5 and model.pooler is None
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model(x)
        assert rel_err(h, hf.vit(x).last_hidden_state) <= REL_TOL
        assert rel_err(model.classify(h), hf(x).logits) <= REL_TOL


def test_vit_model_with_pooler_non_square_matches_transformers(vit_base):
    hf, path = vit_base
    model = load(path)
    assert model.config.pooler and model.classifier is None and model.config.num_patches == 6
    x = torch.randn(2, 2, 12, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h, out = model(x), hf(x)
    assert rel_err(h, out.last_hidden_state) <= REL_TOL
    assert rel_err(model.pool(h), out.pooler_output) <= REL_TOL
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.zeros(1, 2, 8, 12))
    with pytest.raises(ValueError, match="classifier"):
        model.classify(h)


def test_llama_bf16_keeps_rope_frequencies_float32(llama_gqa):
    # rounding inv_freq to bf16 would put the rotation angle pos·f off by ~pos·2^-8 rad at long positions
    m32, m16 = load(llama_gqa[1]), load(llama_gqa[1], dtype=torch.bfloat16)
    a16, a32 = m16.layers[0].attn, m32.layers[0].attn
    assert a16.qkv_proj.weight.dtype == torch.bfloat16
    assert a16.rope_inv_freq.dtype == torch.float32 and torch.equal(a16.rope_inv_freq, a32.rope_inv_freq)
    hf16 = transformers.LlamaForCausalLM.from_pretrained(llama_gqa[1], dtype=torch.bfloat16,
                                                         attn_implementation="eager").eval()
    ids = _ids(13, 1, 100, m32.config.vocab_size)
    with torch.no_grad():
        golden = m32(ids)  # float32 matches transformers to ~1e-7 (tests above): the golden result here
        # oracle rule (STYLE.md #3): our bf16 error at most 2x transformers' own bf16 error
        assert rel_err(m16(ids).float(), golden) <= 2 * rel_err(hf16(ids).logits.float(), golden)
