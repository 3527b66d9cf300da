"""The exact attention core (issue 3): every kernel against the float64 reference by the baseline rule.

Hostile shapes (lengths that are not block multiples, Nq != Nk both ways, odd head dims, Dv != D, GQA/MQA,
non-contiguous inputs, empty batch), all four dtypes, causal alignments, bool masks, broadcast biases, gradcheck,
determinism, empty rows, NaN in keys nobody may see, and the automatic kernel choice.

Shape legend: B batch, Hq query heads, Hkv key/value heads, Nq queries, Nk keys, D q/k head dim, Dv value dim.
"""
import math

import pytest
import torch

import selfattn
from selfattn import functional, masks
from oracle import check_attention, make_inputs, max_err

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SMALL_BLOCKS = dict(block_q=64, block_k=128)
DEFAULT_BLOCKS = dict(block_q=None, block_k=None)


# --- hostile sequence lengths ------------------------------------------------------------------------------
# (Nq, Nk): 1, 2, 17, 113, 203, 1023, 1025, Nq != Nk both ways; big lengths with tiny B/H/D to keep time.
LENGTHS = [(1, 1), (2, 2), (1, 17), (17, 1), (2, 113), (113, 2), (17, 203), (203, 17), (113, 203), (203, 113),
           (1, 1025), (1025, 1), (17, 1023), (1023, 17), (203, 1025), (1023, 1025), (1025, 1023)]


LENGTH_CASES = [(Nq, Nk, blocks) for blocks in ("blocks64x128", "default_blocks") for Nq, Nk in LENGTHS]


@pytest.mark.parametrize("Nq,Nk,blocks", LENGTH_CASES)
def test_lengths_tiled(Nq, Nk, blocks):
    blocks = SMALL_BLOCKS if blocks == "blocks64x128" else DEFAULT_BLOCKS
    big = Nq * Nk > 100_000
    B, Hq, Hkv, D = (1, 2, 1, 8) if big else (2, 4, 2, 16)
    # one key: the exact dq and dk are 0 and the plain baseline gets exactly 0, while a tiled backward sums Nq
    # roundoffs of delta = rowsum(dO∘O); float64 keeps that far below its floor, fp32 would test only noise
    dtype = F64 if Nk == 1 else F32
    check_attention(B, Hq, Hkv, Nq, Nk, D, dtype=dtype, kernel="tiled", seed=Nq * 7 + Nk, **blocks)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (17, 203), (203, 17), (113, 1023)])
def test_lengths_reference(Nq, Nk):
    check_attention(1, 2, 2, Nq, Nk, 8, dtype=F32, kernel="reference", seed=Nq + Nk)


@pytest.mark.parametrize("causal_align", [None, "bottom_right", "top_left"])
@pytest.mark.parametrize("Nq,Nk", [(113, 1025), (1025, 113), (1023, 1023)])
def test_lengths_causal_tiled(Nq, Nk, causal_align):
    mask = masks.causal(causal_align) if causal_align else None
    check_attention(1, 2, 1, Nq, Nk, 8, mask=mask, kernel="tiled", seed=3, **SMALL_BLOCKS)


# --- head dims -------------------------------------------------------------------------------------------
HEAD_DIMS = [(8, 8), (40, 40), (59, 59), (64, 64), (128, 128), (256, 256), (40, 24), (8, 72), (59, 128), (256, 16)]


@pytest.mark.parametrize("kernel,D,Dv", [("tiled", D, Dv) for D, Dv in HEAD_DIMS]
                         + [("reference", D, Dv) for D, Dv in HEAD_DIMS])
def test_head_dims(D, Dv, kernel):
    check_attention(1, 2, 1, 113, 203, D, Dv=Dv, kernel=kernel, mask=masks.causal(), seed=D + Dv,
                    **(SMALL_BLOCKS if kernel == "tiled" else {}))


