"""Hugging Face habits in selfattn.models (issue 12): sentence embeddings from text in one call, ViT position
embeddings interpolated for other image sizes, T5 in float16 without overflow. Each against the library users
compare with: sentence-transformers' ``encode``, transformers' ``interpolate_pos_encoding=True``, transformers'
T5 in float16 (its clamping) with float32 as the golden result."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (a test dependency: a missing install must fail, not skip)

import selfattn.models as M  # noqa: E402
from selfattn.models import t5 as st  # noqa: E402
from selfattn.models.bert import embed  # noqa: E402

transformers.logging.set_verbosity_error()

SENTENCES = ["A man is eating food.", "Hi", "Self-attention.",
             "The quick brown fox jumps over the lazy dog, then naps under the old oak tree by the river.",
             "Exact attention in memory linear in the sequence length, tiled over queries and keys."]


def rel_err(ours, theirs) -> float:
    assert ours.shape == theirs.shape, (tuple(ours.shape), tuple(theirs.shape))
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------- sentence embeddings
def test_embed_from_a_path_matches_sentence_transformers():
    import sentence_transformers
    path = M.minilm_path()
    ours = embed(path, SENTENCES, batch_size=2)  # several batches, sorted by length, back in input order
    ref = torch.as_tensor(sentence_transformers.SentenceTransformer(str(path), device="cpu").encode(SENTENCES))
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == torch.float32
    assert F.cosine_similarity(ours, ref, dim=-1).min().item() >= 0.99999
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_embed_with_a_model_object_and_a_single_text():
    path = M.minilm_path()
    model, tok = M.load(path), M.load_tokenizer(path)
    model.train()  # embed runs in eval mode (no dropout) and puts the model back as it was
    a = embed(model, SENTENCES, tokenizer=tok)
    assert model.training
    torch.testing.assert_close(a, embed(model, SENTENCES, tokenizer=tok, batch_size=1), rtol=1e-5, atol=1e-6)
    one = embed(model, "Hi", tokenizer=tok)
    assert one.shape == (384,)  # a str gives one vector, as sentence-transformers' encode does
    torch.testing.assert_close(one, a[1], rtol=1e-5, atol=1e-6)
    assert embed(model, [], tokenizer=tok).shape == (0, 384)
    with pytest.raises(ValueError, match="tokenizer"):
        embed(model, SENTENCES)
    with pytest.raises(ValueError, match="batch_size"):
        embed(model, SENTENCES, tokenizer=tok, batch_size=0)
    with pytest.raises(TypeError, match="texts"):
        embed(model, [1, 2], tokenizer=tok)


# ------------------------------------------------------------------------------- ViT other image sizes
@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    torch.manual_seed(4)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                                 image_size=16, patch_size=4, num_channels=3, initializer_range=0.2,
                                 attn_implementation="eager")
    hf = transformers.ViTModel(cfg).eval()
    path = tmp_path_factory.mktemp("vit")
    hf.save_pretrained(path)
    return hf, M.load(path)


@pytest.mark.parametrize("size", [(24, 24), (12, 20), (9, 31), (16, 16), (4, 4)])
def test_vit_interpolated_positions_match_transformers(vit, size):
    hf, model = vit
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        theirs = hf(pixel_values=x, interpolate_pos_encoding=True)
        ours = model(x, interpolate_pos_encoding=True)
        assert rel_err(ours, theirs.last_hidden_state) <= 1e-5
        assert rel_err(model.pool(ours), theirs.pooler_output) <= 1e-5


def test_vit_other_size_needs_the_flag(vit):
    _, model = vit
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        model(torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match="holds no 4x4 patch"):
        model(torch.randn(1, 3, 3, 24), interpolate_pos_encoding=True)


# ------------------------------------------------------------------------------------------- T5 float16
@pytest.fixture(scope="module")
def t5_outlier(tmp_path_factory):
    """A T5 whose residual stream outgrows float16 (one channel of the first FFN's output scaled by 1e5, the
    outlier pattern of T5 v1.1 / Flan): float32 handles it, unclamped float16 turns it into inf."""
    torch.manual_seed(2)
    cfg = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                                decoder_start_token_id=0, attn_implementation="eager")
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for stack in (hf.encoder, hf.decoder):
            stack.block[0].layer[-1].DenseReluDense.wo.weight[3].mul_(1e5)
    path = tmp_path_factory.mktemp("t5_outlier")
    hf.save_pretrained(path)
    return path


def test_t5_float16_stays_finite_and_close_to_float32(t5_outlier, monkeypatch):
    path = t5_outlier
    m32, m16 = M.load(path), M.load(path, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    ids, dec = torch.randint(1, 99, (2, 9), generator=g), torch.randint(1, 99, (2, 5), generator=g)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 6:] = 0
    peak = []
    hooks = [layer.ff_norm.register_forward_hook(lambda mod, inp, out: peak.append(inp[0].abs().max().item()))
             for layer in m32.encoder.layers]
    with torch.no_grad():
        golden = m32(ids, dec, am)
        for h in hooks:
            h.remove()
        assert max(peak) > torch.finfo(torch.float16).max  # the case is real: float16 cannot hold the stream
        ours = m16(ids, dec, am)
        hf16 = transformers.T5ForConditionalGeneration.from_pretrained(path).half().eval()
        plain = hf16(input_ids=ids, attention_mask=am, decoder_input_ids=dec).logits  # HF's clamps, all float16
        assert ours.dtype == torch.float16 and bool(torch.isfinite(ours).all())
        # the baseline rule (STYLE.md #3): no worse than twice transformers' float16 error against float32
        assert rel_err(ours, golden) <= 2 * rel_err(plain, golden)
        assert rel_err(ours, golden) <= 5e-3
        assert torch.equal(m16.generate(ids, max_new_tokens=8, attention_mask=am),
                           m32.generate(ids, max_new_tokens=8, attention_mask=am))
        monkeypatch.setattr(st, "_clamp_fp16", lambda x: x)  # without the clamp the same model overflows
        assert not bool(torch.isfinite(m16(ids, dec, am)).all())
