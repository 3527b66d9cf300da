"""Global positions (the kernel contract's one convention): a call on a slice of a longer sequence, given its
q_offset / k_offset, computes exactly the rows of the full call -- every built-in mask, every modifier, dropout
drawing the same pattern on the same global positions -- and key slices merge by LSE into the full call (what a
ring step and a KV cache rely on).

Shape legend: B batch, Hq/Hkv heads, Nq queries, Nk keys, D head dim.
"""
import pytest
import torch

import selfattn
from selfattn import functional, masks as M, scores as S

from oracle import cpu_kernels, max_err

B, HQ, HKV, D = 2, 4, 2, 16
N = 70  # global sequence length (keys); the full call's queries are its last NQ positions
NQ = 50
Q0 = N - NQ  # global position of the full call's first query: bottom-right alignment made explicit
ROWS = [(0, 13), (13, 41), (41, 50)]
KEYS = [(0, 29), (29, 70)]
KERNELS = cpu_kernels()  # the CPU kernels (triton: tests/test_triton.py)
BLOCKS = dict(block_q=16, block_k=16)


def _masks():
    g = torch.Generator().manual_seed(5)
    keep = torch.rand(B, N, generator=g) > 0.3
    keep[:, -1] = True
    ids = M.document_ids([[20, 30, 20], [5, 60, 5]])  # (B, N)
    dense = torch.rand(B, 1, N, N, generator=g) > 0.4  # indexed by global positions
    return {
        "none": None,
        "causal": M.causal(),
        "causal_top_left": M.causal("top_left"),
        "window": M.sliding_window(9, 3),
        "window_causal": M.sliding_window(12) & M.causal(),
        "pad_len": M.key_padding([60, 45]),
        "pad_keep": M.key_padding(keep),
        "document": M.document(ids),
        "prefix": M.prefix_lm([30, 25]),
        "dense": M.from_tensor(dense),
        "combo": (M.causal() | M.document(ids)) & ~M.key_padding(~keep),
    }


def _mods():
    g = torch.Generator().manual_seed(6)
    return {
        "none": None,
        "alibi": S.alibi(),
        "alibi_sym": S.alibi(symmetric=True),
        "t5": S.t5_relative(torch.randn(32, HQ, generator=g, dtype=torch.float64), bidirectional=False,
                            max_distance=40),
        "softcap": S.softcap(3.0),
        "chain": S.alibi(num_heads=HQ) >> S.softcap(4.0),
    }


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, HQ, NQ, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, N, D, generator=g, dtype=dtype)
    return q, k, v


def _call(q, k, v, mask, mod, kernel, q_offset, k_offset=0, p=0.0, seed=11, lse=True):
    gen = torch.Generator().manual_seed(seed)
    return selfattn.attention(q, k, v, mask, bias=mod, kernel=kernel, q_offset=q_offset, k_offset=k_offset,
                              dropout_p=p, generator=gen, return_lse=lse, **(BLOCKS if kernel == "tiled" else {}))