# --- GQA / MQA -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (8, 1), (8, 8), (3, 1)], ids=["gqa8:2", "mqa8:1", "mha8", "mqa3:1"])
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_gqa_mqa(Hq, Hkv, kernel):
    check_attention(2, Hq, Hkv, 113, 203, 16, Dv=24, mask=masks.causal(), bias=(1, Hq, 1, 203), kernel=kernel,
                    block_q=64 if kernel == "tiled" else None, block_k=128 if kernel == "tiled" else None)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_gqa_with_per_head_bool_mask(dtype):
    # a mask that differs across the 4 query heads sharing one KV head, so dead-key detection must look at all
    g = torch.Generator().manual_seed(5)
    m = torch.rand(2, 8, 113, 203, generator=g) > 0.3
    check_attention(2, 8, 2, 113, 203, 16, dtype=dtype, mask=m, kernel="tiled", **SMALL_BLOCKS)


# --- layouts and empty batch ----------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 1)])
def test_noncontiguous_inputs(kernel, Hq, Hkv):
    q, k, v = make_inputs(2, Hq, Hkv, 17, 33, 8, noncontig=True)
    assert not q.is_contiguous() and (Hkv == 1 or not (k.is_contiguous() or v.is_contiguous()))
    check_attention(2, Hq, Hkv, 113, 203, 40, Dv=24, noncontig=True, mask=masks.causal(), bias=(2, 1, 113, 203),
                    kernel=kernel, seed=11)


def test_noncontiguous_matches_contiguous_bitwise():
    q, k, v = make_inputs(2, 4, 2, 113, 203, 40, noncontig=True, requires_grad=False)
    a = selfattn.attention(q, k, v, kernel="tiled", block_q=64, block_k=128)
    b = selfattn.attention(q.contiguous(), k.contiguous(), v.contiguous(), kernel="tiled", block_q=64,
                           block_k=128)
    assert torch.equal(a, b)


def test_sliced_inputs():
    # views with storage offsets and strides from a fused QKV projection: (B, N, 3, H, D) sliced
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 50, 3, 4, 16, generator=g, dtype=torch.float64)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, D) views
    ref = functional.attention(q.contiguous(), k.contiguous(), v.contiguous(), kernel="reference")
    for kernel in ("tiled", "reference"):
        out = selfattn.attention(q, k, v, kernel=kernel, block_q=16, block_k=32)
        assert max_err(out, ref) <= 1e-12


@pytest.mark.parametrize("kernel", ["tiled", "reference", None])
@pytest.mark.parametrize("shape", [(0, 4, 2, 17, 33, 8), (2, 4, 2, 0, 33, 8)], ids=["B=0", "Nq=0"])
def test_empty_batch(kernel, shape):
    B, Hq, Hkv, Nq, Nk, D = shape
    for mask in (masks.causal(), masks.causal("top_left")):  # top-left leaves keys nobody sees (dead-key path)
        r = check_attention(B, Hq, Hkv, Nq, Nk, D, mask=mask, bias=(1, Hq, 1, Nk), kernel=kernel, block_q=8,
                            block_k=16)
        assert r.out.shape == (B, Hq, Nq, D) and r.lse.shape == (B, Hq, Nq)


@pytest.mark.parametrize("kernel", ["tiled", "reference"])
@pytest.mark.parametrize("D,Dv", [(0, 4), (4, 0), (0, 0)])
def test_zero_head_dims(kernel, D, Dv):
    # D = 0: every score is 0 (default scale 1), uniform weights over the allowed keys; Dv = 0: empty output
    check_attention(1, 2, 1, 5, 7, D, Dv=Dv, kernel=kernel, mask=masks.causal("top_left"), block_q=2, block_k=3)


def test_zero_keys_gives_empty_rows():
    # Nk = 0: every row is empty -> out 0, lse -inf, grads 0
    for kernel in ("tiled", "reference"):
        r = check_attention(2, 4, 2, 17, 0, 8, kernel=kernel)
        assert torch.isneginf(r.lse).all() and (r.out == 0).all()
        assert (r.grads["dq"] == 0).all()


