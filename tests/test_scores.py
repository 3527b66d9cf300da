"""Score modifiers: ALiBi slopes and BLOOM equivalence, T5 buckets and bias against transformers, softcap,
composition, per-tile evaluation, validation, and every modifier through the tiled kernel by the oracle rule
(forward, LSE, gradients including the bias tensor's, learned slopes' and the T5 table's).

Shape legend: B batch, H heads, Nq queries, Nk keys, D head dim, Tq/Tk tile sizes.
"""
import math

import pytest
import torch
from oracle import check_attention
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.t5.configuration_t5 import T5Config
from transformers.models.t5.modeling_t5 import T5Attention

import selfattn
from selfattn import masks as M
from selfattn import scores as S

SMALL = dict(block_q=32, block_k=64)


def as_bias(mod, B, H, Nq, Nk, dtype=torch.float64):
    """A modifier's additive effect as a dense (1|B, H, Nq, Nk) tensor (tests only)."""
    s = torch.zeros(1, H, Nq, Nk, dtype=dtype)
    return mod(s, torch.arange(Nq)[:, None], torch.arange(Nk)[None, :])


# -- ALiBi -----------------------------------------------------------------------------------------------------
def hf_slopes(H):
    # BLOOM's alibi for a row of ones at position 1 is exactly the slope
    return build_alibi_tensor(torch.ones(1, 2), H, torch.float32).view(H, 2)[:, 1]


@pytest.mark.parametrize("H", [1, 2, 3, 5, 6, 8, 12, 16, 20, 24, 40, 64, 80, 112])
def test_alibi_slopes_match_hf(H):
    ours = S.alibi_slopes(H)
    assert ours.shape == (H,) and ours.dtype == torch.float64
    # HF raises a float32-rounded base to float32 powers: a few ulp from the exact slopes
    torch.testing.assert_close(ours.float(), hf_slopes(H), rtol=1e-6, atol=0)


def test_alibi_slopes_paper_values():
    assert S.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # 12 heads: the 8 slopes of 8 heads, then the odd powers of 2^(-8/16) = 2^(-1/2)
    assert S.alibi_slopes(12).tolist()[8:] == pytest.approx([2 ** (-k / 2) for k in (1, 3, 5, 7)], rel=1e-15)


@pytest.mark.parametrize("B,H,N", [(2, 12, 113), (1, 8, 17)])
def test_alibi_causal_matches_bloom(B, H, N):
    """Ours: slope·(k − q); BLOOM: slope·k. They differ by slope·q per row, which softmax ignores."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, 32, generator=g, dtype=torch.float64) for _ in range(3))
    hf = build_alibi_tensor(torch.ones(B, N, dtype=torch.long), H, torch.float64).view(B, H, 1, N)
    want = selfattn.attention(q, k, v, M.causal(), bias=hf, kernel="reference")
    # build_alibi_tensor computes slope·position in float32 whatever dtype it is asked for: agreement is to
    # float32 rounding of the bias (~1e-7 relative of values up to ~60), not to float64 precision
    for kernel in ("reference", "tiled"):
        got = selfattn.attention(q, k, v, M.causal(), bias=S.alibi(), kernel=kernel, **SMALL)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-5)
    # and the bias itself is BLOOM's minus a per-row constant
    diff = as_bias(S.alibi(), 1, H, N, N) - hf[:1]
    torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), rtol=0, atol=2e-5)


def test_alibi_q_offset_invariance_when_decoding():
    """Causal decoding, Nq < Nk: the row constant that q_offset shifts changes nothing."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 5, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 4, 40, 16, generator=g, dtype=torch.float64) for _ in range(2))
    a = selfattn.attention(q, k, v, M.causal(), bias=S.alibi(), kernel="tiled", block_q=4, block_k=8)
    b = selfattn.attention(q, k, v, M.causal(), bias=S.alibi(q_offset=35), kernel="tiled", block_q=4, block_k=8)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_alibi_symmetric_and_explicit_slopes():
    b = as_bias(S.alibi([0.5, 0.25], symmetric=True), 1, 2, 4, 6)
    want = -torch.tensor([0.5, 0.25], dtype=torch.float64)[:, None, None] * \
        (torch.arange(6)[None, :] - torch.arange(4)[:, None]).abs()
    torch.testing.assert_close(b[0], want)
    b = as_bias(S.alibi(num_heads=4, q_offset=2), 1, 4, 3, 5)
    want = S.alibi_slopes(4)[:, None, None] * (torch.arange(5)[None, :] - torch.arange(3)[:, None] - 2)
    torch.testing.assert_close(b[0], want)


# -- T5 ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (64, 256), (8, 20), (6, 7)])
def test_t5_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-3000, 3001)[None, :] + torch.tensor([0, 1])[:, None]  # (2, 6001) every boundary
    ours = S.relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    hf = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, hf)


