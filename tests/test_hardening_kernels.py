"""Hardening of the op (issue 11): no silently wrong value from bad block sizes, double backward, edited mask
data, extreme biases or NaN/Inf in entries some queries may not see -- and planning whose cost does not grow with
N². Every kernel that can serve a call must give the same answer or the same error.

Shape legend: B batch, H heads, Nq queries, Nk keys, D head dim.
"""
import pytest
import torch

import selfattn
from selfattn import functional, masks as M, scores as S

from oracle import cpu_kernels, max_err

F64 = torch.float64
KERNELS = cpu_kernels()  # the CPU kernels (triton: tests/test_triton.py)


def _refuses(kernel, q, k, v, mask=None, bias=None) -> bool:
    """A named kernel either gives the same answer as the others or refuses with its reason (never a different
    answer): native hands rare inputs (huge finite biases, NaN values under a mask) to the torch-op kernels."""
    if kernel != "native":
        return False
    call, _, _ = functional.prepare(q, k, v, mask, bias=bias)
    reason = functional._BY_NAME["native"].why_not(call)
    if reason is not None:
        with pytest.raises(ValueError, match="kernel='native' cannot serve"):
            selfattn.attention(q, k, v, mask, bias=bias, kernel="native")
    return reason is not None


def _kw(kernel):
    return dict(block_q=16, block_k=32) if kernel == "tiled" else {}


def _qkv(B=1, H=2, Nq=80, Nk=80, D=16, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g, dtype=dtype), torch.randn(B, H, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, H, Nk, D, generator=g, dtype=dtype))


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-5, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_block_sizes_are_refused_everywhere(bad, exc):
    q, k, v = _qkv()
    for name in ("block_q", "block_k"):
        with pytest.raises(exc, match=name):
            selfattn.attention(q, k, v, kernel="tiled", **{name: bad})
        with pytest.raises(exc, match=name):
            selfattn.plan(1, 2, 80, 80, 16, mask=M.causal(), **{name: bad})
    with pytest.raises(exc, match="block_q"):
        M.causal().block_classes(1, 1, 80, 80, bad, 16)


def test_double_backward_is_exact_on_reference_and_refused_elsewhere():
    q, k, v = _qkv(Nq=9, Nk=11, D=4)
    mask = M.causal()

    def second_order(kernel):
        qq = q.clone().requires_grad_()
        out = selfattn.attention(qq, k, v, mask, kernel=kernel)
        (g,) = torch.autograd.grad(out.pow(2).sum(), qq, create_graph=True)
        (h,) = torch.autograd.grad(g.sin().sum(), qq)
        return h

    # the plain materialized math under autograd is an independent second-order baseline
    def plain(qq):
        s = (qq @ k.transpose(-1, -2)) / 2.0
        s = s.masked_fill(~mask.dense(1, 2, 9, 11)[0], float("-inf"))
        return torch.softmax(s, -1) @ v

    qq = q.clone().requires_grad_()
    (g,) = torch.autograd.grad(plain(qq).pow(2).sum(), qq, create_graph=True)
    (want,) = torch.autograd.grad(g.sin().sum(), qq)
    assert max_err(second_order("reference"), want) <= 1e-10
    for kernel in KERNELS:
        if kernel == "reference":
            continue
        with pytest.raises(RuntimeError, match="double backward"):
            second_order(kernel)
        # first-order gradients under create_graph=True are still right (only differentiating them again raises)
        qq = q.clone().requires_grad_()
        (g1,) = torch.autograd.grad(selfattn.attention(qq, k, v, mask, kernel=kernel).pow(2).sum(), qq,
                                    create_graph=True)
        assert max_err(g1, g) <= 1e-10, kernel


@pytest.mark.parametrize("N", [64, 200])  # either side of the automatic reference/tiled switch
def test_torch_func_grad_works_whatever_kernel_the_size_picks(N, monkeypatch):
    """torch.func.grad / vjp run on every torch-op kernel, and the automatic choice skips kernels that read raw
    data pointers (native, triton) while a transform is active -- the same answer at N=64 and N=200."""
    q, k, v = _qkv(Nq=N, Nk=N)
    for native in ("1", "0"):
        monkeypatch.setenv("SELFATTN_NATIVE", native)
        g = torch.func.grad(lambda x: selfattn.attention(x, k, v, M.causal()).sin().sum())(q)
        qq = q.clone().requires_grad_()
        selfattn.attention(qq, k, v, M.causal(), kernel="reference").sin().sum().backward()
        assert max_err(g, qq.grad) <= 1e-10