# --- dtypes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
@pytest.mark.parametrize("Nq,Nk", [(113, 203), (203, 113)])
def test_dtypes(dtype, kernel, Nq, Nk):
    check_attention(2, 4, 2, Nq, Nk, 40, Dv=24, dtype=dtype, mask=masks.causal(), bias=(1, 4, Nq, Nk),
                    kernel=kernel, seed=1, **(SMALL_BLOCKS if kernel == "tiled" else {}))


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
def test_dtypes_long(dtype):
    check_attention(1, 1, 1, 1023, 1025, 32, dtype=dtype, kernel="tiled", seed=2)


@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_return_lse_dtype(dtype, kernel):
    q, k, v = make_inputs(1, 2, 2, 17, 33, 8, dtype=dtype, requires_grad=False)
    out, lse = selfattn.attention(q, k, v, return_lse=True, kernel=kernel)
    assert out.dtype == dtype
    assert lse.dtype == (F64 if dtype == F64 else F32)
    assert lse.shape == (1, 2, 17)
    out_only = selfattn.attention(q, k, v, kernel=kernel)
    assert torch.is_tensor(out_only) and torch.equal(out_only, out)


def test_lse_is_natural_log_sum_exp():
    q, k, v = make_inputs(1, 2, 2, 17, 33, 8, dtype=F64, requires_grad=False)
    for kernel in ("tiled", "reference"):
        _, lse = selfattn.attention(q, k, v, return_lse=True, kernel=kernel, block_q=8, block_k=16)
        want = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
        assert max_err(lse, want) <= 1e-12


@pytest.mark.parametrize("scale", [0.0, 0.05, 1.0, 3.0])
def test_explicit_scale(scale):
    check_attention(1, 2, 1, 113, 203, 16, mask=masks.causal(), scale=scale, kernel="tiled", **SMALL_BLOCKS)


# --- causal alignment ------------------------------------------------------------------------------------
CAUSAL_CASES = [(kernel, Nq, Nk) for kernel in ("tiled64x128", "reference")
                for Nq, Nk in [(17, 203), (203, 17), (113, 113), (1, 203), (203, 1), (130, 257)]]
CAUSAL_CASES += [("tiled16x32", 17, 203), ("tiled16x32", 203, 17), ("tiled16x32", 49, 50)]
BLOCKS = {"tiled64x128": SMALL_BLOCKS, "tiled16x32": dict(block_q=16, block_k=32), "reference": {}}


@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
@pytest.mark.parametrize("kernel,Nq,Nk", CAUSAL_CASES)
def test_causal_alignment(align, Nq, Nk, kernel):
    blocks = BLOCKS[kernel]
    kernel = kernel[:5] if kernel != "reference" else kernel
    r = check_attention(1, 2, 1, Nq, Nk, 8, mask=masks.causal(align), kernel=kernel, seed=Nq, **blocks)
    # the semantics, not only the agreement: query i sees keys j <= i + offset
    off = Nk - Nq if align == "bottom_right" else 0
    allowed = torch.arange(Nk)[None, :] <= torch.arange(Nq)[:, None] + off
    q, k, v = (t.double() for t in make_inputs(1, 2, 1, Nq, Nk, 8, seed=Nq, requires_grad=False))
    want = functional.attention(q, k, v, allowed, kernel="reference")
    assert max_err(r.ref_out, want) == 0.0


def test_causal_alignments_agree_when_square():
    q, k, v = make_inputs(1, 2, 1, 113, 113, 8, requires_grad=False)
    a = selfattn.attention(q, k, v, masks.causal("bottom_right"), kernel="tiled", block_q=16, block_k=32)
    b = selfattn.attention(q, k, v, masks.causal("top_left"), kernel="tiled", block_q=16, block_k=32)
    assert torch.equal(a, b)


