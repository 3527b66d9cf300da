"""Every mask and combination through the tiled kernel, against the float64 reference by the oracle rule
(tests/oracle.py): forward, LSE and gradients, hostile lengths (1, 17, 113, 203, 1025; Nq != Nk both ways), GQA
8:2, small tiles (32 x 64) so most tiles are partial or empty, and the empty rows these masks produce.

Shape legend: B batch, Hq/Hkv heads, Nq queries, Nk keys, D head dim.
"""
import pytest
import torch
from oracle import check_attention

import selfattn
from selfattn import masks as M

SMALL = dict(block_q=32, block_k=64)
SHAPES = [(1, 203), (17, 113), (113, 17), (113, 203), (203, 113), (203, 203)]


def run(mask_fn, Nq, Nk, B=2, dtype=torch.float32, **kw):
    opts = dict(SMALL)
    opts.update(kw)
    return check_attention(B, 8, 2, Nq, Nk, 16, dtype=dtype, mask=mask_fn(B, Nq, Nk), **opts)


def window_causal(B, Nq, Nk):
    return M.sliding_window(20) & M.causal()


def window_both_sides(B, Nq, Nk):
    return M.sliding_window(7, 30)


def window_top_left(B, Nq, Nk):
    return M.sliding_window(50, 3, align="top_left")