def test_in_place_edit_of_the_output_fails_the_same_on_every_kernel():
    """Every kernel's output is saved for its backward: an in-place edit then backward raises torch's in-place
    error on every kernel (it used to work below the reference/tiled switch and fail above it)."""
    for N, kernel in ((64, None), (200, None), (64, "tiled"), (64, "reference")):
        q, k, v = _qkv(Nq=N, Nk=N)
        q.requires_grad_()
        out = selfattn.attention(q, k, v, kernel=kernel)
        out += 1
        with pytest.raises(RuntimeError, match="inplace"):
            out.sum().backward()


def test_mask_data_is_a_snapshot_or_versioned():
    q, k, v = _qkv(B=2, Nk=80)
    lengths = torch.tensor([30, 70])
    m = M.key_padding(lengths)
    before = selfattn.attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), m,
                                kernel="tiled", block_q=16, block_k=16)
    lengths[0] = 5  # editing the caller's tensor afterwards changes nothing: the mask holds a copy
    after = selfattn.attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), m,
                               kernel="tiled", block_q=16, block_k=16)
    assert torch.equal(before, after)
    # a dense tensor mask reads the caller's tensor (no copy of N² bools): its cached tile classes follow edits
    t = torch.ones(80, 80, dtype=torch.bool).tril()
    dm = M.from_tensor(t)
    for kernel in KERNELS:
        selfattn.attention(q, k, v, dm, kernel=kernel, **_kw(kernel))
    t.fill_(True)  # now nothing is masked
    want = selfattn.attention(q, k, v, kernel="reference")
    for kernel in KERNELS:
        assert max_err(selfattn.attention(q, k, v, dm, kernel=kernel, **_kw(kernel)), want) <= 1e-12, kernel


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_extreme_finite_biases_agree_across_kernels(dtype):
    q, k, v = _qkv(Nq=70, Nk=70, dtype=dtype)
    fmax = torch.finfo(dtype).max
    bias = torch.zeros(1, 1, 70, 70, dtype=dtype)
    bias[..., 3, :] = -fmax  # a row masked "by bias": every score equally tiny -> the mean of V
    bias[..., 7, 5] = 0.9 * fmax  # one huge finite score: that key takes all the weight
    bias[..., 9, :] = float("-inf")  # a true -inf row: empty, output 0
    for kernel in [None, *KERNELS]:
        if _refuses(kernel, q, k, v, bias=bias):
            continue
        out = selfattn.attention(q, k, v, bias=bias, kernel=kernel, **_kw(kernel))
        assert not torch.isnan(out).any(), kernel
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert max_err(out[0, :, 3], v[0].mean(1)) <= tol, kernel
        assert max_err(out[0, :, 7], v[0, :, 5]) <= tol, kernel
        assert (out[0, :, 9] == 0).all(), kernel


@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("mask", ["causal", "window", "padding_rows"])
def test_nonfinite_entries_reach_only_rows_that_see_them(which, mask):
    """A NaN/Inf key or value at position 50 that only later queries may see (causal: rows >= 50) must not
    reach the outputs of rows 0..49 on any kernel; rows that see it get a non-finite output, as the math says.
    (Gradients of such a call are not promised clean: dQ = dS·K multiplies the NaN key by a zero.)"""
    N = 100
    q, k, v = _qkv(Nq=N, Nk=N)
    m = {"causal": M.causal(), "window": M.sliding_window(20) & M.causal(),
         "padding_rows": M.causal() & M.key_padding([N])}[mask]
    bad_k, bad_v = k.clone(), v.clone()
    (bad_k if which == "k" else bad_v)[0, :, 50] = float("nan")
    (bad_k if which == "k" else bad_v)[0, 1, 50, 0] = float("inf")
    clean = selfattn.attention(q, k, v, m, kernel="reference")
    for kernel in [None, *KERNELS]:
        if _refuses(kernel, q, bad_k, bad_v, m):
            continue
        out = selfattn.attention(q, bad_k, bad_v, m, kernel=kernel, **_kw(kernel))
        assert not torch.isnan(out[0, :, :50]).any(), kernel
        assert max_err(out[0, :, :50], clean[0, :, :50]) <= 1e-12, kernel
        assert (~torch.isfinite(out[0, :, 50])).any(-1).all(), kernel