# --- bool tensor masks -----------------------------------------------------------------------------------
def _rand_mask(shape, p=0.5, seed=0):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


MASK_SHAPES = [(2, 4, 113, 203), (2, 1, 113, 203), (1, 4, 1, 203), (2, 1, 1, 203), (113, 203), (203,),
               (1, 1, 113, 1)]


@pytest.mark.parametrize("kernel,mshape", [("tiled", m) for m in MASK_SHAPES]
                         + [("reference", m) for m in MASK_SHAPES], ids=str)
def test_bool_masks(mshape, kernel):
    m = _rand_mask(mshape, 0.7, seed=len(mshape))
    check_attention(2, 4, 2, 113, 203, 16, mask=m, kernel=kernel, **(SMALL_BLOCKS if kernel == "tiled" else {}))


def test_block_sparse_bool_mask_skips_and_is_exact():
    # whole tiles empty or full: a key-padding mask and a block-diagonal pattern
    m = torch.zeros(113, 203, dtype=torch.bool)
    m[:64, :128] = True
    m[64:, 128:] = True
    m[70, 5] = True
    check_attention(2, 4, 2, 113, 203, 16, mask=m, kernel="tiled", **SMALL_BLOCKS)
    check_attention(2, 4, 2, 113, 203, 16, mask=m & masks.causal().dense(1, 1, 113, 203)[0, 0],
                    kernel="tiled", block_q=16, block_k=16)


def test_mask_object_and_tensor_agree():
    m = _rand_mask((2, 1, 113, 203), 0.6, seed=4)
    q, k, v = make_inputs(2, 4, 2, 113, 203, 16, requires_grad=False)
    a = selfattn.attention(q, k, v, m, kernel="tiled", **SMALL_BLOCKS)
    b = selfattn.attention(q, k, v, masks.from_tensor(m), kernel="tiled", **SMALL_BLOCKS)
    assert torch.equal(a, b)


# --- bias tensors ----------------------------------------------------------------------------------------
# shapes without an Nk axis get an exactly-zero gradient (softmax ignores a per-row shift): see the test below
BIAS_SHAPES = [(2, 4, 113, 203), (1, 4, 113, 203), (2, 1, 1, 203), (113, 203), (203,), (4, 1, 203),
               (1, 1, 1, 203), (2, 4, 113, 1)]


@pytest.mark.parametrize("kernel,bshape", [("tiled", b) for b in BIAS_SHAPES]
                         + [("reference", b) for b in BIAS_SHAPES], ids=str)
def test_bias_broadcast_grad(bshape, kernel):
    r = check_attention(2, 4, 2, 113, 203, 16, mask=masks.causal(), bias=bshape, kernel=kernel, seed=len(bshape),
                        **(SMALL_BLOCKS if kernel == "tiled" else {}))
    assert r.grads["dbias"].shape == bshape


@pytest.mark.parametrize("bshape", [(1,), (1, 1, 1, 1), (4, 1, 1), (1, 1, 113, 1)], ids=str)
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_bias_constant_along_keys_changes_nothing(bshape, kernel):
    q, k, v = make_inputs(2, 4, 2, 113, 203, 16, dtype=F64)
    bias = (3 * torch.randn(bshape, dtype=F64)).requires_grad_()
    a = selfattn.attention(q, k, v, masks.causal(), bias=bias, kernel=kernel, block_q=64, block_k=128)
    b = selfattn.attention(q, k, v, masks.causal(), kernel=kernel, block_q=64, block_k=128)
    assert max_err(a, b) <= 1e-12
    (dbias,) = torch.autograd.grad(a, bias, torch.randn_like(a))
    assert dbias.shape == bshape and dbias.abs().max() <= 1e-10


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_float32_bias_with_half_inputs(dtype):
    r = check_attention(1, 4, 2, 113, 203, 16, dtype=dtype, bias=(1, 4, 113, 203), bias_dtype=F32, kernel="tiled",
                        **SMALL_BLOCKS)
    assert r.grads["dbias"].dtype == F32