@pytest.mark.parametrize("is_decoder,Nq,Nk,past", [(False, 37, 37, 0), (True, 37, 37, 0), (True, 3, 40, 37)])
def test_t5_bias_matches_transformers_compute_bias(is_decoder, Nq, Nk, past):
    cfg = T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=32,
                   relative_attention_max_distance=20, is_decoder=is_decoder)
    att = T5Attention(cfg, has_relative_attention_bias=True)
    with torch.no_grad():
        att.relative_attention_bias.weight.normal_()
    hf = att.compute_bias(Nq, Nk, past_seen_tokens=past).detach()  # (1, H, Nq, Nk)
    mod = S.t5_relative(att.relative_attention_bias.weight.detach(), bidirectional=not is_decoder,
                        num_buckets=32, max_distance=20, q_offset=past)
    assert torch.equal(as_bias(mod, 1, 4, Nq, Nk, torch.float32), hf)


def test_modifiers_are_evaluated_per_tile():
    """A tile's modified scores equal the same slice of the whole-matrix call (no N×N state)."""
    table = torch.randn(32, 3)
    for mod in (S.alibi(), S.alibi(symmetric=True, q_offset=4), S.t5_relative(table, True),
                S.t5_relative(table, False, q_offset=9), S.softcap(2.0), S.alibi() >> S.softcap(3.0)):
        s = torch.randn(2, 3, 70, 90, dtype=torch.float64)
        full = mod(s, torch.arange(70)[:, None], torch.arange(90)[None, :]).expand(2, 3, 70, 90)
        tile = mod(s[:, :, 33:61, 7:70], torch.arange(33, 61)[:, None], torch.arange(7, 70)[None, :])
        torch.testing.assert_close(tile.expand(2, 3, 28, 63), full[:, :, 33:61, 7:70], rtol=0, atol=0)


# -- softcap and composition --------------------------------------------------------------------------------------
def test_softcap_values():
    s = torch.tensor([[[[-100.0, -1.0, 0.0, 1.0, 100.0]]]], dtype=torch.float64)
    got = S.softcap(5.0)(s, None, None)
    torch.testing.assert_close(got, 5.0 * torch.tanh(s / 5.0))
    assert got.abs().max() <= 5.0


def test_compose_order_and_flattening():
    a, c = S.alibi(), S.softcap(2.0)
    s = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    qi, ki = torch.arange(5)[:, None], torch.arange(7)[None, :]
    torch.testing.assert_close((a >> c)(s, qi, ki), c(a(s, qi, ki), qi, ki))
    assert not torch.allclose((a >> c)(s, qi, ki), (c >> a)(s, qi, ki))
    table = torch.randn(32, 2, requires_grad=True)
    chain = S.compose(a, S.compose(c, S.t5_relative(table)))
    assert len(chain.mods) == 3 and chain.parameters() == (table,)
    assert "alibi" in repr(chain) and "softcap" in repr(chain)