def padding_lengths(B, Nq, Nk):
    return M.key_padding([0, Nk // 2 + 1][:B])  # row 0 is padded out entirely: every query row is empty


def padding_bool(B, Nq, Nk):
    g = torch.Generator().manual_seed(Nq * 1000 + Nk)
    keep = torch.rand(B, Nk, generator=g) < 0.6
    keep[:, 0] = True
    return M.key_padding(keep)


def documents_packed(B, Nq, Nk):
    def ids(n, parts):  # lengths proportional to parts, a zero-length document in the middle
        cuts = [n * p // sum(parts) for p in parts[:-1]]
        return M.document_ids(cuts + [0] + [n - sum(cuts)])
    if Nq == Nk:
        return M.document(torch.stack([ids(Nq, [1, 2, 1]), ids(Nq, [3, 1])][:B]))
    return M.document(ids(Nq, [1, 2, 1]), ids(Nk, [1, 2, 1]))


def documents_missing_keys(B, Nq, Nk):
    # the queries hold documents 0, 1, 2; the keys only 0 and 2 (document 1 has length 0 among the keys), so
    # document 1's query rows are empty
    return M.document(M.document_ids([Nq // 3, Nq // 3, Nq - 2 * (Nq // 3)]),
                      M.document_ids([Nk // 2, 0, Nk - Nk // 2]))


def prefix(B, Nq, Nk):
    return M.prefix_lm([5, min(Nk, 90)][:B])


def document_causal(B, Nq, Nk):
    return documents_packed(B, Nq, Nk) & M.causal()


def padding_and_window(B, Nq, Nk):
    return M.key_padding([Nk, max(1, Nk - 40)][:B]) & M.sliding_window(30, 30)


def prefix_or_window(B, Nq, Nk):
    return M.prefix_lm(3) | M.sliding_window(10, 10, "top_left")


def not_causal(B, Nq, Nk):
    return ~M.causal()  # strictly "future" keys: the last query row sees nothing


MASKS = [window_causal, window_both_sides, window_top_left, padding_lengths, padding_bool, documents_packed,
         documents_missing_keys, prefix, document_causal, padding_and_window, prefix_or_window, not_causal]


# every mask on two shapes, rotating so that each shape meets several masks (the suite's time budget is small)
FP32_CASES = [(f, *SHAPES[i % 6]) for i, f in enumerate(MASKS)] + \
             [(f, *SHAPES[(i + 3) % 6]) for i, f in enumerate(MASKS)]


@pytest.mark.parametrize("mask_fn,Nq,Nk", FP32_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_mask_fp32_oracle(mask_fn, Nq, Nk):
    run(mask_fn, Nq, Nk)


@pytest.mark.parametrize("mask_fn,Nq,Nk", [(window_both_sides, 17, 113), (padding_lengths, 113, 203),
                                           (documents_missing_keys, 203, 113), (prefix_or_window, 113, 17)],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_mask_fp64_agrees(mask_fn, Nq, Nk):
    run(mask_fn, Nq, Nk, dtype=torch.float64)


@pytest.mark.parametrize("mask_fn", [window_causal, documents_packed], ids=lambda f: f.__name__)
def test_mask_bf16_oracle(mask_fn):
    run(mask_fn, 113, 203, dtype=torch.bfloat16)


def test_long_window_1025():
    """One long case, default tiles: 1025 is one past a block multiple."""
    check_attention(1, 8, 2, 1025, 1025, 16, mask=M.sliding_window(128) & M.causal())


def test_empty_rows_give_zero_and_no_nan():
    """Padded-out batch row (length 0) and a document with no keys: out 0, lse -inf, finite gradients, even
    when the keys nobody may see hold NaN and inf."""
    B, Hq, Hkv, Nq, Nk, D = 2, 8, 2, 113, 203, 16
    q = torch.randn(B, Hq, Nq, D, requires_grad=True)
    k = torch.randn(B, Hkv, Nk, D)
    v = torch.randn(B, Hkv, Nk, D)
    k[1, :, 150:] = float("nan")  # padded keys of row 1 hold garbage
    v[1, :, 150:] = float("inf")
    k.requires_grad_(True)
    v.requires_grad_(True)
    mask = M.key_padding([0, 150])
    for kernel in ("reference", "tiled"):
        out, lse = selfattn.attention(q, k, v, mask, kernel=kernel, return_lse=True, **SMALL)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()
        gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
        assert torch.isfinite(gq).all() and torch.isfinite(gk).all() and torch.isfinite(gv).all()
        assert (gq[0] == 0).all() and (gk[1, :, 150:] == 0).all() and (gv[1, :, 150:] == 0).all()

    mask = documents_missing_keys(1, Nq, Nk)
    out, lse = selfattn.attention(q[:1], k[:1], v[:1], mask, kernel="tiled", return_lse=True, **SMALL)
    empty = ~mask.dense(1, Hq, Nq, Nk).any(-1)[0, 0]  # (Nq,) rows of document 1
    assert empty.sum() == Nq // 3
    assert (out[0, :, empty] == 0).all() and torch.isneginf(lse[0, :, empty]).all()
    assert torch.isfinite(out).all()


def test_masked_tiles_are_skipped():
    """The tiled kernel evaluates the mask only inside PARTIAL tiles and never touches an EMPTY one: a mask_mod
    that records the index ranges it is asked about proves it (the kernel may merge neighbouring partial tiles
    into one call)."""
    seen = []

    class Recording(M.SlidingWindow):
        def mask_mod(self, q_idx, k_idx, Nq, Nk):
            seen.append((int(q_idx.min()), int(q_idx.max()), int(k_idx.min()), int(k_idx.max())))
            return super().mask_mod(q_idx, k_idx, Nq, Nk)

    m = Recording(64)
    q = torch.randn(1, 2, 1024, 16)
    selfattn.attention(q, q, q, m, kernel="tiled", block_q=64, block_k=64)
    kinds = M.summarize_classes(m.block_classes(1, 2, 1024, 1024, 64, 64))
    assert seen, "the window leaves partial tiles, so mask_mod must run"
    for q0, q1, k0, k1 in seen:
        touched = kinds[q0 // 64:q1 // 64 + 1, k0 // 64:k1 // 64 + 1]
        assert (touched == M.PARTIAL).all(), f"mask evaluated on a non-partial tile: q {q0}..{q1}, k {k0}..{k1}"


def test_plan_counts_tiles_for_masks():
    p = selfattn.plan(1, 8, 16384, 16384, 64, mask=M.sliding_window(256) & M.causal(), kernel="tiled",
                      block_q=128, block_k=128)
    assert p.tiles_total == 128 * 128 and p.tiles_computed == 3 * 128 - 3