def test_bias_without_grad_and_mask_with_bias_inf():
    # a bias holding -inf acts as a mask; rows it empties entirely behave like masked rows
    bias = torch.zeros(113, 203, dtype=F32)
    bias[:, 150:] = float("-inf")
    bias[3] = float("-inf")
    for kernel in ("tiled", "reference"):
        r = check_attention(1, 2, 1, 113, 203, 16, bias=bias, kernel=kernel)
        assert torch.isneginf(r.lse[:, :, 3]).all() and (r.out[:, :, 3] == 0).all()
        assert (r.grads["dq"][:, :, 3] == 0).all()


# --- gradcheck -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [None, masks.causal(), masks.causal("top_left")], ids=["none", "br", "tl"])
@pytest.mark.parametrize("Nq,Nk", [(5, 7), (7, 5)])
def test_gradcheck_tiled(mask, Nq, Nk):
    q, k, v = make_inputs(1, 4, 2, Nq, Nk, 3, Dv=2, dtype=F64, seed=Nq)
    bias = torch.randn(1, 4, Nq, Nk, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    bias2 = torch.randn(Nk, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_()

    def f(q, k, v, bias, bias2):
        return selfattn.attention(q, k, v, mask, bias=bias + bias2, kernel="tiled", block_q=2, block_k=3)

    assert torch.autograd.gradcheck(f, (q, k, v, bias, bias2), fast_mode=True)


def test_gradcheck_tiled_empty_rows_and_gqa():
    q, k, v = make_inputs(2, 4, 1, 6, 5, 3, dtype=F64)
    m = _rand_mask((2, 4, 6, 5), 0.5, seed=3)
    m[:, :, 2] = False
    m[:, :, :, 4] = False  # a dead key: its K/V rows are zeroed, their gradient must still be exact (0)

    def f(q, k, v):
        return selfattn.attention(q, k, v, m, kernel="tiled", block_q=2, block_k=2)

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


# --- determinism -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_bit_identical_repeats(kernel):
    q, k, v = make_inputs(1, 4, 2, 65, 130, 16, Dv=24)
    bias = torch.randn(1, 4, 1, 130).requires_grad_()
    do = torch.randn(1, 4, 65, 24)
    first = None
    for _ in range(20):
        out, lse = selfattn.attention(q, k, v, masks.causal(), bias=bias, return_lse=True, kernel=kernel,
                                      dropout_p=0.1, generator=torch.Generator().manual_seed(3),
                                      **(dict(block_q=32, block_k=64) if kernel == "tiled" else {}))
        gs = torch.autograd.grad(out, (q, k, v, bias), do)
        got = (out, lse, *gs)
        if first is None:
            first = got
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, got))


# --- empty rows ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_empty_rows(kernel, dtype):
    m = _rand_mask((2, 4, 113, 203), 0.6, seed=8)
    m[0, 1, 5] = False  # one row of one head
    m[1, :, 100:] = False  # the last 13 rows of every head of batch 1
    r = check_attention(2, 4, 2, 113, 203, 16, dtype=dtype, mask=m, bias=(1, 4, 113, 1), kernel=kernel,
                        **(SMALL_BLOCKS if kernel == "tiled" else {}))
    empty = ~m.any(-1)  # (B, H, Nq)
    assert torch.isneginf(r.lse[empty]).all() and torch.isfinite(r.lse[~empty]).all()
    assert (r.out[empty] == 0).all()
    assert (r.grads["dq"][empty] == 0).all()
    assert (r.grads["dbias"][0, :, 100:] != 0).any()  # batch 0 still sends gradient there
    for g in r.grads.values():
        assert not torch.isnan(g).any()