# -- through the kernel, by the oracle rule ----------------------------------------------------------------------
def t5(H=8, bidirectional=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return S.t5_relative(torch.randn(32, H, generator=g, dtype=dtype).requires_grad_(True), bidirectional,
                         32, 64)


CASES = [
    ("alibi", lambda: S.alibi(), None, 113, 203),
    ("alibi_causal_decode", lambda: S.alibi(), M.causal(), 17, 113),
    ("alibi_learned_slopes", lambda: S.alibi(S.alibi_slopes(8).float().requires_grad_(True)), M.causal(), 203, 203),
    ("alibi_symmetric_window", lambda: S.alibi(symmetric=True), M.sliding_window(40, 40), 203, 113),
    ("t5_encoder", lambda: t5(), None, 113, 113),
    ("t5_decoder_causal", lambda: t5(bidirectional=False), M.causal(), 203, 203),
    ("t5_padding", lambda: t5(seed=1), M.key_padding([0, 60]), 17, 113),
    ("softcap", lambda: S.softcap(1.5), None, 1, 203),
    ("softcap_causal", lambda: S.softcap(0.7), M.causal(), 203, 17),
    ("tensor_bias_alibi_t5_softcap", lambda: [(1, 8, 113, 1), S.alibi(), t5(seed=2), S.softcap(3.0)],
     M.causal() & M.sliding_window(50), 113, 203),
    ("pair_bias_documents", lambda: [(2, 8, 113, 113)], M.document(M.document_ids([40, 0, 73])), 113, 113),
    ("row_bias_t5_prefix", lambda: [(2, 1, 1, 203), t5(seed=3)], M.prefix_lm([30, 100]), 203, 203),
]


@pytest.mark.parametrize("name,mod_fn,mask,Nq,Nk", CASES, ids=[c[0] for c in CASES])
def test_modifier_fp32_oracle(name, mod_fn, mask, Nq, Nk):
    bias = mod_fn()
    res = check_attention(2, 8, 2, Nq, Nk, 16, mask=mask, bias=bias, **SMALL)
    params = [n for n in res.grads if n.startswith("dparam") or n == "dbias"]
    wants = isinstance(bias, list) and isinstance(bias[0], tuple)
    wants = wants or any(p.requires_grad for b in (bias if isinstance(bias, list) else [bias])
                         if isinstance(b, S.ScoreMod) for p in b.parameters())
    assert bool(params) == wants, f"{name}: gradients checked for {params}"


def test_t5_table_grad_fp64_agrees():
    """float64 through the tiled kernel agrees with the reference to 1e-10, the table's gradient included."""
    mod = t5(dtype=torch.float64)
    res = check_attention(1, 8, 2, 113, 203, 16, dtype=torch.float64, mask=M.causal(), bias=[(1, 8, 113, 203), mod],
                          **SMALL)
    assert "dparam0" in res.grads and res.grads["dparam0"].abs().sum() > 0


def test_table_grad_is_exact_sum_over_buckets():
    """d loss / d table[b, h] = sum of dS over the entries in bucket b: check with the reference's autograd."""
    table = torch.randn(32, 4, dtype=torch.float64, requires_grad=True)
    mod = S.t5_relative(table, bidirectional=True, num_buckets=32, max_distance=64)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 70, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = selfattn.attention(q, k, v, bias=mod, kernel="tiled", block_q=16, block_k=32)
    (gt,) = torch.autograd.grad(out.square().sum(), table)
    dense = as_bias(mod, 1, 4, 70, 70).detach().requires_grad_(True)
    out2 = selfattn.attention(q, k, v, bias=dense, kernel="reference")
    (gd,) = torch.autograd.grad(out2.square().sum(), dense)  # (1, 4, 70, 70) dS
    buckets = S.relative_position_bucket(torch.arange(70)[None, :] - torch.arange(70)[:, None], True, 32, 64)
    want = torch.zeros(32, 4, dtype=torch.float64).index_add_(0, buckets.flatten(),
                                                                 gd[0].permute(1, 2, 0).reshape(-1, 4))
    torch.testing.assert_close(gt, want, rtol=1e-10, atol=1e-12)


# -- validation ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,exc,words", [
    (lambda: S.alibi("x"), TypeError, "slopes"),
    (lambda: S.alibi([0.5, "a"]), TypeError, "slopes"),
    (lambda: S.alibi(torch.ones(2, 2)), ValueError, "(H,)"),
    (lambda: S.alibi(torch.tensor([1, 2])), ValueError, "float"),
    (lambda: S.alibi([0.5, float("nan")]), ValueError, "finite"),
    (lambda: S.alibi([0.5, 0.25], num_heads=3), ValueError, "num_heads"),
    (lambda: S.alibi(num_heads=0), ValueError, "num_heads"),
    (lambda: S.alibi(symmetric=1), TypeError, "symmetric"),
    (lambda: S.alibi(q_offset=-1), ValueError, "q_offset"),
    (lambda: S.alibi_slopes(2.0), TypeError, "num_heads"),
    (lambda: S.t5_relative([[0.0]]), TypeError, "table"),
    (lambda: S.t5_relative(torch.zeros(16, 4)), ValueError, "num_buckets=32"),
    (lambda: S.t5_relative(torch.zeros(32, 4, dtype=torch.long)), ValueError, "float"),
    (lambda: S.t5_relative(torch.zeros(2, 4), True, 2), ValueError, "num_buckets"),
    (lambda: S.t5_relative(torch.zeros(32, 4), True, 32, 8), ValueError, "max_distance"),
    (lambda: S.t5_relative(torch.zeros(32, 4), "yes"), TypeError, "bidirectional"),
    (lambda: S.softcap(0.0), ValueError, "softcap"),
    (lambda: S.softcap(float("inf")), ValueError, "softcap"),
    (lambda: S.softcap("1"), TypeError, "softcap"),
    (lambda: S.softcap(True), TypeError, "softcap"),
    (lambda: S.alibi() >> 3, TypeError, "compose"),
])
def test_bad_modifier_args(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    assert words in str(info.value)


@pytest.mark.parametrize("kernel", ["reference", "tiled"])
def test_head_count_mismatch_is_named(kernel):
    q = torch.randn(1, 4, 9, 8)
    for mod, words in ((S.alibi(num_heads=8), "alibi"), (S.t5_relative(torch.zeros(32, 6)), "t5_relative")):
        with pytest.raises(ValueError) as info:
            selfattn.attention(q, q, q, bias=mod, kernel=kernel)
        assert words in str(info.value) and "4" in str(info.value)


def test_all_names_exported():
    for name in ("alibi", "alibi_slopes", "t5_relative", "relative_position_bucket", "softcap", "compose"):
        assert name in S.__all__ and callable(getattr(S, name))
    for name in ("sliding_window", "key_padding", "document", "document_ids", "prefix_lm", "from_tensor", "causal"):
        assert name in M.__all__ and callable(getattr(M, name))
    assert math.isclose(float(S.alibi_slopes(1)[0]), 2 ** -8)