def test_plan_cost_does_not_grow_with_n_squared(monkeypatch):
    """Planning is arithmetic: built-in masks answer tile counts per q block (O(N / block)), never by a class
    grid (the old count built a 122M-tile grid at N=4M: 2.5 GB, 12.7 s). A grid is refused, so reaching one
    fails the test."""
    def no_grid(*a, **kw):
        raise AssertionError("plan built a tile-class grid")
    monkeypatch.setattr(M.Mask, "block_classes", no_grid)
    p = selfattn.plan(1, 8, 4_000_000, 4_000_000, 64, mask=M.causal())
    p2 = selfattn.plan(1, 8, 4_000_000, 4_000_000, 64, mask=M.sliding_window(4096) & M.causal())
    p3 = selfattn.plan(2, 8, 4_000_000, 4_000_000, 64, mask=M.causal() & M.key_padding([4_000_000, 1_000_000]))
    nqb = -(-4_000_000 // p.block_q)
    nkb = -(-4_000_000 // p.block_k)
    assert p.tiles_total == nqb * nkb and nqb * (nkb // 2) < p.tiles_computed < nqb * nkb
    per_row = (4097 + p2.block_q) // p2.block_k + 2  # k blocks a 4097-key window can touch from one q block
    assert p2.tiles_computed <= -(-4_000_000 // p2.block_q) * per_row
    assert p3.tiles_computed == p.tiles_computed  # padding keeps row 0 whole: the batched pattern is causal's
    with pytest.raises(ValueError, match="exceeds"):
        selfattn.plan(1 << 20, 1 << 10, 1 << 20, 1 << 20, 128)


def test_tile_counts_equal_the_class_grid():
    """The analytic counts agree with summarize_classes of the full grid, offsets included."""
    ms = [M.causal(), M.causal("top_left"), M.sliding_window(9, 4), M.sliding_window(30) & M.causal(),
          M.key_padding([40, 77]), M.causal() & M.key_padding([40, 77]), M.sliding_window(5, 5, "top_left")]
    for m in ms:
        for Nq, Nk, bq, bk, qo, ko in [(77, 91, 8, 16, None, 0), (91, 77, 16, 8, None, 0), (64, 64, 16, 16, 5, 3),
                                       (10, 120, 4, 32, -20, 0), (33, 33, 33, 33, None, 0), (1, 1, 1, 1, None, 0)]:
            cls = M.summarize_classes(m.block_classes(2, 2, Nq, Nk, bq, bk, None, qo, ko))
            want = (cls.numel(), int((cls != M.EMPTY).sum()), int((cls == M.PARTIAL).sum()))
            assert m.tile_counts(2, 2, Nq, Nk, bq, bk, qo, ko) == want, (m, Nq, Nk, bq, bk, qo, ko)


def test_every_kernel_reason_is_listed_by_plan():
    p = selfattn.plan(1, 8, 4096, 4096, 64, Hkv=2, mask=M.causal())
    names = [n for n, _ in p.reasons]
    assert names == list(functional.KERNELS)
    assert dict(p.reasons)[p.kernel] is None
    with pytest.raises(ValueError, match="kernel='decode' cannot serve"):
        selfattn.attention(*_qkv(Nq=64), kernel="decode")


def test_huge_values_do_not_overflow_the_fixed_shift_accumulator():
    """|V| ~ 1e21 with one key whose score sits 2^60 above the rows' first-segment max: the answer is that key's
    value (finite); an accumulator that allowed the full 2^64 headroom would overflow fp32 to inf."""
    D, N = 16, 1024
    g = torch.Generator().manual_seed(0)
    q = torch.zeros(1, 1, 64, D)
    q[..., 0] = 12.9
    k = torch.randn(1, 1, N, D, generator=g) * 0.01
    k[0, 0, 900, :] = 0.0
    k[0, 0, 900, 0] = 12.9  # s = 12.9² / 4 ≈ 41.6 (60 in log2 units) for every query
    v = torch.randn(1, 1, N, D, generator=g) * 1e21
    want = selfattn.attention(q.double(), k.double(), v.double(), kernel="reference")
    for kernel in KERNELS:
        out = selfattn.attention(q, k, v, kernel=kernel, **({"block_q": 64, "block_k": 512} if kernel == "tiled"
                                                              else {}))
        assert torch.isfinite(out).all(), kernel
        assert max_err(out.double() / 1e21, want / 1e21) <= 1e-5, kernel


@pytest.mark.parametrize("Nq,Nk", [(0, 5), (5, 0), (0, 0)])
def test_t5_bias_with_no_queries_or_no_keys(Nq, Nk):
    q, k, v = torch.randn(1, 2, Nq, 8), torch.randn(1, 2, Nk, 8), torch.randn(1, 2, Nk, 8)
    table = torch.randn(32, 2, requires_grad=True)
    for kernel in [None, *KERNELS]:
        out = selfattn.attention(q, k, v, bias=S.t5_relative(table), kernel=kernel)
        assert out.shape == (1, 2, Nq, 8) and (out == 0).all(), kernel


def test_capture_sees_only_its_own_thread():
    import threading
    from selfattn.nn import Attention, record_attention
    layer = Attention(16, 2)
    x = torch.randn(1, 5, 16)
    seen, stop = [], threading.Event()

    def other():
        while not stop.is_set():
            layer(torch.randn(1, 3, 16))

    t = threading.Thread(target=other)
    t.start()
    try:
        with record_attention(seen.append):
            for _ in range(5):
                layer(x)
    finally:
        stop.set()
        t.join()
    assert len(seen) == 5 and all(r.q.shape[2] == 5 for r in seen)
