"""Bad inputs to ``selfattn.attention`` raise ValueError/TypeError whose message names the argument (STYLE.md #14).

Shape legend: B batch, Hq query heads, Hkv key/value heads, Nq queries, Nk keys, D head dim.
"""
import math

import pytest
import torch

import selfattn
from selfattn import masks, scores


def qkv(B=2, Hq=4, Hkv=2, Nq=5, Nk=7, D=8, Dv=None, dtype=torch.float32):
    Dv = D if Dv is None else Dv
    return (torch.randn(B, Hq, Nq, D, dtype=dtype), torch.randn(B, Hkv, Nk, D, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, dtype=dtype))


def raises(exc, name, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises exc and the message starts by naming the argument ``name``."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert msg.startswith(name) or f"{name}:" in msg or f"{name} " in msg, msg
    return msg


# --- q, k, v ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("ndim", [3, 5])
def test_wrong_rank(which, ndim):
    t = list(qkv())
    x = t[which]
    t[which] = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) if ndim == 3 else x[None]
    msg = raises(ValueError, "qkv"[which], selfattn.attention, *t)
    assert "4 dims" in msg and str(tuple(t[which].shape)) in msg


@pytest.mark.parametrize("which", [0, 1, 2])
def test_not_a_tensor(which):
    t = list(qkv())
    t[which] = t[which].tolist()
    msg = raises(TypeError, "qkv"[which], selfattn.attention, *t)
    assert "list" in msg


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_dtype(which, dtype):
    t = list(qkv())
    t[which] = t[which].to(dtype)
    msg = raises(TypeError, "qkv"[which], selfattn.attention, *t)
    assert str(dtype) in msg


@pytest.mark.parametrize("which", [1, 2])
def test_dtype_mismatch(which):
    t = list(qkv())
    t[which] = t[which].double()
    msg = raises(TypeError, "k, v", selfattn.attention, *t)
    assert "float64" in msg and "float32" in msg


@pytest.mark.parametrize("which", [1, 2])
def test_device_mismatch(which):
    t = list(qkv())
    t[which] = t[which].to("meta")
    msg = raises(ValueError, "k, v", selfattn.attention, *t)
    assert "meta" in msg and "cpu" in msg


def test_heads_not_a_multiple():
    msg = raises(ValueError, "k", selfattn.attention, *qkv(Hq=6, Hkv=4))
    assert "Hq=6" in msg and "Hkv=4" in msg
    raises(ValueError, "k", selfattn.attention, *qkv(Hq=4, Hkv=8))


def test_zero_kv_heads():
    raises(ValueError, "k", selfattn.attention, *qkv(Hq=4, Hkv=0))


def test_head_dim_mismatch():
    q, k, v = qkv(D=8)
    msg = raises(ValueError, "k", selfattn.attention, q, k[..., :6], v)
    assert "D=8" in msg


def test_kv_heads_differ():
    q, k, v = qkv()
    raises(ValueError, "v", selfattn.attention, q, k, v[:, :1])


def test_kv_lengths_differ():
    q, k, v = qkv()
    msg = raises(ValueError, "v", selfattn.attention, q, k, v[:, :, :3])
    assert "Nk=7" in msg


def test_batch_differs():
    q, k, v = qkv()
    raises(ValueError, "k, v", selfattn.attention, q, k[:1], v[:1])


# --- mask ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (3, 1, 1, 7), (1, 4, 2, 7), (8,), (1, 2, 1, 4, 5, 7)], ids=str)
def test_mask_not_broadcastable(shape):
    msg = raises(ValueError, "mask", selfattn.attention, *qkv(), torch.ones(shape, dtype=torch.bool))
    assert "(2, 4, 5, 7)" in msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.uint8, torch.float16])
def test_mask_not_bool(dtype):
    msg = raises(TypeError, "mask", selfattn.attention, *qkv(), torch.ones(5, 7, dtype=dtype))
    assert "bool" in msg and str(dtype) in msg


@pytest.mark.parametrize("bad", [[[True] * 7] * 5, "causal", 1.0])
def test_mask_wrong_type(bad):
    raises(TypeError, "mask", selfattn.attention, *qkv(), bad)


def test_mask_wrong_device():
    msg = raises(ValueError, "mask", selfattn.attention, *qkv(), torch.ones(5, 7, dtype=torch.bool, device="meta"))
    assert "meta" in msg


