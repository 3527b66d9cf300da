"""Padded batched generation and ``model.generate`` (issues 11 and 12), end to end against transformers.

A batch of prompts of different lengths, padded left or right, must generate exactly the tokens each prompt
generates alone (greedy), with and without the KV cache, for GPT-2 (learned positions), Llama (RoPE, GQA) and
T5 (the encoder's padding in every step's cross-attention); and equal transformers' ``generate(...,
attention_mask=...)`` on the same random-weight model (left padding for the decoder-only models, the side
transformers supports; right padding for T5, as its tokenizer pads).
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (a test dependency: a missing install must fail, not skip)

from selfattn.models import generate, load  # noqa: E402
from selfattn.models.generation import DecoderState  # noqa: E402

transformers.logging.set_verbosity_error()
NEW = 12
# logits far apart (init 0.2, as in test_models_*.py), so greedy choices sit well above rounding noise
INIT = 0.2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: intra-op threads only add barriers on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _no_eos(m):
    m.generation_config.eos_token_id = None  # random weights emit eos by chance: run every step
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=INIT, attn_implementation="eager")
    hf = _no_eos(transformers.GPT2LMHeadModel(cfg)).eval()
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    return hf, load(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=500.0, initializer_range=INIT, attn_implementation="eager")
    hf = _no_eos(transformers.LlamaForCausalLM(cfg)).eval()
    path = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(path)
    return hf, load(path)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    torch.manual_seed(2)
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                decoder_start_token_id=0, attn_implementation="eager")
    hf = _no_eos(transformers.T5ForConditionalGeneration(cfg)).eval()
    # an lm_head of its own keeps greedy decoding from echoing its input (see test_models_llama_t5_vit.py)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model))
    path = tmp_path_factory.mktemp("t5")
    hf.save_pretrained(path)
    return hf, load(path)


def _prompts(V, lengths=(7, 2, 5, 1), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g) for n in lengths]


def _pad(prompts, side):
    """-> ids (B, N) padded with 0 on ``side``, attention_mask (B, N) 1/0."""
    N = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), N, dtype=torch.long)
    am = torch.zeros(len(prompts), N, dtype=torch.long)
    for i, p in enumerate(prompts):
        s = slice(N - len(p), N) if side == "left" else slice(0, len(p))
        ids[i, s], am[i, s] = p, 1
    return ids, am


# ------------------------------------------------------------------------------------- padded == alone
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_padded_decoder_batch_generates_each_prompt_alone(family, side, use_cache, request):
    _, model = request.getfixturevalue(family)
    prompts = _prompts(model.config.vocab_size)
    ids, am = _pad(prompts, side)
    out = generate(model, ids, NEW, attention_mask=am, use_cache=use_cache)
    assert out.shape == (len(prompts), ids.shape[1] + NEW) and torch.equal(out[:, :ids.shape[1]], ids)
    for i, p in enumerate(prompts):
        alone = generate(model, p[None], NEW, use_cache=use_cache)  # (1, len + NEW)
        assert torch.equal(out[i, ids.shape[1]:], alone[0, len(p):]), (i, side)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_t5_batch_generates_each_prompt_alone(t5, side, use_cache):
    _, model = t5
    prompts = _prompts(model.config.vocab_size)
    ids, am = _pad(prompts, side)
    out = generate(model, ids, NEW, attention_mask=am, use_cache=use_cache)
    assert out.shape == (len(prompts), 1 + NEW)
    assert len(set(out[:, 1:].flatten().tolist())) >= 4  # a non-degenerate sequence to compare
    for i, p in enumerate(prompts):
        assert torch.equal(out[i], generate(model, p[None], NEW, use_cache=use_cache)[0]), (i, side)


def test_padding_changes_the_answer_without_the_mask(llama):
    # the test above means something: unmasked, the same padded batch attends to its padding
    _, model = llama
    ids, am = _pad(_prompts(97), "left")
    assert not torch.equal(generate(model, ids, NEW), generate(model, ids, NEW, attention_mask=am))


# --------------------------------------------------------------------------------------- vs transformers
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_greedy_matches_transformers(family, request):
    hf, model = request.getfixturevalue(family)
    ids, am = _pad(_prompts(hf.config.vocab_size, seed=4), "left")
    theirs = hf.generate(ids, attention_mask=am, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(generate(model, ids, NEW, attention_mask=am), theirs)
    assert torch.equal(generate(model, ids, NEW, attention_mask=am, use_cache=False), theirs)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_t5_greedy_matches_transformers(t5, side):
    hf, model = t5
    ids, am = _pad(_prompts(hf.config.vocab_size, seed=5), side)
    theirs = hf.generate(ids, attention_mask=am, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(generate(model, ids, NEW, attention_mask=am), theirs)


def test_prefill_logits_of_a_left_padded_batch_match_transformers(llama):
    # below the greedy tokens: the padded forward (mask + per-row positions) equals HF's logits at real positions
    hf, model = llama
    ids, am = _pad(_prompts(97, seed=6), "left")
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        theirs = hf(ids, attention_mask=am, position_ids=pos).logits
        ours = model(ids, attention_mask=am, position_ids=pos)
    real = am.bool()
    err = (ours[real].double() - theirs[real].double()).abs().max() / theirs[real].double().abs().max()
    assert err <= 1e-5


# ------------------------------------------------------------------------------------ the KV cache grows
def test_cache_grows_one_real_key_per_step(llama):
    _, model = llama
    ids, am = _pad(_prompts(97), "left")
    B, N = ids.shape
    tokens, state = model.start_generation(ids, N + 3, True, attention_mask=am.bool())
    assert isinstance(state, DecoderState)
    model.generation_step(tokens, state)
    for t in range(1, 4):
        keep, pos, last = state.inputs(1)
        assert keep.shape == (B, N + t) and bool(keep[:, N:].all()) and torch.equal(keep[:, :N], am.bool())
        assert torch.equal(pos[:, 0], am.sum(-1) + t - 1)  # each row continues from its own length
        model.generation_step(torch.zeros(B, 1, dtype=torch.long), state)
        assert state.caches[0].length == N + t


# -------------------------------------------------------------------------------------- model.generate
@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_method_delegates_to_the_function(family, request):
    _, model = request.getfixturevalue(family)
    ids, am = _pad(_prompts(90, seed=7), "left")
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, attention_mask=am),
                       generate(model, ids, NEW, attention_mask=am))
    kw = dict(temperature=0.9, top_k=30, top_p=0.95, eos_token_id=5)
    a = model.generate(ids, max_new_tokens=NEW, attention_mask=am, generator=torch.Generator().manual_seed(8), **kw)
    b = generate(model, ids, NEW, attention_mask=am, generator=torch.Generator().manual_seed(8), **kw)
    c = model.generate(ids, max_new_tokens=NEW, attention_mask=am, generator=torch.Generator().manual_seed(8),
                       use_cache=False, **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, max_new_tokens=2, temperature=-1.0)
