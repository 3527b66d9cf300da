"""Masks on their own: dense forms against independent formulas, tile classes against the dense form (hypothesis
property tests), combinators, pictures, validation. Kernel numerics live in test_masks_attention.py.

Shape legend: B batch, H heads, Nq queries, Nk keys, bq/bk tile sizes, nqb/nkb tile counts.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import selfattn
from selfattn import masks as M
from selfattn.masks import EMPTY, FULL, PARTIAL

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers ---------------------------------------------------------------------------------------------------
def tile_truth(dense, Nq, Nk, bq, bk):
    """Per tile: (any allowed, all allowed) from the dense (Bm, Hm, Nq, Nk) form, each (Bm, Hm, nqb, nkb)."""
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    anyv = torch.zeros(dense.shape[0], dense.shape[1], nqb, nkb, dtype=torch.bool)
    allv = torch.zeros_like(anyv)
    for i in range(nqb):
        for j in range(nkb):
            t = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            anyv[:, :, i, j] = t.flatten(2).any(-1)
            allv[:, :, i, j] = t.flatten(2).all(-1)
    return anyv, allv


def assert_sound(mask, B, H, Nq, Nk, bq, bk, exact=False):
    """EMPTY tiles have no allowed entry, FULL tiles no masked one; with exact, PARTIAL tiles are neither."""
    dense = mask.dense(B, H, Nq, Nk).expand(-1, -1, Nq, Nk)
    cls = mask.block_classes(B, H, Nq, Nk, bq, bk)
    assert cls.dtype == torch.int8 and cls.dim() == 4
    assert cls.shape[0] in (1, B) and cls.shape[1] in (1, H)
    assert cls.shape[2:] == (-(-Nq // bq), -(-Nk // bk))
    anyv, allv = tile_truth(dense, Nq, Nk, bq, bk)
    bm, hm = max(cls.shape[0], anyv.shape[0]), max(cls.shape[1], anyv.shape[1])
    cls = cls.expand(bm, hm, *cls.shape[2:])
    anyv, allv = anyv.expand_as(cls), allv.expand_as(cls)
    assert not (anyv & (cls == EMPTY)).any(), f"{mask!r}: a tile classified EMPTY has an allowed entry"
    assert not (~allv & (cls == FULL)).any(), f"{mask!r}: a tile classified FULL has a masked entry"
    if exact:
        assert not (~anyv & (cls == PARTIAL)).any(), f"{mask!r}: an empty tile classified PARTIAL"
        assert not (allv & (cls == PARTIAL)).any(), f"{mask!r}: a full tile classified PARTIAL"


def idx(Nq, Nk):
    return torch.arange(Nq)[:, None], torch.arange(Nk)[None, :]


def pos_offset(align, Nq, Nk):
    return Nk - Nq if align == "bottom_right" else 0


# -- strategies ------------------------------------------------------------------------------------------------
sizes = st.integers(1, 90)
blocks = st.integers(1, 40)
aligns = st.sampled_from(["bottom_right", "top_left"])


@st.composite
def problem(draw):
    return draw(st.integers(1, 3)), draw(sizes), draw(sizes), draw(blocks), draw(blocks)


@st.composite
def any_mask(draw, B, Nq, Nk, depth=0):
    """A random mask of any kind fitting (B, ·, Nq, Nk), combinators included up to depth 2."""
    kinds = ["causal", "window", "padding", "padding_bool", "document", "prefix", "tensor"]
    if depth < 2:
        kinds += ["and", "or", "not"]
    kind = draw(st.sampled_from(kinds))
    if kind == "causal":
        return M.causal(draw(aligns))
    if kind == "window":
        return M.sliding_window(draw(st.integers(0, 40)), draw(st.integers(0, 40)), draw(aligns))
    if kind == "padding":
        return M.key_padding(draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B)))
    if kind == "padding_bool":
        bits = draw(st.lists(st.booleans(), min_size=B * Nk, max_size=B * Nk))
        return M.key_padding(torch.tensor(bits).view(B, Nk))
    if kind == "document":
        return document_mask(draw, B, Nq, Nk)
    if kind == "prefix":
        return M.prefix_lm(draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B)), draw(aligns))
    if kind == "tensor":
        bits = draw(st.lists(st.booleans(), min_size=Nq * Nk, max_size=Nq * Nk))
        return M.from_tensor(torch.tensor(bits).view(Nq, Nk))
    a = draw(any_mask(B, Nq, Nk, depth + 1))
    if kind == "not":
        return ~a
    b = draw(any_mask(B, Nq, Nk, depth + 1))
    return a & b if kind == "and" else a | b


def sorted_ids(draw, n, max_docs=6):
    """Packed-document ids for n tokens from random lengths (zero-length documents included)."""
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=0, max_size=max_docs)))
    lengths = [b - a for a, b in zip([0] + cuts, cuts + [n])]
    return M.document_ids(lengths)


def document_mask(draw, B, Nq, Nk):
    style = draw(st.sampled_from(["packed", "random", "cross"]))
    if style == "packed":
        ids = torch.stack([sorted_ids(draw, Nq) for _ in range(B)])  # (B, Nq)
        if Nq == Nk:
            return M.document(ids)
        return M.document(ids, torch.stack([sorted_ids(draw, Nk) for _ in range(B)]))
    if style == "random":
        ids_q = torch.tensor(draw(st.lists(st.integers(-1, 3), min_size=Nq, max_size=Nq)))
        ids_k = torch.tensor(draw(st.lists(st.integers(-1, 3), min_size=Nk, max_size=Nk)))
        return M.document(ids_q, ids_k)
    return M.document(sorted_ids(draw, Nq)[None].expand(B, Nq), sorted_ids(draw, Nk))


# -- property tests: tile classes vs the dense form ------------------------------------------------------------
@SETTINGS
@given(problem(), aligns)
def test_causal_classes_exact(p, align):
    B, Nq, Nk, bq, bk = p
    assert_sound(M.causal(align), B, 2, Nq, Nk, bq, bk, exact=True)


@SETTINGS
@given(problem(), st.integers(0, 60), st.integers(0, 60), aligns)
def test_sliding_window_classes_exact(p, left, right, align):
    B, Nq, Nk, bq, bk = p
    assert_sound(M.sliding_window(left, right, align), B, 2, Nq, Nk, bq, bk, exact=True)


@SETTINGS
@given(st.data(), problem())
def test_key_padding_classes_exact(data, p):
    B, Nq, Nk, bq, bk = p
    lengths = data.draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B))
    assert_sound(M.key_padding(lengths), B, 2, Nq, Nk, bq, bk, exact=True)
    bits = data.draw(st.lists(st.booleans(), min_size=B * Nk, max_size=B * Nk))
    assert_sound(M.key_padding(torch.tensor(bits).view(B, Nk)), B, 2, Nq, Nk, bq, bk, exact=True)


@SETTINGS
@given(st.data(), problem())
def test_document_classes(data, p):
    B, N, _, bq, bk = p
    ids = torch.stack([sorted_ids(data.draw, N) for _ in range(B)])  # (B, N) packed, zero-length docs too
    assert_sound(M.document(ids), B, 2, N, N, bq, bk, exact=True)  # sorted self ids: exact
    Nk = data.draw(sizes)
    other = document_mask(data.draw, B, N, Nk)
    assert_sound(other, B, 2, N, Nk, bq, bk)


@SETTINGS
@given(st.data(), problem(), aligns)
def test_prefix_lm_classes_exact(data, p, align):
    B, Nq, Nk, bq, bk = p
    prefix = data.draw(st.lists(st.integers(0, Nk), min_size=B, max_size=B))
    assert_sound(M.prefix_lm(prefix, align), B, 2, Nq, Nk, bq, bk, exact=True)


@SETTINGS
@given(st.data(), problem())
def test_combinators_classes_and_dense(data, p):
    B, Nq, Nk, bq, bk = p
    a = data.draw(any_mask(B, Nq, Nk))
    b = data.draw(any_mask(B, Nq, Nk))
    da, db = a.dense(B, 2, Nq, Nk), b.dense(B, 2, Nq, Nk)
    for m, want in ((a & b, da & db), (a | b, da | db), (~a, ~da)):
        assert torch.equal(m.dense(B, 2, Nq, Nk).expand(B, -1, Nq, Nk), want.expand(B, -1, Nq, Nk))
        assert_sound(m, B, 2, Nq, Nk, bq, bk)
        m.check_shape(B, 2, Nq, Nk)


@SETTINGS
@given(st.data(), problem())
def test_mask_mod_on_partial_tiles_matches_dense(data, p):
    """Any tile's mask_mod equals the dense form's slice and broadcasts to (B, H, Tq, Tk)."""
    B, Nq, Nk, bq, bk = p
    m = data.draw(any_mask(B, Nq, Nk))
    dense = m.dense(B, 2, Nq, Nk).expand(B, 2, Nq, Nk)
    qs = data.draw(st.integers(0, Nq - 1))
    ks = data.draw(st.integers(0, Nk - 1))
    qe, ke = min(Nq, qs + bq), min(Nk, ks + bk)
    tile = m.mask_mod(torch.arange(qs, qe)[:, None], torch.arange(ks, ke)[None, :], Nq, Nk)
    assert tile.dtype == torch.bool
    assert torch.equal(tile.expand(B, 2, qe - qs, ke - ks), dense[:, :, qs:qe, ks:ke])


# -- dense forms vs independent formulas -----------------------------------------------------------------------
@pytest.mark.parametrize("Nq,Nk", [(17, 17), (5, 23), (23, 5)])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_sliding_window_dense(Nq, Nk, align):
    left, right = 4, 2
    d = M.sliding_window(left, right, align).dense(1, 1, Nq, Nk)[0, 0]
    off = pos_offset(align, Nq, Nk)
    want = torch.tensor([[i + off - left <= j <= i + off + right for j in range(Nk)] for i in range(Nq)])
    assert torch.equal(d, want)
    # right=0 is causal already, so & causal changes nothing; with right>0, & causal clips the right side
    assert torch.equal((M.sliding_window(left, 0, align) & M.causal(align)).dense(1, 1, Nq, Nk),
                       M.sliding_window(left, 0, align).dense(1, 1, Nq, Nk))
    assert torch.equal((M.sliding_window(left, right, align) & M.causal(align)).dense(1, 1, Nq, Nk),
                       M.sliding_window(left, 0, align).dense(1, 1, Nq, Nk))


def test_key_padding_dense():
    d = M.key_padding([3, 0, 5]).dense(3, 2, 4, 5)
    assert d.shape == (3, 1, 1, 5)
    assert d[0, 0, 0].tolist() == [True] * 3 + [False] * 2
    assert not d[1].any() and d[2].all()
    keep = torch.tensor([[True, False, True], [False, False, True]])
    d = M.key_padding(keep).dense(2, 2, 4, 3).expand(2, 2, 4, 3)
    assert torch.equal(d, keep[:, None, None, :].expand(2, 2, 4, 3))


def test_document_ids_and_dense():
    assert M.document_ids([3, 0, 2]).tolist() == [0, 0, 0, 2, 2]
    assert M.document_ids([0, 0]).tolist() == []
    assert M.document_ids([[2, 1], [0, 3]]).tolist() == [[0, 0, 1], [1, 1, 1]]
    ids = M.document_ids([2, 0, 3])
    d = M.document(ids).dense(1, 1, 5, 5)[0, 0]
    want = torch.tensor([[ids[i] == ids[j] for j in range(5)] for i in range(5)])
    assert torch.equal(d, want)
    # cross ids: document 1 has queries but no key -> those query rows are empty
    dq = torch.tensor([0, 1, 1, 2])
    dk = torch.tensor([0, 0, 2])
    d = M.document(dq, dk).dense(1, 1, 4, 3)[0, 0]
    assert d.tolist() == [[True, True, False], [False] * 3, [False] * 3, [False, False, True]]


@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_prefix_lm_dense(align):
    Nq, Nk = 4, 6
    d = M.prefix_lm([3, 0], align).dense(2, 1, Nq, Nk)
    off = pos_offset(align, Nq, Nk)
    for b, p in enumerate([3, 0]):
        want = torch.tensor([[j < p or j <= i + off for j in range(Nk)] for i in range(Nq)])
        assert torch.equal(d[b, 0], want)
    assert torch.equal(M.prefix_lm(0, align).dense(1, 1, Nq, Nk), M.causal(align).dense(1, 1, Nq, Nk))


def test_block_classes_cached_and_batched_shapes():
    m = M.key_padding([5, 60])
    c1 = m.block_classes(2, 4, 70, 70, 16, 16)
    assert c1 is m.block_classes(2, 4, 70, 70, 16, 16)
    assert c1.shape == (2, 1, 5, 5)
    assert M.document(M.document_ids([[30, 40], [70, 0]])).block_classes(2, 4, 70, 70, 16, 16).shape == (2, 1, 5, 5)
    assert M.sliding_window(8).block_classes(2, 4, 70, 70, 16, 16).shape == (1, 1, 5, 5)
    assert M.prefix_lm(3).block_classes(2, 4, 70, 70, 16, 16).shape == (1, 1, 5, 5)


def test_sliding_window_skips_most_tiles():
    """The analytic classes at a long length, without an N×N tensor: a 256 window touches few tiles."""
    m = M.sliding_window(256) & M.causal()
    cls = m.block_classes(1, 8, 16384, 16384, 128, 128)
    # q block i sees k blocks i-2 (partial), i-1 (full) and i (the diagonal, partial)
    assert int((cls != EMPTY).sum()) == 3 * 128 - 3
    assert int((cls == FULL).sum()) == 127


def test_to_string_pictures():
    s = M.causal().to_string(8, 8, 4, 4)
    assert s.splitlines()[1:] == ["░·", "█░"]
    assert "computed 3/4" in s
    s = M.key_padding([8, 0]).to_string(4, 8, 4, 4)
    lines = s.splitlines()
    assert "batch row 0:" in lines and "batch row 1:" in lines
    assert lines[lines.index("batch row 0:") + 1] == "██"
    assert lines[lines.index("batch row 1:") + 1] == "··"
    s = M.document(M.document_ids([4, 0, 4])).to_string(8, 8, 4, 4)
    assert s.splitlines()[1:] == ["█·", "·█"]
    big = M.causal().to_string(4096, 4096, 16, 16, max_cols=32)
    assert all(len(row) <= 32 for row in big.splitlines()[1:]) and "1 in 8 tiles drawn" in big


# -- validation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,exc,words", [
    (lambda: M.sliding_window(-1), ValueError, "left"),
    (lambda: M.sliding_window(2.5), TypeError, "left"),
    (lambda: M.sliding_window(True), TypeError, "left"),
    (lambda: M.sliding_window(4, -2), ValueError, "right"),
    (lambda: M.sliding_window(4, align="left"), ValueError, "align"),
    (lambda: M.key_padding([3, -1]), ValueError, "non-negative"),
    (lambda: M.key_padding([1.5]), TypeError, "ints"),
    (lambda: M.key_padding(torch.tensor([1.0])), TypeError, "integer"),
    (lambda: M.key_padding(torch.ones(2, 3, 4, dtype=torch.bool)), ValueError, "(B, Nk)"),
    (lambda: M.key_padding("abc"), TypeError, "key_padding"),
    (lambda: M.document(torch.zeros(2, 2, 2, dtype=torch.long)), ValueError, "ids_q"),
    (lambda: M.document(torch.zeros(4)), TypeError, "ids_q"),
    (lambda: M.document(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)), ValueError,
     "batch rows"),
    (lambda: M.document_ids([2, -1]), ValueError, "non-negative"),
    (lambda: M.document_ids([[2, 1], [1]]), ValueError, "same N"),
    (lambda: M.prefix_lm(-3), ValueError, "non-negative"),
    (lambda: M.prefix_lm(2.0), TypeError, "prefix_lm"),
    (lambda: M.causal() & 3, TypeError, "other"),
])
def test_bad_constructor_args(make, exc, words):
    with pytest.raises(exc) as info:
        make()
    assert words in str(info.value)


@pytest.mark.parametrize("mask,shape,words", [
    (M.key_padding([3, 4]), (3, 2, 5, 5), "key_padding"),  # 2 rows of lengths, B=3
    (M.key_padding([3, 9]), (2, 2, 5, 5), "exceeds"),  # length 9 > Nk=5
    (M.key_padding(torch.ones(2, 6, dtype=torch.bool)), (2, 2, 5, 5), "Nk=5"),
    (M.document(torch.zeros(6, dtype=torch.long)), (1, 2, 5, 5), "Nq=5"),
    (M.document(torch.zeros(5, dtype=torch.long)), (1, 2, 5, 6), "pass ids_k"),
    (M.document(torch.zeros(3, 5, dtype=torch.long)), (2, 2, 5, 5), "document"),
    (M.prefix_lm([2, 3]), (3, 2, 5, 5), "prefix_lm"),
    (M.prefix_lm(7), (1, 2, 5, 5), "exceeds"),
    (M.causal() & M.key_padding([1, 2]), (3, 2, 5, 5), "key_padding"),
    (~M.document(torch.zeros(4, dtype=torch.long)), (1, 2, 5, 5), "document"),
])
def test_check_shape_names_the_mask(mask, shape, words):
    with pytest.raises(ValueError) as info:
        mask.check_shape(*shape)
    assert words in str(info.value)
    B, H, Nq, Nk = shape
    q, k = torch.zeros(B, H, Nq, 8), torch.zeros(B, H, Nk, 8)
    with pytest.raises(ValueError) as info:  # attention() validates before any kernel runs
        selfattn.attention(q, k, k, mask)
    assert words in str(info.value)


def test_masks_accept_length_tensors_and_broadcast_rows():
    m = M.key_padding(torch.tensor([2, 5], dtype=torch.int32))
    m.check_shape(2, 1, 3, 5)
    M.prefix_lm(torch.tensor([1])).check_shape(4, 1, 3, 5)  # one row of data fits any B
    M.document(torch.zeros(5, dtype=torch.long)).check_shape(7, 1, 5, 5)


@pytest.mark.parametrize("B,Nq,Nk", [(1, 0, 5), (1, 5, 0), (0, 4, 4), (1, 0, 0), (2, 1, 1)])
def test_degenerate_shapes(B, Nq, Nk):
    """Empty batch, no queries, no keys: every mask classifies, draws and runs (finite, gradients flow)."""
    same = M.document(torch.zeros(B, Nq, dtype=torch.long)) if Nq == Nk else \
        M.document(torch.zeros(Nq, dtype=torch.long), torch.zeros(Nk, dtype=torch.long))
    for m in (M.sliding_window(3, 2), M.key_padding([min(Nk, 2)] * B), M.prefix_lm([min(Nk, 1)] * B),
              M.causal() & M.key_padding([0] * B), ~M.sliding_window(1), same):
        q = torch.randn(B, 4, Nq, 8, requires_grad=True)
        k = torch.randn(B, 2, Nk, 8, requires_grad=True)
        for kernel in ("reference", "tiled"):
            out = selfattn.attention(q, k, k, m, kernel=kernel, block_q=2, block_k=2)
            gq, gk = torch.autograd.grad(out.sum(), (q, k), allow_unused=True)
            assert out.shape == (B, 4, Nq, 8) and torch.isfinite(out).all()
            assert gq is None or torch.isfinite(gq).all()
        assert m.to_string(Nq, Nk, 2, 2).startswith(repr(m))
