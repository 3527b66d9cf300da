"""The kernel registry: one choice for attention(), plan() and the ring; a new kernel needs no edit elsewhere."""
import types

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.kernels import native, reference, registry, tiled


def _toy(calls):
    """A kernel that serves only head dim 3, float64, ahead of every built-in one (the reference's math)."""
    def why_not(call):
        return None if call.D == 3 else f"head dim {call.D} (the toy serves D=3)"

    def forward(call):
        calls.append(call.Nq)
        return reference.forward(call)

    return types.SimpleNamespace(
        NAME="toy", DEVICES=("cpu",), DTYPES=(torch.float64,), MAX_HEAD_DIM=3, DIFFERENTIABLE_BACKWARD=True,
        FUNCTORCH=True, PRIORITY=-1, COMPILED=False, why_not=why_not, automatic=lambda call: (True, "the toy takes D=3"),
        tiles=lambda call: (7, 5), forward=forward, backward=reference.backward)


@pytest.fixture
def toy():
    calls = []
    registry.register(_toy(calls))
    yield calls
    registry.unregister("toy")


def test_a_registered_kernel_is_chosen_named_and_planned(toy):
    q = torch.randn(1, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    out = selfattn.attention(q, q, q, masks.causal())
    assert toy == [9]
    want = reference.attention_reference(q, q, q, masks.causal(), scale=3 ** -0.5)
    torch.testing.assert_close(out, want)
    out.sum().backward()  # its declared backward runs through the one autograd wrapper
    assert q.grad is not None
    p = selfattn.plan(1, 2, 20, 20, 3, mask=masks.causal(), dtype=torch.float64)
    assert p.kernel == "toy" and p.reason == "automatic: the toy takes D=3"
    assert (p.block_q, p.block_k) == (7, 5) and p.tiles_total == 3 * 4  # its own tiles
    assert dict(p.reasons)["toy"] is None and p.reasons[0][0] == "toy"
    # its declarations are checked before its own why_not; named, it runs or says why not
    with pytest.raises(ValueError, match=r"kernel='toy' cannot serve this call: dtype torch.float32"):
        selfattn.attention(q.float(), q.float(), q.float(), kernel="toy")
    q4 = torch.randn(1, 1, 2, 4, dtype=torch.float64)
    assert dict(selfattn.plan(1, 1, 2, 2, 4, dtype=torch.float64).reasons)["toy"] == "head dim D=4, Dv=4 above 3"
    selfattn.attention(q4, q4, q4)  # another kernel serves D=4; plan() never ran one
    assert toy == [9]


def test_unknown_and_incomplete_kernels_are_refused():
    with pytest.raises(ValueError, match="expected None or one of"):
        selfattn.attention(*(torch.randn(1, 1, 2, 4),) * 3, kernel="nope")
    with pytest.raises(TypeError, match=r"lacks \['tiles'"):
        registry.register(types.SimpleNamespace(**{a: None for a in registry.REQUIRED if a != "tiles"}))
    impostor = _toy([])
    impostor.NAME = "tiled"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(impostor)


def test_allowed_limits_the_automatic_choice():
    """Ring attention's rule: native where it serves, else tiled -- never decode or the reference."""
    q = torch.randn(1, 1, 1, 8)  # a decode-shaped call
    call, m, _ = selfattn.functional.prepare(q, q, q, allowed=("native", "tiled"))
    assert m.NAME == ("native" if native.why_not(call) is None else "tiled")
    call, m, _ = selfattn.functional.prepare(q, q, q, allowed=("tiled",))
    assert m is tiled
    with pytest.raises(ValueError, match="cannot serve this call here"):
        selfattn.functional.prepare(q, q, q, kernel="decode", allowed=("native", "tiled"))


def test_plan_prints_the_tiles_of_the_kernel_that_runs():
    """Issue 18.7: not the tiled kernel's 512x256 when another kernel runs with its own tiles."""
    p = selfattn.plan(1, 8, 2048, 2048, 64, mask=masks.causal())
    call = selfattn.functional.prepare(*(torch.zeros(()).expand(1, 8, 2048, 64),) * 3, masks.causal(),
                                       _shape_only=True)[0]
    assert (p.block_q, p.block_k) == registry.get(p.kernel).tiles(call)
    for name in ("tiled", "reference"):
        pn = selfattn.plan(1, 8, 100, 100, 64, mask=masks.causal(), kernel=name)
        assert pn.kernel == name
    assert (selfattn.plan(1, 8, 100, 100, 64, kernel="reference").block_q,
            selfattn.plan(1, 8, 100, 100, 64, kernel="tiled").block_q) == (100, tiled.BLOCK_Q)
    if native.available():
        pn = selfattn.plan(1, 8, 2048, 2048, 64, mask=masks.causal(), kernel="native")
        assert (pn.block_q, pn.block_k) == native.tiles(call) != (tiled.BLOCK_Q, tiled.BLOCK_K)
        assert pn.tiles_total == -(-2048 // pn.block_q) * -(-2048 // pn.block_k)


def test_plan_says_why_the_automatic_rule_passed_a_kernel_over(monkeypatch):
    monkeypatch.setenv("SELFATTN_NATIVE", "0")
    p = selfattn.plan(1, 2, 300, 300, 16)
    assert p.kernel == "tiled"
    assert dict(p.reasons)["reference"].startswith("automatic rule: Nq·Nk = 90000 > ")
