"""Issue 19.3's per-call caches: the registry's cached automatic choice and the native kernel's per-mask lowering
memo give what an uncached call gives, and are dropped when what they were derived from changes."""
import os
import shutil
import types

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.kernels import native, reference, registry

_AVAILABLE = native.available()
_NO_COMPILER = shutil.which(os.environ.get("CXX", "g++")) is None
needs_native = pytest.mark.skipif(not _AVAILABLE and (native._disabled() is not None or _NO_COMPILER),
                                  reason=f"native kernel unavailable: {native._disabled() or native._load_error}")


def _chosen(q, mask=None):
    call, module, _ = selfattn.functional.prepare(q, q, q, mask)
    return module.NAME


@pytest.fixture
def counting_toy():
    """A kernel ahead of every built-in one that counts how often the registry asks it."""
    asked = []

    def why_not(call):
        asked.append(call.D)
        return None if call.D == 3 else f"head dim {call.D} (the toy serves D=3)"

    toy = types.SimpleNamespace(
        NAME="counting_toy", DEVICES=("cpu",), DTYPES=(torch.float64,), MAX_HEAD_DIM=3,
        DIFFERENTIABLE_BACKWARD=True, FUNCTORCH=True, PRIORITY=-1, COMPILED=False, why_not=why_not,
        automatic=lambda call: (True, "the toy takes D=3"), tiles=lambda call: (7, 5), forward=reference.forward,
        backward=reference.backward)
    registry.register(toy)
    yield toy, asked
    registry.unregister("counting_toy")


def test_an_equal_call_is_not_chosen_again_and_a_changed_kernel_is_asked_again(counting_toy, monkeypatch):
    toy, asked = counting_toy
    q = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    c = masks.causal()
    assert _chosen(q, c) == "counting_toy" and asked == [3]
    assert _chosen(q, c) == "counting_toy" and asked == [3]  # cached: the kernel is not asked again
    assert _chosen(q.clone(), c) == "counting_toy" and asked == [3]  # other tensors, same description
    assert _chosen(q[:, :, :4], c) == "counting_toy" and asked == [3, 3]  # another shape: asked
    assert _chosen(q, masks.causal()) == "counting_toy" and asked == [3, 3, 3]  # another mask object: asked
    monkeypatch.setattr(toy, "why_not", lambda call: "switched off (test)")  # the kernel's answer changed
    assert _chosen(q, c) != "counting_toy"
    # unregistering drops every cached answer that named it
    monkeypatch.undo()
    registry.unregister("counting_toy")
    assert _chosen(q, c) != "counting_toy"
    registry.register(toy)
    assert _chosen(q, c) == "counting_toy"


@needs_native
def test_the_environment_and_the_library_are_read_on_every_call(monkeypatch):
    q = torch.randn(1, 2, 40, 8)
    assert _chosen(q) == "native"
    monkeypatch.setenv("SELFATTN_NATIVE", "0")
    assert _chosen(q) != "native"
    monkeypatch.delenv("SELFATTN_NATIVE")
    assert _chosen(q) == "native"
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_error", "no library (test)")
    assert _chosen(q) != "native"
    monkeypatch.undo()
    assert _chosen(q) == "native"


@needs_native
def test_a_cached_lowering_gives_the_bits_of_a_fresh_one_and_the_c_side_gets_copies():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16, generator=g) for _ in range(3))
    m = masks.causal() & masks.sliding_window(9) & masks.key_padding(torch.tensor([30, 37]))
    first = selfattn.attention(q, k, v, m)
    again = selfattn.attention(q, k, v, m)  # the mask's lowering memo and the cached choice
    fresh = selfattn.attention(q, k, v, masks.causal() & masks.sliding_window(9) &
                               masks.key_padding(torch.tensor([30, 37])))
    assert torch.equal(first, again) and torch.equal(first, fresh)
    call = selfattn.functional.prepare(q, k, v, m)[0]
    bq, bk = native.tiles(call)
    L = native._Lowered(call, bq, bk)
    kind = native.ctypes.cast(L.p.atoms, native.ctypes.POINTER(native._Atom))[0].kind
    native.ctypes.cast(L.p.atoms, native.ctypes.POINTER(native._Atom))[0].kind = 99  # what the C side reads
    L2 = native._Lowered(call, bq, bk)
    assert native.ctypes.cast(L2.p.atoms, native.ctypes.POINTER(native._Atom))[0].kind == kind
    assert torch.equal(selfattn.attention(q, k, v, m), first)