@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_bottom_right_causal_with_more_queries_than_keys_has_empty_rows(kernel):
    # query i sees keys j <= i + Nk - Nq: the first Nq - Nk queries see nothing
    r = check_attention(1, 2, 1, 203, 113, 8, mask=masks.causal("bottom_right"), kernel=kernel,
                        **(SMALL_BLOCKS if kernel == "tiled" else {}))
    assert torch.isneginf(r.lse[:, :, :90]).all() and torch.isfinite(r.lse[:, :, 90:]).all()
    assert (r.out[:, :, :90] == 0).all() and (r.grads["dq"][:, :, :90] == 0).all()
    r = check_attention(1, 2, 1, 203, 113, 8, mask=masks.causal("top_left"), kernel=kernel)
    assert torch.isfinite(r.lse).all()


@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_fully_masked(kernel):
    m = torch.zeros(1, 1, 113, 203, dtype=torch.bool)
    r = check_attention(2, 4, 2, 113, 203, 16, mask=m, bias=(2, 4, 113, 203), kernel=kernel)
    assert (r.out == 0).all() and torch.isneginf(r.lse).all()
    for g in r.grads.values():
        assert (g == 0).all()


# --- NaN / Inf in keys no query may see ------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["tiled", "reference"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 4)])
def test_poison_in_masked_keys(kernel, poison, Hq, Hkv):
    B, Nq, Nk, D = 2, 113, 203, 16
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, requires_grad=False)
    lengths = [150, 203]
    pad = torch.arange(Nk)[None, :] < torch.tensor(lengths)[:, None]  # (B, Nk)
    m = pad[:, None, None, :]  # (B, 1, 1, Nk) key padding
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, :, 150:] = poison
    v_bad[0, :, 150:] = poison
    blocks = SMALL_BLOCKS if kernel == "tiled" else {}
    do = torch.randn(B, Hq, Nq, D)

    def run(k_, v_, mask):
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k_, v_))
        out = selfattn.attention(qq, kk, vv, mask, bias=torch.zeros(Nq, Nk), kernel=kernel, **blocks)
        return (out, *torch.autograd.grad(out, (qq, kk, vv), do))

    clean = run(k, v, m)
    for mask in (m, m & masks.causal().dense(1, 1, Nq, Nk)):  # also with a partial tile pattern on top
        got = run(k_bad, v_bad, mask)
        want = clean if mask is m else run(k, v, mask)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert not torch.isnan(a).any() and torch.isfinite(a).all(), name
            assert max_err(a, b) <= 1e-6, name
        assert (got[2][0, :, 150:] == 0).all() and (got[3][0, :, 150:] == 0).all()


# --- kernel choice ---------------------------------------------------------------------------------------
def _spy(monkeypatch):
    """Records which kernel's forward primitive ran (the kernel contract: module.forward(call))."""
    called = []
    for module in functional._KERNEL_MODULES:
        def spy(call, _real=module.forward, _name=module.NAME):
            called.append(_name)
            return _real(call)

        monkeypatch.setattr(module, "forward", spy)
    return called


