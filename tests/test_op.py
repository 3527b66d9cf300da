"""The torch.library ops of the compiled kernels (kernels/op.py): opcheck on a sample of calls, the lowered mask
rebuilt inside the op, data checks inside the op."""
import os
import shutil

import pytest
import torch

import selfattn
from selfattn import functional, masks, scores
from selfattn.kernels import lowering, native, op

_AVAILABLE = native.available()  # loads the library (or records why not) before the reason is read
# Skipped only where the kernel cannot exist (switched off, or no C++ compiler); with a compiler, a missing
# library is a failed build: the tests then fail instead of hiding it
_NO_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None
pytestmark = pytest.mark.skipif(not _AVAILABLE and (native._disabled() is not None or _NO_COMPILER),
                                reason=f"native kernel unavailable ({native._disabled() or native._load_error}): no compiled kernel runs on CPU")

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def _inputs(B=2, Hq=4, Hkv=2, Nq=12, Nk=16, D=8, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype)
    return q, k, v


def _samples():
    """(name, args of selfattn.attention): every mask kind, GQA, bias, modifiers, dropout, three dtypes."""
    ids_q = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    ids_k = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    tab = torch.randn(32, 4, dtype=F64)
    yield "causal gqa fp32", _inputs(), dict(mask=masks.causal())
    yield "window&causal bf16", _inputs(dtype=BF16), dict(mask=masks.sliding_window(3) & masks.causal())
    yield "padding lengths, bias", _inputs(), dict(mask=masks.key_padding([10, 16]),
                                                   bias=torch.randn(1, 4, 12, 16))
    yield "padding bool | ~causal fp64", _inputs(dtype=F64), dict(
        mask=masks.key_padding(torch.stack([torch.arange(16) < 9, torch.arange(16) > 2])) | ~masks.causal())
    yield "document, t5 fp64", _inputs(dtype=F64), dict(mask=masks.document(ids_q, ids_k),
                                                        bias=scores.t5_relative(tab, True))
    yield "prefix, alibi+softcap", _inputs(), dict(mask=masks.prefix_lm(4),
                                                   bias=[scores.alibi(num_heads=4), scores.softcap(5.0)])
    yield "dense tensor, dropout", _inputs(), dict(mask=torch.rand(12, 16, generator=torch.Generator()
                                                                   .manual_seed(1)) > 0.3, dropout_p=0.25)


def _op_args(qkv, kw, grad=False):
    q, k, v = (t.clone().requires_grad_(grad) for t in qkv)
    kw = dict(kw)
    if grad and isinstance(kw.get("bias"), torch.Tensor):
        kw["bias"] = kw["bias"].clone().requires_grad_()
    seed = 1234 if kw.get("dropout_p", 0.0) > 0 else 0
    call, module, _ = functional.prepare(q, k, v, kw.pop("mask", None), seed=seed, kernel="native", **kw)
    assert module.NAME == "native"
    return op.op_args(call, "native")


@pytest.mark.parametrize("name,qkv,kw", list(_samples()), ids=[s[0] for s in _samples()])
def test_opcheck_forward_and_backward(name, qkv, kw):
    args = _op_args(qkv, kw, grad=True)
    torch.library.opcheck(torch.ops.selfattn.forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse = torch.ops.selfattn.forward(*args)
    q, k, v, bias = (t.detach() if t is not None else None for t in args[:4])
    needs = [int(bias is not None)] + [0] * len(args[7])  # dbias when there is a bias; no table gradients
    bargs = (torch.randn_like(out), q, k, v, bias, out.detach(), lse, *args[4:], needs)
    torch.library.opcheck(torch.ops.selfattn.backward.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))


def test_the_op_gives_the_eager_kernel_answer():
    """The op's implementation rebuilds the call from its lowering: same bits as the native kernel called on the
    original call (forward and every gradient)."""
    for name, qkv, kw in _samples():
        grads = []
        for through_op in (True, False):
            q, k, v = (t.clone().requires_grad_() for t in qkv)
            kw2 = dict(kw)
            call, module, _ = functional.prepare(q, k, v, kw2.pop("mask", None), seed=77, kernel="native", **kw2)
            if through_op:
                out, lse = op.run(call, "native")
            else:
                out, lse = functional._KernelFunction.apply(module, call, q, k, v, call.bias, *call.mod_params)
            out.float().pow(2).sum().backward()
            grads.append([out.detach(), lse, q.grad, k.grad, v.grad])
        for a, b in zip(*grads):
            assert torch.equal(a, b), name


def test_data_checks_run_inside_the_op():
    """The lengths reach the op as a tensor nobody read on the host: a length beyond Nk is refused by the op's
    implementation (``Mask.check_data``), not by a host read on the traced path."""
    args = list(_op_args(_inputs(B=2), dict(mask=masks.key_padding([3, 16]))))
    assert args[5][0] == lowering.ATOM_CODES["pad_len"]
    args[4] = [torch.tensor([3, 99])]  # mask_data: the lengths
    with pytest.raises(ValueError, match="99"):
        torch.ops.selfattn.forward(*args)


def test_native_hands_rare_data_to_the_tiled_kernel_inside_the_op():
    """NaN in a value some query sees under a mask: read inside the run, served by the tiled kernel (same answer
    as the reference), not refused by why_not (which reads shapes only)."""
    q, k, v = _inputs(dtype=F64)
    v = v.clone()
    v[0, 0, 3, 0] = float("nan")
    call, module, _ = functional.prepare(q, k, v, masks.causal())
    assert module.NAME == "native"
    got = selfattn.attention(q, k, v, masks.causal())
    want = selfattn.attention(q, k, v, masks.causal(), kernel="reference")
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-12, atol=1e-12)