def test_mask_object_from_tensor_wrong_shape():
    m = masks.from_tensor(torch.ones(4, 7, dtype=torch.bool))
    raises(ValueError, "mask", selfattn.attention, *qkv(), m)
    raises(ValueError, "mask", selfattn.attention, *qkv(), masks.causal() & m)


def test_bool_masks_of_every_broadcastable_rank_are_accepted():
    q, k, v = qkv()
    full = torch.rand(5, 7) > 0.3
    full[:, 0] = True
    want = selfattn.attention(q, k, v, full)
    assert torch.equal(selfattn.attention(q, k, v, full[None, None]), want)
    assert torch.equal(selfattn.attention(q, k, v, full[None]), want)
    assert torch.equal(selfattn.attention(q, k, v, torch.tensor(True)), selfattn.attention(q, k, v))
    assert torch.equal(selfattn.attention(q, k, v, full[0]), selfattn.attention(q, k, v, full[:1]))


# --- bias ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (3, 1, 1, 7), (4, 1, 1, 1, 1), (6,), (5, 1, 1)], ids=str)
def test_bias_not_broadcastable(shape):
    msg = raises(ValueError, "bias", selfattn.attention, *qkv(), bias=torch.zeros(shape))
    assert "(2, 4, 5, 7)" in msg


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int32])
def test_bias_not_float(dtype):
    msg = raises(TypeError, "bias", selfattn.attention, *qkv(), bias=torch.zeros(5, 7, dtype=dtype))
    assert str(dtype) in msg


def test_bias_wrong_device():
    raises(ValueError, "bias", selfattn.attention, *qkv(), bias=torch.zeros(5, 7, device="meta"))


class _Shift(scores.ScoreMod):
    def __call__(self, s, q_idx, k_idx):
        return s + 1.0


@pytest.mark.parametrize("bad", ["alibi", 3.0, [torch.zeros(5, 7), "x"], [_Shift(), torch.zeros(5, 7)],
                                 [torch.zeros(5, 7), torch.zeros(5, 7)], (None,), {"a": 1}],
                         ids=["str", "float", "list-with-str", "tensor-not-first", "two-tensors", "tuple-none",
                              "dict"])
def test_bad_bias(bad):
    exc = ValueError if isinstance(bad, list) and all(isinstance(b, (torch.Tensor, scores.ScoreMod)) for b in bad) \
        else TypeError
    raises(exc, "bias", selfattn.attention, *qkv(), bias=bad)


def test_good_bias_lists_are_accepted():
    q, k, v = qkv()
    b = torch.randn(5, 7)
    want = selfattn.attention(q, k, v, bias=b + 1.0)
    for bias in ([b, _Shift()], (b, _Shift())):
        torch.testing.assert_close(selfattn.attention(q, k, v, bias=bias), want)
    torch.testing.assert_close(selfattn.attention(q, k, v, bias=[_Shift(), _Shift()]),
                               selfattn.attention(q, k, v))


def test_bias_list_in_list_bad_shape():
    raises(ValueError, "bias", selfattn.attention, *qkv(), bias=[torch.zeros(4, 7), _Shift()])


# --- scalars and kernel ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_dropout_out_of_range(p):
    msg = raises(ValueError, "dropout_p", selfattn.attention, *qkv(), dropout_p=p)
    assert "[0, 1)" in msg


@pytest.mark.parametrize("p", ["0.1", None, True, torch.tensor(0.1), [0.1]])
def test_dropout_not_a_number(p):
    raises(TypeError, "dropout_p", selfattn.attention, *qkv(), dropout_p=p)


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
def test_scale_not_finite(scale):
    raises(ValueError, "scale", selfattn.attention, *qkv(), scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, torch.tensor(0.5), [1.0]])
def test_scale_not_a_number(scale):
    raises(TypeError, "scale", selfattn.attention, *qkv(), scale=scale)


@pytest.mark.parametrize("kernel", ["flash", "Tiled", "", "sdpa"])
def test_unknown_kernel(kernel):
    msg = raises(ValueError, "kernel", selfattn.attention, *qkv(), kernel=kernel)
    assert "reference" in msg and "tiled" in msg
    raises(ValueError, "kernel", selfattn.plan, 1, 1, 5, 7, 8, kernel=kernel)


def test_validation_runs_before_any_work_on_meta_tensors():
    # every check above is about metadata: a meta q with meta k/v and a bad kernel still fails on the kernel
    q, k, v = (t.to("meta") for t in qkv())
    raises(ValueError, "kernel", selfattn.attention, q, k, v, kernel="nope")

