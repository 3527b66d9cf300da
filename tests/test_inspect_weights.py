"""Exact weights recomputed from the tiled kernel's LSE agree with the reference kernel's materialized weights."""
import pytest
import torch

import selfattn
from selfattn import masks, scores
from selfattn.inspect import attention_weights
from selfattn.kernels.reference import attention_reference
from selfattn.scores import ScoreMod


class PerHeadSlope(ScoreMod):
    """ALiBi-like: s − slope_h·|i − j|, slopes per head (so a modifier that must see every head)."""

    def __init__(self, H):
        self.slopes = torch.linspace(0.1, 1.0, H, dtype=torch.float64)

    def __call__(self, s, q_idx, k_idx):
        return s - self.slopes.to(s.dtype)[:, None, None] * (q_idx - k_idx).abs().to(s.dtype)


def _ref_weights(q, k, v, mask, bias, mod, scale):
    mask = masks.from_tensor(mask) if isinstance(mask, torch.Tensor) else mask
    return attention_reference(q, k, v, mask=mask, bias=bias, score_mod=mod, scale=scale,
                               return_weights=True)[-1]


CASES = [
    # B, Hq, Hkv, Nq, Nk, D, mask, bias, mod, heads, rows
    (2, 8, 2, 113, 203, 40, "causal", False, False, None, None),
    (1, 8, 2, 203, 113, 16, "causal", True, False, [1, 6], [0, 5, 112, 202]),
    (2, 4, 1, 17, 1025, 8, None, False, True, [3], slice(3, 9)),
    (1, 6, 3, 130, 130, 24, "tensor", True, True, [0, 2, 5], None),
    (1, 4, 4, 1, 1023, 8, "causal_top_left", False, False, None, None),
    (2, 8, 4, 33, 33, 16, "padding", False, "alibi", [2, 7], [0, 32]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_weights_match_reference(case, dtype):
    B, Hq, Hkv, Nq, Nk, D, mk, has_bias, has_mod, heads, rows = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    mask = {None: None, "causal": masks.causal(), "causal_top_left": masks.causal("top_left"),
            "tensor": torch.rand(B, Hq, Nq, Nk, generator=g) < 0.7,
            "padding": masks.key_padding(torch.tensor([Nk, Nk // 2]))}[mk]
    if mk == "tensor":
        mask[0, 1, 4] = False  # one empty row: weights 0, no NaN
    bias = torch.randn(1, Hq, Nq, 1, generator=g, dtype=dtype) if has_bias else None
    # "alibi": standard slopes taken from the head count of the scores, so a head subset must not be scored alone
    mod = (scores.alibi() if has_mod == "alibi" else PerHeadSlope(Hq)) if has_mod else None
    scale = 0.3
    bias_arg = [b for b in (bias, mod) if b is not None] or None
    _, lse = selfattn.attention(q, k, v, mask, bias=bias_arg, scale=scale, kernel="tiled", return_lse=True,
                                block_q=64, block_k=128)
    w = attention_weights(q, k, lse, mask, bias=bias_arg, scale=scale, heads=heads, rows=rows, block_k=100)
    hi = torch.arange(Hq) if heads is None else torch.tensor(heads)
    ri = torch.arange(Nq)[rows] if isinstance(rows, slice) else (torch.arange(Nq) if rows is None
                                                                  else torch.tensor(rows))

    def pick(t):
        return t[:, hi][:, :, ri]

    d = torch.float64
    golden = pick(_ref_weights(q.to(d), k.to(d), v.to(d), mask, None if bias is None else bias.to(d), mod, scale))
    assert w.shape == golden.shape and w.dtype == dtype
    assert not torch.isnan(w).any()
    err = (w.to(d) - golden).abs().max().item()
    if dtype == torch.float64:
        assert err <= 1e-12
    else:  # oracle rule (STYLE.md #3): at most 2x the error of the materialized fp32 reference, ~1e-6 floor
        plain = (pick(_ref_weights(q, k, v, mask, bias, mod, scale)).to(d) - golden).abs().max().item()
        assert err <= 2 * plain + 1e-6, (err, plain)
    # every row with an allowed key sums to 1; empty rows are all 0
    valid = torch.isfinite(pick(lse[..., None]))[..., 0]
    sums = w.sum(-1)
    assert torch.all(torch.where(valid, (sums - 1).abs(), sums) < 1e-5)


def test_weights_reject_bad_selection():
    q = torch.randn(1, 4, 8, 8)
    k = torch.randn(1, 2, 8, 8)
    _, lse = selfattn.attention(q, k, k, return_lse=True)
    with pytest.raises(ValueError, match="heads"):
        attention_weights(q, k, lse, heads=[4])
    with pytest.raises(TypeError, match="rows"):
        attention_weights(q, k, lse, rows="all")
    with pytest.raises(ValueError, match="lse"):
        attention_weights(q, k, lse[:, :2])


def test_weights_trace_fullgraph_without_reading_index_values():
    # output_attentions under torch.compile: nothing in the weights path may compare index values on the host
    import torch
    import selfattn
    from selfattn import masks
    from selfattn.inspect import attention_weights
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g), torch.randn(1, 2, 16, 8, generator=g)
    _, lse = selfattn.attention(q, k, v, masks.causal(), return_lse=True)
    f = lambda q, k, lse: attention_weights(q, k, lse, masks.causal())  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, lse)
    assert torch.equal(compiled, f(q, k, lse))
