"""BERT / MiniLM and GPT-2 against transformers and sentence-transformers (test-only references), generation,
KV cache, and training through selfattn's kernels."""
import os

import pytest
import torch
import torch.nn.functional as F

import selfattn.models as M
from selfattn.models.bert import Bert, sentence_embeddings
from selfattn.models.gpt2 import GPT2, GPT2Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (a test dependency in requirements-dev.txt: a missing install must fail, not skip)
transformers.logging.set_verbosity_error()

SENTENCES = [
    "A man is eating food.",
    "Exact attention in memory linear in the sequence length, forward and backward, tiled over queries and keys.",
    "Hi",
    "The quick brown fox jumps over the lazy dog, then naps under the old oak tree by the river.",
    "Self-attention.",
]


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# --------------------------------------------------------------------------------------------------- MiniLM
def test_minilm_matches_sentence_transformers():
    import sentence_transformers as st_mod
    path = M.minilm_path()
    model, tok = M.load(path), M.load_tokenizer(path)
    assert isinstance(model, Bert) and not model.training
    batch = tok(SENTENCES)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # padding is exercised
    with torch.no_grad():
        ours = sentence_embeddings(model, batch["input_ids"], batch["attention_mask"])
    ref = torch.as_tensor(st_mod.SentenceTransformer(str(path), device="cpu").encode(SENTENCES))
    cos = F.cosine_similarity(ours, ref.to(ours.dtype), dim=-1)
    assert cos.min().item() >= 0.99999, cos
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))


# ----------------------------------------------------------------------------------------------------- BERT
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, type_vocab_size=2)
    ref = transformers.BertModel(cfg).eval()
    path = tmp_path_factory.mktemp("bert")
    ref.save_pretrained(path)
    return ref, path


def test_bert_matches_transformers(tiny_bert):
    ref, path = tiny_bert
    ours = M.load(path)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 21), generator=g)
    am = torch.ones(3, 21, dtype=torch.int64)
    am[1, 15:] = 0
    am[2, 4:] = 0
    tt = torch.randint(0, 2, (3, 21), generator=g)
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=am, token_type_ids=tt)
        h = ours.encode(ids, am, tt)
        assert rel_err(h, r.last_hidden_state) <= 1e-5
        assert rel_err(ours.pool(h), r.pooler_output) <= 1e-5
        assert rel_err(ours.encode(ids), ref(input_ids=ids).last_hidden_state) <= 1e-5  # no mask at all


# ---------------------------------------------------------------------------------------------------- GPT-2
@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    torch.manual_seed(0)
    # initializer_range 0.2: logits far apart, so greedy choices are decided well above rounding noise
    cfg = transformers.GPT2Config(vocab_size=101, n_positions=80, n_embd=32, n_layer=2, n_head=4,
                                  initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    path = tmp_path_factory.mktemp("gpt2")
    ref.save_pretrained(path)
    return ref, path


def test_gpt2_logits_match_transformers(tiny_gpt2):
    ref, path = tiny_gpt2
    ours = M.load(path)
    assert isinstance(ours, GPT2) and ours.lm_head is None  # tied head
    ids = torch.randint(0, 101, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(ids), ref(ids).logits) <= 1e-5


def test_gpt2_greedy_matches_transformers_and_cache(tiny_gpt2):
    ref, path = tiny_gpt2
    ours = M.load(path)
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                            do_sample=False, pad_token_id=0)
    got = M.generate(ours, ids, 32)
    assert got.shape == (2, 41) and torch.equal(got, expected)
    assert torch.equal(M.generate(ours, ids, 32, use_cache=False), got)


def test_gpt2_sampling_with_and_without_cache(tiny_gpt2):
    _, path = tiny_gpt2
    ours = M.load(path)
    ids = torch.randint(1, 101, (3, 5), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.8, top_k=20, top_p=0.9)
    a = M.generate(ours, ids, 20, generator=torch.Generator().manual_seed(7), **kw)
    b = M.generate(ours, ids, 20, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert torch.equal(a, b)
    # eos: a finished row keeps emitting eos, and generation stops once every row has finished
    eos = int(a[0, 5])
    c = M.generate(ours, ids, 20, eos_token_id=eos, generator=torch.Generator().manual_seed(7), **kw)
    assert (c[0, 5:] == eos).all()


def test_gpt2_cache_steps_equal_full_forward(tiny_gpt2):
    _, path = tiny_gpt2
    ours = M.load(path)
    ids = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache()  # growing
        steps = [ours(ids[:, :11], cache)] + [ours(ids[:, i:i + 1], cache) for i in range(11, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_validation(tiny_gpt2):
    _, path = tiny_gpt2
    ours = M.load(path)
    ids = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="top_k"):
        M.generate(ours, ids, 2, top_k=5)  # greedy with top_k is a mistake, not a silent no-op
    with pytest.raises(ValueError, match="input_ids"):
        M.generate(ours, ids[0], 2)
    with pytest.raises(TypeError, match="start_generation"):
        M.generate(torch.nn.Linear(2, 2), ids, 2)
    with pytest.raises(ValueError, match="n_positions"):
        M.generate(ours, ids, 100)


# ------------------------------------------------------------------------------------------------- training
def test_tiny_gpt_learns_to_copy_through_tiled_kernel():
    """Copy 8 random digits after a separator: the second half is only predictable by attending back to the
    first. Chance level is ln(10) = 2.30; the model must reach a loss below 0.1 on the copied half."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~10 ops per tile on 64x16-token batches: thread barriers would cost more than math
    try:
        _train_copy()
    finally:
        torch.set_num_threads(threads)


def _train_copy():
    torch.manual_seed(0)
    T, V = 8, 10
    model = GPT2(GPT2Config(vocab_size=V + 2, n_positions=2 * T + 1, n_embd=64, n_layer=2, n_head=4, dropout=0.0,
                            attn_dropout=0.0))
    for b in model.blocks:
        b.attn.kernel = "tiled"  # forward and backward through the tiled autograd.Function
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        x = torch.randint(2, V + 2, (64, T), generator=g)
        seq = torch.cat([x, torch.ones(64, 1, dtype=torch.int64), x], 1)  # digits, separator 1, digits again
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits[:, T:].reshape(-1, V + 2), seq[:, T + 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) >= 3 and max(losses[-3:]) < 0.1:
            break
    assert losses[0] > 2.0 and max(losses[-3:]) < 0.1, losses[-5:]
