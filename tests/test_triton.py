"""The Triton kernels (kernels/triton/) against the float64 reference, by the oracle rule, on CPU through triton's
interpreter (TRITON_INTERPRET=1, set here before the kernels import triton's jit). Tiny hostile shapes and 16 x 16
tiles: the interpreter runs every program in Python, so the suite stays near a minute on two cores.

Skipped, with the reason, only where triton cannot be imported. Until functional.py lists the kernel, a fixture
registers it for the duration of each test (and sets SELFATTN_TRITON_ON_CPU=1 only then, so no other test's
automatic choice can meet it on CPU tensors).

Shape legend: B batch, Hq/Hkv heads, Nq/Nk lengths, D/Dv head dims.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the kernels' triton.jit

import pytest
import torch

import selfattn
from oracle import check_attention, make_inputs
from selfattn import functional, masks, scores
from selfattn.kernels import reference
from selfattn.kernels import triton as tk

# triton is installed by the README's test command (the [triton] extra): its absence is a failed set-up, not a skip
assert tk.available(), f"triton unavailable: {tk._IMPORT_ERROR}; run bash scripts/setup-env.sh"

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BLK = dict(block_q=16, block_k=16)  # several tiles per row at interpreter-sized shapes


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was set to something other than 1 before this module loaded")
    monkeypatch.setenv("SELFATTN_TRITON_ON_CPU", "1")
    if "triton" not in functional.KERNELS:
        monkeypatch.setattr(functional, "KERNELS", functional.KERNELS + ("triton",))
        monkeypatch.setitem(functional._BY_NAME, "triton", tk)


def check(*shape, **kw):
    kw = {**BLK, **kw}
    return check_attention(*shape, kernel="triton", **kw)


def _ids(rows):
    return masks.document_ids(rows)


# -- shapes and dtypes -----------------------------------------------------------------------------------------
SHAPES = [  # B, Hq, Hkv, Nq, Nk, D, Dv
    (1, 2, 2, 17, 113, 40, None),
    (1, 4, 2, 113, 17, 64, 24),   # GQA 4:2, Nq > Nk, Dv != D
    (1, 4, 1, 17, 17, 16, None),  # MQA
    (1, 2, 1, 1, 17, 40, None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_fp32(shape):
    check(*shape, dtype=F32)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_half_dtypes(dtype):
    check(1, 4, 2, 33, 40, 40, dtype=dtype, mask=masks.causal())


def test_noncontiguous_and_default_tiles():
    check(1, 2, 1, 130, 70, 16, dtype=F32, noncontig=True, block_q=None, block_k=None)  # 128 x 64 tiles


# -- masks -------------------------------------------------------------------------------------------------------
MASKS = {
    "causal": masks.causal(),
    "causal_top_left": masks.causal("top_left"),
    "window": masks.sliding_window(9, 4),
    "window_and_causal": masks.sliding_window(12) & masks.causal(),
    "pad_len_empty_row": masks.key_padding([31, 0]),  # batch row 1: every query row empty
    "pad_keep": masks.key_padding(torch.rand(2, 40, generator=torch.Generator().manual_seed(3)) > 0.4),
    "document": masks.document(_ids([[10, 13, 10], [28, 0, 5]]), _ids([[10, 20, 10], [30, 0, 10]])),
    "document_and_causal": masks.document(_ids([[15, 25], [30, 10]])) & masks.causal(),
    "prefix": masks.prefix_lm([7, 30]),
    "dense_per_head": masks.from_tensor(torch.rand(2, 2, 33, 40, generator=torch.Generator().manual_seed(4)) > 0.6),
    "or_not": masks.causal() | ~masks.sliding_window(5, 5),
    "four_atoms": (masks.causal() | masks.prefix_lm([5, 9])) & masks.key_padding([35, 40]) &
                  ~masks.sliding_window(2, 0),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks(name):
    m = MASKS[name]
    Nq, Nk = (40, 40) if name.startswith("document_and") else (33, 40)
    check(2, 2, 1, Nq, Nk, 16, dtype=F32, mask=m)


def test_too_many_atoms_refused():
    m = (masks.causal() & masks.key_padding([9]) & masks.prefix_lm([2]) & masks.key_padding([8]) &
         masks.causal("top_left"))
    q, k, v = make_inputs(1, 1, 1, 9, 9, 16, requires_grad=False)
    call, _, _ = functional.prepare(q, k, v, m)
    assert "at most 4" in tk.why_not(call)


# -- bias and modifiers ------------------------------------------------------------------------------------------
TAB = torch.randn(32, 2, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
TAB8 = torch.randn(8, 2, generator=torch.Generator().manual_seed(7)).requires_grad_(True)  # fewer bucket passes
BIASES = {
    "full": (2, 2, 33, 40),
    "per_head_key": (1, 2, 1, 40),
    "batch_row": (2, 1, 33, 1),
    "scalar": (1, 1, 1, 1),
    "alibi": scores.alibi(num_heads=2),
    "alibi_sym": scores.alibi(num_heads=2, symmetric=True),
    "softcap": scores.softcap(2.0),
    "t5": scores.t5_relative(TAB),
    "t5_uni": scores.t5_relative(TAB8, bidirectional=False, num_buckets=8, max_distance=20),
    "tensor_t5_softcap": [(2, 1, 33, 40), scores.t5_relative(TAB8, num_buckets=8, max_distance=16),
                          scores.softcap(3.0)],
    "alibi_softcap": [scores.alibi(num_heads=2), scores.softcap(1.5)],
}


@pytest.mark.parametrize("name", sorted(BIASES))
def test_bias_and_modifiers(name):
    check(2, 2, 1, 33, 40, 16, dtype=F32, bias=BIASES[name], mask=masks.causal())


def test_modifiers_half():
    t5 = scores.t5_relative(TAB8, num_buckets=8, max_distance=16)
    check(1, 2, 1, 33, 40, 40, dtype=F16, bias=[(1, 2, 33, 40), t5, scores.softcap(3.0)])


# -- dropout -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", [None, masks.causal()], ids=["none", "causal"])
def test_dropout_matches_reference_bits(mask):
    # the reference regenerates the same counter-based pattern: any differing kept entry fails the bound
    check(2, 2, 1, 33, 40, 16, dtype=F32, dropout_p=0.3, mask=mask, seed=11)


def test_dropout_pattern_equals_reference_exactly():
    # v = one-hot keys: out[b, h, i, j] = kept(i, j) · w(i, j) / (1 - p), so the kept entries are readable
    B, H, N = 1, 2, 33
    q, k, _ = make_inputs(B, H, H, N, N, 16, requires_grad=False, seed=2)
    v = torch.eye(N).expand(B, H, N, N).contiguous()
    outs = []
    for kernel in ("reference", "triton"):
        outs.append(selfattn.attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(5),
                                       kernel=kernel, **({} if kernel == "reference" else BLK)))
    assert torch.equal(outs[0] == 0, outs[1] == 0)


# -- decode (split-KV) -------------------------------------------------------------------------------------------
def test_decode_gqa():
    check(2, 8, 2, 2, 113, 40, dtype=F32, block_k=16)


def test_decode_masks_and_modifiers():
    ids = _ids([[50, 63]])
    m = masks.causal() & masks.document(ids[:, -3:], ids)
    check(1, 4, 4, 3, 113, 16, dtype=F32, mask=m, bias=[(1, 4, 3, 113), scores.alibi(), scores.softcap(3.0)],
          block_k=16)


def test_decode_half_and_empty_rows():
    check(2, 4, 2, 1, 113, 64, dtype=BF16, block_k=16, mask=masks.key_padding([100, 0]))


# -- positions, empty inputs, determinism, refusals --------------------------------------------------------------
def test_offsets_match_reference():
    q, k, v = make_inputs(2, 2, 1, 33, 50, 16, dtype=F32, seed=7, requires_grad=False)
    kw = dict(mask=masks.causal(), bias=[scores.alibi(num_heads=2), scores.softcap(4.0)], dropout_p=0.2, seed=3,
              q_offset=40, k_offset=3)
    c64, _, _ = functional.prepare(q.double(), k.double(), v.double(), **kw)
    c, _, _ = functional.prepare(q, k, v, **kw, **BLK)
    ro, rl = reference.math_(c64)
    o, lse = tk.forward(c)
    assert (o.double() - ro).abs().max() < 1e-5
    assert (lse.double() - rl).abs().max() < 1e-5


def test_no_keys_and_no_queries():
    for Nq, Nk in ((0, 17), (17, 0)):
        q, k, v = make_inputs(1, 2, 1, Nq, Nk, 16, requires_grad=True)
        out, lse = selfattn.attention(q, k, v, kernel="triton", return_lse=True)
        assert out.shape == (1, 2, Nq, 16) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())
        out.sum().backward()
        assert all(bool((t.grad == 0).all()) for t in (q, k, v))


def test_deterministic():
    q, k, v = make_inputs(1, 2, 1, 33, 40, 16, seed=9)
    bias = torch.randn(1, 2, 1, 40, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    runs = []
    for _ in range(2):
        out = selfattn.attention(q, k, v, masks.causal(), bias=bias, kernel="triton", **BLK)
        runs.append((out, *torch.autograd.grad(out, (q, k, v, bias), torch.ones_like(out))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_refusals(monkeypatch):
    q, k, v = make_inputs(1, 2, 1, 9, 9, 16, requires_grad=False)
    call, _, _ = functional.prepare(q, k, v)
    assert tk.why_not(call) is None
    monkeypatch.delenv("SELFATTN_TRITON_ON_CPU")
    assert "CUDA" in tk.why_not(call)  # the automatic choice never meets the interpreter on CPU tensors
    monkeypatch.setenv("SELFATTN_TRITON_ON_CPU", "1")
    call64, _, _ = functional.prepare(q.double(), k.double(), v.double())
    assert "dtype" in tk.why_not(call64)
    odd, _, _ = functional.prepare(q, k, v, block_q=24)
    assert "powers of two" in tk.why_not(odd)
    monkeypatch.setattr(tk, "_IMPORT_ERROR", "triton is not installed (test)")
    assert tk.why_not(call).startswith("triton is not installed")
