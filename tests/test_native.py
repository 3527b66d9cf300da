"""The native kernel (kernels/native.py + csrc/) against the float64 reference, by the oracle rule.

Runs only where the library is built (``bash scripts/build-native.sh``); the module is skipped with the reason
otherwise. Shape legend: B batch, Hq/Hkv heads, Nq/Nk lengths, D/Dv head dims.
"""
import math
import os
import shutil

import pytest

import torch

import selfattn
from oracle import check_attention, make_inputs
from selfattn import masks, scores
from selfattn.kernels import native

_AVAILABLE = native.available()  # loads the library (or records why not) before the reason is read
# Skipped only where the kernel cannot exist: switched off (SELFATTN_NATIVE=0, the fallback pass of
# scripts/test.sh) or no C++ compiler on this machine. With a compiler, a missing library is a failed build: fail.
_NO_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None
pytestmark = pytest.mark.skipif(not _AVAILABLE and (native._disabled() is not None or _NO_COMPILER),
                                reason=f"native kernel unavailable: {native._disabled() or native._load_error}")


def test_the_library_is_built_where_a_compiler_exists():
    assert _AVAILABLE, f"the native kernel should be built here (bash scripts/build-native.sh): {native._load_error}"

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _ids(rows):
    return masks.document_ids(rows)