def _merge(parts):
    """Partial (out, lse) over disjoint key sets -> the attention over their union."""
    lses = torch.stack([l for _, l in parts])  # (P, B, H, Nq)
    lse = torch.logsumexp(lses, 0)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    out = sum(o * torch.exp(l - safe).nan_to_num(0.0)[..., None] for o, l in parts)
    return out, lse


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mname", list(_masks()))
def test_row_slices_equal_full_rows_every_mask(kernel, mname):
    mask = _masks()[mname]
    q, k, v = _inputs()
    full, lse = _call(q, k, v, mask, None, kernel, Q0)
    for a, b in ROWS:
        part, plse = _call(q[:, :, a:b], k, v, mask, None, kernel, Q0 + a)
        assert max_err(part, full[:, :, a:b]) <= 1e-12 and max_err(plse, lse[:, :, a:b]) <= 1e-12, (a, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("modname", list(_mods()))
def test_row_slices_equal_full_rows_every_modifier_with_dropout(kernel, modname):
    mod = _mods()[modname]
    q, k, v = _inputs()
    mask = M.causal()
    full, lse = _call(q, k, v, mask, mod, kernel, Q0, p=0.25)
    for a, b in ROWS:
        part, plse = _call(q[:, :, a:b], k, v, mask, mod, kernel, Q0 + a, p=0.25)
        assert max_err(part, full[:, :, a:b]) <= 1e-12 and max_err(plse, lse[:, :, a:b]) <= 1e-12, (a, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("mname", ["none", "causal", "window", "document", "pad_keep", "combo"])
def test_key_slices_merge_to_full_call(kernel, mname):
    """A ring step's view: keys split into shards at their global positions, partial results merged by LSE."""
    mask = _masks()[mname]
    q, k, v = _inputs()
    mod = S.alibi()
    full, lse = _call(q, k, v, mask, mod, kernel, Q0)
    parts = [_call(q, k[:, :, c:d], v[:, :, c:d], mask, mod, kernel, Q0, k_offset=c) for c, d in KEYS]
    out, mlse = _merge(parts)
    assert max_err(out, full) <= 1e-12 and max_err(mlse, lse) <= 1e-12


def test_dropout_pattern_lives_on_global_positions():
    """Dropout under key slices: the kept entries of a slice are the full call's at the same positions."""
    q, k, v = _inputs()
    full, lse = _call(q, k, v, None, None, "reference", Q0, p=0.4)
    parts = [_call(q, k[:, :, c:d], v[:, :, c:d], None, None, "tiled", Q0, k_offset=c, p=0.4) for c, d in KEYS]
    out, _ = _merge(parts)
    assert max_err(out, full) <= 1e-12


def test_default_offsets_are_bottom_right_for_masks_and_top_left_for_modifiers():
    """q_offset=None keeps the old behaviour: masks align by their own align, modifiers at k_offset + their own
    q_offset (0 unless set)."""
    q, k, v = _inputs()
    a = selfattn.attention(q, k, v, M.causal(), bias=S.alibi(q_offset=5), kernel="reference")
    b = selfattn.attention(q, k, v, M.causal(), bias=S.alibi(), kernel="reference", q_offset=Q0)
    # causal bottom-right either way; alibi's row constant differs, which softmax ignores
    assert max_err(a, b) <= 1e-12


def test_alibi_bottom_right_with_more_queries_than_keys():
    """Nq > Nk in bottom-right alignment: a negative q_offset (the modifier's own must stay >= 0)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 12, 8, generator=g, dtype=torch.float64)
    k = v = torch.randn(1, 4, 5, 8, generator=g, dtype=torch.float64)
    out = selfattn.attention(q, k, v, bias=S.alibi(symmetric=True), q_offset=5 - 12, kernel="reference")
    slopes = S.alibi_slopes(4)
    qp = torch.arange(12)[:, None] + (5 - 12)
    kp = torch.arange(5)[None, :]
    s = q @ k.transpose(-1, -2) / 8 ** 0.5 - slopes[:, None, None] * (kp - qp).abs()
    want = torch.softmax(s, -1) @ v
    assert max_err(out, want) <= 1e-12
    for kernel in KERNELS:
        got = selfattn.attention(q, k, v, bias=S.alibi(symmetric=True), q_offset=-7, kernel=kernel)
        assert max_err(got, want) <= 1e-12, kernel


def test_offset_errors_name_the_argument():
    q, k, v = _inputs()
    with pytest.raises(TypeError, match="q_offset"):
        selfattn.attention(q, k, v, q_offset=1.5)
    with pytest.raises(TypeError, match="k_offset"):
        selfattn.attention(q, k, v, k_offset=None)
    with pytest.raises(ValueError, match="q_offset"):  # given twice: on the call and on the modifier
        selfattn.attention(q, k, v, bias=S.alibi(q_offset=3), q_offset=0)
    ids = M.document_ids([N])
    with pytest.raises(ValueError, match="document ids"):  # data masks must cover the positions they are asked
        selfattn.attention(q, k, v, M.document(ids), q_offset=N - 10)


def test_gradients_of_row_slices_add_up_to_the_full_call():
    """Backward per slice with offsets: dK/dV summed over query slices equal the full call's."""
    q, k, v = _inputs()
    mask, mod = M.sliding_window(15) & M.causal(), S.alibi()
    do = torch.randn(B, HQ, NQ, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for kernel in KERNELS:
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        full = _call(qq, kk, vv, mask, mod, kernel, Q0, lse=False)
        gq, gk, gv = torch.autograd.grad(full, (qq, kk, vv), do)
        sk, sv, sq = torch.zeros_like(k), torch.zeros_like(v), []
        for a, b in ROWS:
            q2, k2, v2 = (t.clone().requires_grad_() for t in (q[:, :, a:b], k, v))
            o = _call(q2, k2, v2, mask, mod, kernel, Q0 + a, lse=False)
            dq2, dk2, dv2 = torch.autograd.grad(o, (q2, k2, v2), do[:, :, a:b])
            sq.append(dq2)
            sk += dk2
            sv += dv2
        assert max_err(torch.cat(sq, 2), gq) <= 1e-11 and max_err(sk, gk) <= 1e-11 and max_err(sv, gv) <= 1e-11