def test_automatic_choice_follows_documented_rule(monkeypatch):
    """The torch-op kernels' rule, with the native kernel switched off (it comes first when it can serve: see
    tests/test_native.py)."""
    monkeypatch.setenv("SELFATTN_NATIVE", "0")
    called = _spy(monkeypatch)
    limit = functional.AUTO_REFERENCE_MAX_SCORES
    small = (int(math.isqrt(limit)), int(math.isqrt(limit)))  # Nq·Nk == limit -> reference
    large = (small[0], small[1] + 1)  # one more key -> tiled
    rows = functional.DECODE_MAX_ROWS
    causal = masks.causal()
    cases = [
        # (Nq, Nk, Hq, mask, dtype) -> kernel
        ((*small, 1, None, torch.float32), "reference"),
        ((*large, 1, None, torch.float32), "tiled"),
        ((1, 1, 1, None, torch.float32), "decode"),  # one query row, nothing masked: a generation step
        ((1, limit + 1, 1, None, torch.float64), "decode"),
        ((1, 300, rows, None, torch.float32), "decode"),  # G·Nq == DECODE_MAX_ROWS rows per KV head
        ((1, 300, rows, causal, torch.float32), "decode"),  # bottom-right causal lets the last query see all
        ((2, 300, rows, None, torch.float32), "reference"),  # G·Nq one row too many
        ((2, 300, 1, causal, torch.float32), "reference"),  # causal forbids the first query's last key
        ((1, limit, 1, None, torch.bfloat16), "reference"),  # decode serves float32/float64 only
        ((1, limit + 1, 1, None, torch.bfloat16), "tiled"),
    ]
    for (Nq, Nk, Hq, mask, dtype), want in cases:
        q, k, v = make_inputs(1, Hq, 1, Nq, Nk, 4, dtype=dtype, requires_grad=False)
        called.clear()
        selfattn.attention(q, k, v, mask)
        assert called == [want], (Nq, Nk, Hq, mask, dtype)
        p = selfattn.plan(1, Hq, Nq, Nk, 4, Hkv=1, mask=mask, dtype=dtype)
        assert p.kernel == want and "automatic" in p.reason
    q, k, v = make_inputs(1, 1, 1, 1, 50, 4, requires_grad=False)
    for kernel in ("tiled", "reference", "decode"):
        called.clear()
        selfattn.attention(q, k, v, kernel=kernel)
        assert called == [kernel]
        assert selfattn.plan(1, 1, 1, 50, 4, kernel=kernel).kernel == kernel
    # a named decode kernel that cannot serve the call says why
    with pytest.raises(ValueError, match="kernel='decode' cannot serve this call: a bias"):
        selfattn.attention(q, k, v, bias=torch.zeros(1, 50), kernel="decode")
    with pytest.raises(ValueError, match="kernel='decode' cannot serve this call: a mask"):
        selfattn.attention(q, k, v, torch.arange(50) < 10, kernel="decode")
    with pytest.raises(ValueError, match="kernel='decode' cannot serve this call: dropout"):
        selfattn.attention(q, k, v, dropout_p=0.1, kernel="decode")


def test_reference_refuses_above_byte_limit(monkeypatch):
    monkeypatch.setenv("SELFATTN_REFERENCE_MAX_BYTES", "4096")  # 1024 fp32 scores
    q, k, v = make_inputs(1, 2, 1, 17, 33, 8, requires_grad=False)  # 2·17·33 = 1122 scores > 1024
    with pytest.raises(ValueError, match="kernel='reference'.*SELFATTN_REFERENCE_MAX_BYTES"):
        selfattn.attention(q, k, v, kernel="reference")
    with pytest.raises(ValueError, match="kernel='reference'"):
        selfattn.plan(1, 2, 17, 33, 8, kernel="reference")
    out = selfattn.attention(q, k, v, kernel="tiled")
    assert out.shape == (1, 2, 17, 8)
    q, k, v = make_inputs(1, 2, 1, 16, 32, 8, requires_grad=False)  # 1024 scores: exactly at the limit
    selfattn.attention(q, k, v, kernel="reference")


def test_automatic_choice_respects_reference_byte_limit(monkeypatch):
    # a small per-head problem with a huge B·H: the automatic rule must not pick a kernel that then refuses
    monkeypatch.setenv("SELFATTN_REFERENCE_MAX_BYTES", "4096")
    monkeypatch.setenv("SELFATTN_NATIVE", "0")  # the torch-op kernels' rule
    called = _spy(monkeypatch)
    q, k, v = make_inputs(1, 2, 1, 17, 33, 8, requires_grad=False)
    out = selfattn.attention(q, k, v)
    assert called == ["tiled"] and out.shape == (1, 2, 17, 8)
    assert selfattn.plan(1, 2, 17, 33, 8).kernel == "tiled"


