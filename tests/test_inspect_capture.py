"""Capture from models on selfattn layers, rollout, and agreement with an independent implementation (HF BERT)."""
import pytest
import torch
from torch import nn

from selfattn import masks, models
from selfattn.inspect import capture, rollout, rollout_from_capture
from selfattn.kernels.reference import attention_reference
from selfattn.nn import Attention, record_attention


class Tiny(nn.Module):
    """Two causal GQA layers with RoPE, a cross-attention call, and a padding mask: every record kind."""

    def __init__(self):
        super().__init__()
        self.a = Attention(32, 4, num_kv_heads=2, rope_theta=10000.0, causal=True)
        self.b = Attention(32, 4, num_kv_heads=1, causal=True)
        self.x = Attention(32, 4)

    def forward(self, h, ctx, keep):
        h = h + self.a(h, mask=masks.key_padding(keep))
        h = h + self.b(h)
        return h + self.x(h, context=ctx)


def _inputs(N=13, M=7):
    g = torch.Generator().manual_seed(0)
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, -3:] = False
    return torch.randn(2, N, 32, generator=g), torch.randn(2, M, 32, generator=g), keep


def test_capture_records_every_call_with_exact_weights():
    torch.manual_seed(0)
    model = Tiny().eval()
    h, ctx, keep = _inputs()
    recs = []
    with record_attention(lambda r: recs.append((r.q.detach().clone(), r.k.detach().clone(), r.mask, r.scale))):
        expect_out = model(h, ctx, keep)
    cap = capture(model, (h, ctx, keep), heads=[0, 3], rows=[0, 5, 12], special=[0], topk=3)
    torch.testing.assert_close(cap.output, expect_out)
    assert [lc.name for lc in cap.layers] == ["a", "b", "x"]
    assert [(lc.Hq, lc.Hkv, lc.Nq, lc.Nk) for lc in cap.layers] == [(4, 2, 13, 13), (4, 1, 13, 13), (4, 4, 13, 7)]
    for lc, (q, k, mask, scale) in zip(cap.layers, recs):
        ref = attention_reference(q, k, k, mask=mask, scale=scale, return_weights=True)[-1]  # (B, H, Nq, Nk)
        assert lc.weights.shape == (2, 2, 3, lc.Nk)
        torch.testing.assert_close(lc.weights, ref[:, [0, 3]][:, :, [0, 5, 12]], atol=2e-6, rtol=0)
        assert lc.stats.entropy.shape == (2, 4, 13)  # statistics for every head and row
        assert bool(torch.isfinite(lc.stats.entropy).all())
    # cross-attention: the input's special positions do not index the context, so no special weight there
    assert float(cap.layers[2].stats.special.abs().max()) == 0.0
    assert float(cap.layers[0].stats.special[:, :, 0].min()) > 0.99  # causal row 0 sees only key 0
    rows = cap.head_table()
    assert len(rows) == 12 and rows[0]["name"] == "a"


def test_capture_rejects_bad_selection_and_non_module():
    model = Tiny().eval()
    with pytest.raises(ValueError, match="heads"):
        capture(model, _inputs(), heads=[4])
    with pytest.raises(TypeError, match="model"):
        capture(lambda x: x, torch.zeros(1))


def test_capture_refuses_to_keep_more_weights_than_the_budget(monkeypatch):
    monkeypatch.setenv("SELFATTN_REFERENCE_MAX_BYTES", str(2 * 4 * 13 * 13 * 4 + 100))  # one call's weights
    model = Tiny().eval()
    with pytest.raises(ValueError, match="fewer heads"):
        capture(model, _inputs())
    cap = capture(model, _inputs(), heads=[])  # statistics only: always fits
    assert cap.layers[0].weights.shape == (2, 0, 13, 13) and cap.layers[0].stats.entropy.shape == (2, 4, 13)


def test_rollout_definition():
    g = torch.Generator().manual_seed(3)
    A = [torch.softmax(torch.randn(2, 6, 6, generator=g), -1) for _ in range(3)]
    R = rollout(A)
    eye = torch.eye(6)
    expect = None
    for a in A:
        at = 0.5 * a + 0.5 * eye
        at = at / at.sum(-1, keepdim=True)
        expect = at if expect is None else at @ expect
    torch.testing.assert_close(R[-1], expect)
    for r in R:
        torch.testing.assert_close(r.sum(-1), torch.ones(2, 6))
    # attention that only looks at itself leaves every token its own source
    torch.testing.assert_close(rollout([eye[None]] * 4)[-1], eye[None])
    with pytest.raises(ValueError, match="residual"):
        rollout(A, residual=2.0)


@pytest.fixture(scope="module")
def minilm():
    from tokenizers import Tokenizer
    path = models.minilm_path()
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_padding()
    return path, models.load(path), tok.encode("The quick brown fox jumps over the lazy dog.")


def test_minilm_weights_match_transformers_eager(minilm):
    """Independent check: Hugging Face's eager BERT returns its softmax weights (output_attentions=True)."""
    from transformers import AutoModel
    path, model, enc = minilm
    ids = torch.tensor([enc.ids])
    cap = capture(model, {"input_ids": ids}, mean_heads=True)
    hf = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    with torch.no_grad():
        atts = hf(ids, output_attentions=True).attentions
    assert len(atts) == len(cap.layers) == 6
    for a, lc in zip(atts, cap.layers):
        torch.testing.assert_close(lc.weights, a, atol=2e-5, rtol=0)
        torch.testing.assert_close(lc.head_mean, a.mean(1), atol=2e-5, rtol=0)
    R = rollout_from_capture(cap)
    assert len(R) == 6 and torch.allclose(R[-1].sum(-1), torch.ones(1, len(enc.ids)), atol=1e-5)