# -- the oracle over hostile shapes, masks, modifiers, dtypes ---------------------------------------------------
SHAPES = [  # B, Hq, Hkv, Nq, Nk, D, Dv
    (2, 4, 2, 17, 113, 40, None),
    (1, 8, 2, 113, 17, 59, 24),     # GQA 8:2, Nq > Nk, Dv != D
    (1, 8, 1, 203, 203, 64, None),  # MQA 8:1
    (1, 2, 2, 1025, 1, 8, None),
    (1, 2, 1, 1, 1025, 128, None),
    (1, 1, 1, 65, 130, 256, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_fp32(shape):
    B, Hq, Hkv, Nq, Nk, D, Dv = shape
    check_attention(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=F32, kernel="native")


@pytest.mark.parametrize("dtype", [F64, BF16, F16])
def test_dtypes(dtype):
    check_attention(2, 4, 2, 113, 203, 40, 24, dtype=dtype, kernel="native", mask=masks.causal())


def test_noncontiguous():
    check_attention(2, 4, 2, 70, 90, 32, dtype=F32, kernel="native", noncontig=True, mask=masks.causal())


MASKS = {
    "causal": masks.causal(),
    "causal_top_left": masks.causal("top_left"),
    "window": masks.sliding_window(20, 5),
    "window_and_causal": masks.sliding_window(30) & masks.causal(),
    "pad_len": masks.key_padding([50, 0]),  # row 1: every row empty
    "pad_keep": masks.key_padding(torch.rand(2, 130, generator=torch.Generator().manual_seed(3)) > 0.4),
    "document": masks.document(_ids([[10, 40, 80], [130, 0, 0]])),
    "prefix": masks.prefix_lm([20, 64]),
    "dense": masks.from_tensor(torch.rand(2, 1, 130, 130, generator=torch.Generator().manual_seed(4)) > 0.7),
    "or_not": masks.causal() | ~masks.sliding_window(8, 8),
    "doc_and_not_causal": masks.document(_ids([[60, 70], [5, 125]])) & ~masks.causal(),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks(name):
    check_attention(2, 4, 2, 130, 130, 16, dtype=F32, kernel="native", mask=MASKS[name])


def test_masks_fp64_and_small_blocks():
    m = masks.document(_ids([[10, 40, 80], [130, 0, 0]])) | masks.causal()
    check_attention(2, 4, 2, 130, 130, 16, dtype=F64, kernel="native", mask=m, block_q=16, block_k=32)


def test_window_gqa_offsets_small_blocks():
    # rows that see nothing in a trimmed PARTIAL tile next to rows that do (GQA stacks heads as rows)
    q, k, v = make_inputs(2, 4, 2, 50, 29, 16, dtype=F64, seed=13)
    for m in (masks.sliding_window(9, 3), masks.causal()):
        for bq in (8, 16, 32):
            ref = selfattn.attention(q, k, v, m, q_offset=20, kernel="reference", return_lse=True)
            out = selfattn.attention(q, k, v, m, q_offset=20, kernel="native", return_lse=True, block_q=bq)
            assert torch.equal(torch.isneginf(ref[1]), torch.isneginf(out[1]))
            assert (ref[0] - out[0]).abs().max() < 1e-12


def test_per_head_dense_mask():
    t = torch.rand(1, 4, 70, 90, generator=torch.Generator().manual_seed(5)) > 0.5
    t[0, 2] = False  # one head sees nothing
    check_attention(1, 4, 2, 70, 90, 16, dtype=F32, kernel="native", mask=masks.from_tensor(t))


TAB = torch.randn(32, 4, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
BIASES = {
    "full": (2, 4, 70, 90),
    "per_head_key": (1, 4, 1, 90),
    "shared_rows": (1, 1, 70, 90),
    "batch_row": (2, 1, 70, 1),
    "alibi": scores.alibi(num_heads=4),
    "alibi_sym": scores.alibi(num_heads=4, symmetric=True),
    "softcap": scores.softcap(2.0),
    "t5": scores.t5_relative(TAB),
    "t5_uni": scores.t5_relative(TAB, bidirectional=False),
    "tensor_t5_softcap": [(2, 1, 70, 90), scores.t5_relative(TAB), scores.softcap(3.0)],
    "alibi_softcap": [scores.alibi(num_heads=4), scores.softcap(1.5)],
}


@pytest.mark.parametrize("name", sorted(BIASES))
def test_bias_and_modifiers(name):
    check_attention(2, 4, 2, 70, 90, 32, dtype=F32, kernel="native", bias=BIASES[name], mask=masks.causal())


def test_modifiers_fp64_bf16():
    b = [(2, 4, 70, 90), scores.t5_relative(TAB.detach().double().requires_grad_(True)), scores.softcap(3.0)]
    check_attention(2, 4, 2, 70, 90, 32, dtype=F64, kernel="native", bias=b)
    check_attention(2, 4, 2, 70, 90, 32, dtype=BF16, kernel="native", bias=[(2, 4, 70, 90), scores.alibi(num_heads=4)])


@pytest.mark.parametrize("mask", [None, masks.causal()])
def test_dropout_matches_reference_bits(mask):
    # the oracle's reference regenerates the same counter-based pattern: any differing bit fails the bound
    check_attention(2, 4, 2, 70, 90, 32, dtype=F32, kernel="native", dropout_p=0.3, mask=mask, seed=11)
    check_attention(1, 2, 2, 40, 33, 16, dtype=F64, kernel="native", dropout_p=0.5, seed=12)


def test_offsets_match_reference():
    q, k, v = make_inputs(2, 4, 2, 33, 90, 16, dtype=F64, seed=7)
    kw = dict(mask=masks.causal(), bias=[scores.alibi(num_heads=4), scores.softcap(4.0)], dropout_p=0.2,
              q_offset=40, k_offset=3, return_lse=True)
    outs = []
    for kernel in ("reference", "native"):
        o, lse = selfattn.attention(q, k, v, kernel=kernel, generator=torch.Generator().manual_seed(1), **kw)
        g = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
        outs.append((o, lse, *g))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)


# -- hostile corner cases ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True])  # the backward's one-pass and two-pass schedules
def test_empty_rows_and_nan_in_invisible_keys(with_bias):
    B, H, N, D = 2, 2, 70, 16
    q, k, v = make_inputs(B, H, H, N, N, D, dtype=F32, seed=8, requires_grad=False)
    k, v = k.clone(), v.clone()
    k[:, :, 40:] = float("nan")  # keys 40.. are padding: nobody may see them
    v[:, :, 40:] = float("inf")
    m = masks.key_padding([40, 0])  # batch row 1: every row empty
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    bias = torch.zeros(1, H, N, N, requires_grad=True) if with_bias else None
    out, lse = selfattn.attention(*leaves, m, bias=bias, kernel="native", return_lse=True)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    for t in leaves + ([bias] if with_bias else []):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(leaves[0].grad[1], torch.zeros_like(leaves[0].grad[1]))
    # the same as with clean padding keys
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 40:] = 0
    v2[:, :, 40:] = 0
    out2 = selfattn.attention(q, k2, v2, m, kernel="native")
    assert torch.equal(out.detach(), out2)


def test_empty_problems():
    for B, Nq, Nk in ((0, 5, 5), (1, 5, 0), (1, 0, 5)):
        check_attention(B, 2, 1, Nq, Nk, 8, dtype=F32, kernel="native")


def test_gradcheck_fp64():
    q, k, v = make_inputs(1, 2, 1, 5, 7, 4, dtype=F64, seed=9)
    bias = torch.randn(1, 2, 5, 7, dtype=F64, requires_grad=True)
    tab = torch.randn(8, 2, dtype=F64, requires_grad=True)
    m = masks.causal() | masks.key_padding([3])

    def f(q, k, v, bias, tab):
        return selfattn.attention(q, k, v, m, bias=[bias, scores.t5_relative(tab, num_buckets=8, max_distance=16),
                                                    scores.softcap(2.0)], kernel="native")

    assert torch.autograd.gradcheck(f, (q, k, v, bias, tab))


def _fwd_bwd(shape, mask=None, dropout_p=0.0, dtype=F32, with_bias=True):
    B, Hq, Hkv, Nq, Nk, D = shape
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, seed=10)
    bias = torch.randn(1, Hq, Nq, Nk, generator=torch.Generator().manual_seed(4)).to(dtype).requires_grad_(True)
    o = selfattn.attention(q, k, v, mask, bias=bias if with_bias else None, dropout_p=dropout_p, kernel="native",
                           generator=torch.Generator().manual_seed(3))
    g = torch.autograd.grad(o, (q, k, v, bias) if with_bias else (q, k, v), torch.ones_like(o))
    return (o.detach(), *g)


def test_bit_identical_repeats_and_thread_counts():
    shape = (2, 4, 2, 150, 300, 32)
    first = _fwd_bwd(shape, masks.causal(), 0.1)
    for _ in range(20):
        again = _fwd_bwd(shape, masks.causal(), 0.1)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    n = torch.get_num_threads()
    plain = _fwd_bwd(shape, masks.causal(), with_bias=False)
    try:
        for t in (1, 2, 3):  # B*Hkv = 4: the backward runs one pass over heads at 1-2 threads, two passes at 3
            torch.set_num_threads(t)
            other = _fwd_bwd(shape, masks.causal(), 0.1)
            assert all(torch.equal(a, b) for a, b in zip(first, other)), f"{t} threads differ"
            other = _fwd_bwd(shape, masks.causal(), with_bias=False)
            assert all(torch.equal(a, b) for a, b in zip(plain, other)), f"{t} threads differ (no bias)"
    finally:
        torch.set_num_threads(n)


def test_concurrent_python_threads():
    # several Python threads calling at once queue on the kernel's lock: same results, no oversubscription
    import threading
    q, k, v = make_inputs(2, 4, 2, 130, 200, 32, dtype=F32, seed=14, requires_grad=False)
    want = selfattn.attention(q, k, v, masks.causal(), kernel="native")
    got, errs = [None] * 6, []

    def run(n):
        try:
            got[n] = selfattn.attention(q, k, v, masks.causal(), kernel="native")
        except Exception as e:  # pragma: no cover - reported below
            errs.append(e)

    ts = [threading.Thread(target=run, args=(n,)) for n in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errs and all(torch.equal(g, want) for g in got)


def test_decode_path():
    # G·Nq <= 16 rows against a long cache, split keys (B·Hkv = 1) and not, with and without a padding mask
    check_attention(1, 8, 1, 2, 3000, 64, dtype=F32, kernel="native", grads=False)
    check_attention(2, 8, 2, 1, 1500, 128, dtype=F32, kernel="native", mask=masks.key_padding([1500, 700]))
    check_attention(1, 4, 4, 1, 2000, 40, dtype=BF16, kernel="native", grads=False)
    # thread-count independence of the split-K merge
    q, k, v = make_inputs(1, 8, 1, 1, 5000, 64, dtype=F32, seed=2, requires_grad=False)
    n = torch.get_num_threads()
    try:
        res = []
        for t in (1, 2):
            torch.set_num_threads(t)
            res.append(selfattn.attention(q, k, v, kernel="native", return_lse=True))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


def test_decode_reads_cache_views_in_place():
    cache = torch.randn(1, 2, 4096, 64)
    k, v = cache[:, :, :1000], cache[:, :, 1000:2000]  # non-contiguous slices of a cache
    q = torch.randn(1, 8, 1, 64)
    out = selfattn.attention(q, k, v, kernel="native")
    ref = selfattn.attention(q.double(), k.double(), v.double(), kernel="reference")
    assert (out.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512bf16"])
def test_each_isa(isa, monkeypatch):
    lib = native._load()
    if native._ISAS[isa] > lib.sa_best_isa():
        pytest.skip(f"this CPU cannot run the {isa} path")
    monkeypatch.setenv("SELFATTN_NATIVE_ISA", isa)
    assert native.isa() == isa
    check_attention(2, 4, 2, 70, 90, 59, 24, dtype=F32, kernel="native", mask=masks.causal(), bias=(1, 4, 70, 90))
    check_attention(1, 4, 2, 33, 70, 40, dtype=BF16, kernel="native", dropout_p=0.2)
    check_attention(1, 4, 2, 20, 30, 8, dtype=F64, kernel="native", mask=masks.sliding_window(4))
    check_attention(1, 8, 1, 1, 900, 64, dtype=F32, kernel="native")  # decode


# -- refusals ---------------------------------------------------------------------------------------------------
def _call(**kw):
    q, k, v = make_inputs(1, 2, 1, 8, 8, 8, dtype=F32, requires_grad=False)
    return selfattn.functional.prepare(q, k, v, kernel="tiled", **kw)[0]


def test_why_not_reasons(monkeypatch):
    assert native.why_not(_call()) is None

    class Custom(scores.ScoreMod):
        def __call__(self, s, q_idx, k_idx):
            return s

        def apply(self, s, q_pos, k_pos, h_idx):
            return s

    assert "lowering" in native.why_not(_call(bias=Custom()))
    monkeypatch.setenv("SELFATTN_NATIVE", "0")
    assert "SELFATTN_NATIVE=0" in native.why_not(_call())
    assert not native.available()


def test_missing_library_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "LIB_PATH", tmp_path / "absent.so")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_error", None)
    r = native.why_not(_call())
    assert "not built" in r and "build-native.sh" in r
    # the automatic rule still serves the call with another kernel
    q, k, v = make_inputs(1, 2, 1, 8, 8, 8, dtype=F32, requires_grad=False)
    assert selfattn.functional.prepare(q, k, v)[1].NAME != "native"