# --- score modifiers and dropout through the oracle ------------------------------------------------------
class _LearnedDistance(selfattn.scores.ScoreMod):
    """A learned per-head slope times (k - q) and a learned per-key offset: parameters that get gradients."""

    def __init__(self, H, Nk, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.slope = (0.1 * torch.randn(H, 1, 1, generator=g)).requires_grad_()  # (H, 1, 1)
        self.offset = torch.randn(Nk, generator=g).requires_grad_()  # (Nk,)

    def __call__(self, s, q_idx, k_idx):
        return s + self.slope * (k_idx - q_idx).to(s.dtype) + self.offset[k_idx[0]].to(s.dtype)

    def parameters(self):
        return (self.slope, self.offset)


@pytest.mark.parametrize("kernel,dtype", [("tiled", F32), ("tiled", F64), ("tiled", BF16), ("reference", F32)],
                         ids=str)
def test_learned_score_mod(kernel, dtype):
    mod = _LearnedDistance(4, 203)
    r = check_attention(2, 4, 2, 113, 203, 16, dtype=dtype, mask=masks.causal(), bias=[(1, 4, 1, 203), mod],
                        kernel=kernel, **(SMALL_BLOCKS if kernel == "tiled" else {}))
    assert set(r.grads) == {"dq", "dk", "dv", "dbias", "dparam0", "dparam1"}
    assert r.grads["dparam0"].shape == (4, 1, 1) and r.grads["dparam1"].shape == (203,)


@pytest.mark.parametrize("kernel", ["tiled", "reference"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_dropout_through_oracle(kernel, dtype):
    check_attention(2, 4, 2, 113, 203, 16, dtype=dtype, mask=masks.causal(), bias=(1, 4, 113, 203), dropout_p=0.25,
                    kernel=kernel, seed=9, **(SMALL_BLOCKS if kernel == "tiled" else {}))


@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_poison_in_bias_where_masked(kernel):
    # an additive bias that holds NaN/-inf exactly where the bool mask forbids: neither reaches out or grads
    q, k, v = make_inputs(2, 4, 2, 113, 203, 16)
    m = _rand_mask((2, 1, 113, 203), 0.7, seed=2)
    bias = torch.randn(2, 4, 113, 203)
    bad = bias.masked_fill(~m, float("nan"))
    bad[:, :, :, :5] = torch.where(m[..., :5], bad[..., :5], torch.tensor(float("-inf")))
    do = torch.randn(2, 4, 113, 16)
    res = []
    for b in (bias, bad):
        b = b.clone().requires_grad_()
        out = selfattn.attention(q, k, v, m, bias=b, kernel=kernel, **(SMALL_BLOCKS if kernel == "tiled" else {}))
        res.append((out, *torch.autograd.grad(out, (q, k, v, b), do)))
    for a, b in zip(*res):
        assert torch.isfinite(b).all() and max_err(a, b) == 0.0
    assert (res[1][4][~m.expand(2, 4, 113, 203)] == 0).all()


@pytest.mark.parametrize("kernel", ["tiled", "reference"])
def test_partial_requires_grad_and_no_grad(kernel):
    q, k, v = make_inputs(1, 4, 2, 113, 203, 16, requires_grad=False)
    blocks = SMALL_BLOCKS if kernel == "tiled" else {}
    v.requires_grad_()
    out = selfattn.attention(q, k, v, masks.causal(), kernel=kernel, **blocks)
    (dv,) = torch.autograd.grad(out.sum(), v)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64 = selfattn.attention(q64, k64, v64, masks.causal(), kernel="reference")
    (dv64,) = torch.autograd.grad(out64.sum(), v64)
    assert max_err(dv, dv64) <= 1e-5 * dv64.abs().max()
    with torch.no_grad():
        out2 = selfattn.attention(q, k, v, masks.causal(), kernel=kernel, **blocks)
    assert not out2.requires_grad and torch.equal(out2, out.detach())
