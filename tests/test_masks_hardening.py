"""Hardening of the mask language (issue 17 "Masks", issue 19 item 2): sides, lengths and offsets that overflow
int64, mask data on the wrong device, a from_tensor buffer edited behind torch's back, masks nested thousands
deep, tile counts at any length, and a call path that reads no tensor data on the host.

Every case runs on every CPU kernel that can serve it and is compared with the float64 reference of an
equivalent small mask (a dense bool tensor written out here).

Shape legend: B batch, H heads, Nq queries, Nk keys, D head dim.
"""
import random
import sys

import pytest
import torch

import selfattn
from selfattn import masks as M

from oracle import cpu_kernels, max_err

F64 = torch.float64
KERNELS = cpu_kernels()


def _qkv(B=1, H=2, Nq=20, Nk=20, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g, dtype=F64), torch.randn(B, H, Nk, D, generator=g, dtype=F64),
            torch.randn(B, H, Nk, D, generator=g, dtype=F64))


def _kw(kernel):
    return dict(block_q=8, block_k=16) if kernel == "tiled" else {}


def _pos(Nq, Nk, q0, k0):
    """(Nq, 1) and (1, Nk) global positions of the call's queries and keys."""
    return torch.arange(Nq)[:, None] + q0, torch.arange(Nk)[None, :] + k0


def _check_every_kernel(mask, want_dense, B=1, Nq=20, Nk=20, **offsets):
    """Every CPU kernel on ``mask`` at these offsets equals the reference on the dense bool equivalent (B|1, 1,
    Nq, Nk) of the call's entries (without offsets: nothing else depends on positions)."""
    q, k, v = _qkv(B=B, Nq=Nq, Nk=Nk)
    want = selfattn.attention(q, k, v, M.from_tensor(want_dense), kernel="reference")
    for kernel in KERNELS:
        got = selfattn.attention(q, k, v, mask, kernel=kernel, **offsets, **_kw(kernel))
        assert max_err(got, want) <= 1e-12, (kernel, mask)


# -- 1. sides, lengths and offsets beyond int64 --------------------------------------------------------------
HUGE = [sys.maxsize, 2 ** 63, 2 ** 64, 10 ** 30]


@pytest.mark.parametrize("huge", HUGE)
def test_window_sides_beyond_every_position_are_unbounded_on_every_kernel(huge):
    qp, kp = _pos(20, 20, 0, 0)  # Nq == Nk: both alignments put query i at position i
    cases = [(M.sliding_window(0, huge), kp >= qp),  # was int64 overflow: wrong on every kernel
             (M.sliding_window(huge, 0), kp <= qp),
             (M.sliding_window(huge, huge, "top_left"), torch.ones(20, 20, dtype=torch.bool)),
             (M.sliding_window(huge, 3) & M.sliding_window(2, huge), (kp - qp >= -2) & (kp - qp <= 3))]
    for mask, dense in cases:
        assert mask.left <= M.UNBOUNDED and mask.right <= M.UNBOUNDED if hasattr(mask, "left") else True
        _check_every_kernel(mask, dense[None, None])


@pytest.mark.parametrize("huge", HUGE)
def test_lengths_beyond_every_position_are_unbounded(huge):
    Nq, Nk = 12, 20
    qp, kp = _pos(Nq, Nk, 30, 5)
    kpad = M.key_padding([huge, 9])  # row 0: every key; row 1: global key positions below 9
    want = torch.stack([kp.expand(Nq, Nk) >= 0, (kp < 9).expand(Nq, Nk)])[:, None]  # (2, 1, Nq, Nk)
    _check_every_kernel(kpad, want, B=2, Nq=Nq, Nk=Nk, q_offset=30, k_offset=5)
    _check_every_kernel(M.prefix_lm([huge]), torch.ones(1, 1, Nq, Nk, dtype=torch.bool), Nq=Nq, Nk=Nk,
                        q_offset=0, k_offset=5)
    with pytest.raises(ValueError, match="exceeds the call's Nk=20"):  # no offsets: a length past Nk is a mistake
        selfattn.attention(*_qkv(B=2), M.key_padding([huge, 3]))


def test_decode_serves_an_unbounded_window_at_a_generation_step():
    """One query that sees every key: the mask is dropped before the kernel, so the decode kernel may run."""
    q, k, v = _qkv(Nq=1, Nk=37)
    want = selfattn.attention(q, k, v, kernel="reference")
    for mask in (M.sliding_window(sys.maxsize), M.sliding_window(2 ** 64, 2 ** 64),
                 M.causal() & M.sliding_window(10 ** 30, 10 ** 30, "top_left")):
        assert max_err(selfattn.attention(q, k, v, mask, kernel="decode"), want) <= 1e-12, mask


@pytest.mark.parametrize("name,offsets", [("q_offset", dict(q_offset=(1 << 60) + 1)),
                                          ("q_offset", dict(q_offset=-(1 << 60) - 1)),
                                          ("k_offset", dict(k_offset=(1 << 60) + 1)),
                                          ("k_offset", dict(q_offset=0, k_offset=-sys.maxsize))])
def test_offsets_beyond_the_safe_range_are_refused_naming_the_argument(name, offsets):
    q, k, v = _qkv()
    for mask in (M.causal(), M.sliding_window(3, 2), M.key_padding([10 ** 30]), M.prefix_lm(3),
                 M.causal() & ~M.sliding_window(1)):
        for kernel in [None] + KERNELS:
            with pytest.raises(ValueError, match=name):
                selfattn.attention(q, k, v, mask, kernel=kernel, **offsets)


def test_positions_near_the_limit_are_exact():
    """Causal and window depend on kp − qp only: the same call shifted to the edge of the range is the same."""
    edge = M.MAX_OFFSET - 40
    qp, kp = _pos(20, 20, 37, 0)
    for mask, dense in ((M.causal(), kp <= qp), (M.sliding_window(5, 2), (kp - qp >= -5) & (kp - qp <= 2)),
                        (M.sliding_window(10 ** 19, 1), kp <= qp + 1)):
        _check_every_kernel(mask, dense[None, None], q_offset=edge + 37, k_offset=edge)
        _check_every_kernel(mask, dense[None, None], q_offset=-M.MAX_OFFSET + 37, k_offset=-M.MAX_OFFSET)


@pytest.mark.parametrize("make,words", [
    (lambda: M.document([0, 2 ** 64]), "document ids_q: expected values inside int64"),
    (lambda: M.document([0, 1], [[-2 ** 63 - 1, 0]]), "document ids_k"),
    (lambda: M.key_padding([-1, 2 ** 64]), "key_padding lengths: expected non-negative"),
    (lambda: M.sliding_window(-1, 2 ** 64), "left"),
])
def test_out_of_range_values_raise_value_errors_naming_the_argument(make, words):
    with pytest.raises(ValueError, match=words):
        make()


# -- 2. mask data on another device --------------------------------------------------------------------------
META = torch.device("meta")


@pytest.mark.parametrize("make,name", [
    (lambda: M.key_padding(torch.tensor([3], device=META)), "key_padding lengths"),
    (lambda: M.key_padding(torch.ones(1, 20, dtype=torch.bool, device=META)), "key_padding keep-mask"),
    (lambda: M.document(torch.zeros(20, dtype=torch.long, device=META)), "document ids_q"),
    (lambda: M.from_tensor(torch.ones(20, 20, dtype=torch.bool, device=META)), "mask tensor"),
    (lambda: M.prefix_lm(torch.tensor([2], device=META)), "prefix_lm prefix_lengths"),
    (lambda: M.causal() & ~(M.sliding_window(3) | M.key_padding(torch.tensor([3], device=META))),
     "key_padding lengths"),
])
def test_mask_data_on_another_device_is_refused_on_every_kernel(make, name):
    """A meta tensor used to read as "everything visible" on the native and default kernels."""
    q, k, v = _qkv()
    mask = make()
    for kernel in [None] + KERNELS:
        with pytest.raises(ValueError, match=f"mask: {name} is on meta, but the call's q is on cpu"):
            selfattn.attention(q, k, v, mask, kernel=kernel)
    mask.check_device(META)  # on q's device: fine
    if kernel is not None:
        M.causal().check_device("cpu")  # no data: fits every device


# -- 3. a from_tensor buffer edited outside torch's version counter ------------------------------------------
@pytest.mark.parametrize("edit", ["numpy", "data"])
def test_from_tensor_edited_behind_the_version_counter_matches_the_new_mask(edit):
    """from_tensor reads the caller's tensor at every call and caches nothing derived from it across calls: after
    any edit, every kernel gives the new mask's answer (never a mix of old tile classes and new values)."""
    q, k, v = _qkv(Nq=40, Nk=40)
    t = torch.ones(40, 40, dtype=torch.bool).tril()
    mask = M.from_tensor(t) & M.sliding_window(30)
    assert not mask.cacheable and M.causal().cacheable and M.key_padding([3]).cacheable
    for kernel in KERNELS:
        selfattn.attention(q, k, v, mask, kernel=kernel, **_kw(kernel))  # classes for the old tensor
    version = t._version
    if edit == "numpy":
        t.numpy()[:] = False
        t.numpy()[:, :9] = True  # keys 0..8 only: most tiles change class
    else:
        t.data.fill_(False)
        t.data[:, :9] = True
    assert t._version == version  # the edit is invisible to torch's version counter
    new = M.from_tensor(t.clone()) & M.sliding_window(30)
    want = selfattn.attention(q, k, v, new, kernel="reference")
    for kernel in KERNELS:
        got = selfattn.attention(q, k, v, mask, kernel=kernel, **_kw(kernel))
        assert max_err(got, want) <= 1e-12, kernel


# -- 4. masks nested thousands deep ---------------------------------------------------------------------------
DEPTH = 1500  # above Python's default recursion limit (1000)


def test_masks_nested_thousands_deep_evaluate_lower_and_run():
    m = M.key_padding([17, 19])
    for i in range(DEPTH):  # the loop of the issue: m = key_padding(lengths_i) & m
        m = M.key_padding([18 + i % 3, 19]) & m
    n = M.causal()
    for i in range(DEPTH):
        n = ~n if i % 2 else (n | M.key_padding([0, 0]))  # an | with nothing, then ~: ~(~(... causal))
    assert m.batch_size == 2 and repr(m).startswith("(key_padding(lengths=[20, 19]) & (key_padding(lengths=[19, 19]) & ")
    m.check_shape(2, 2, 20, 20)
    m.check_data(2, 2, 20, 20)
    lw = m.lower(20, 20)
    assert len(lw.atoms) == DEPTH + 1 and len(lw.program) == 2 * DEPTH + 1
    assert lw.stack_depth == 2  # the deeper operand is emitted first: a native evaluator needs 2 slots, not DEPTH
    assert M.Lowered(lw.atoms, lw.program).stack_depth == 2
    assert n.lower(20, 20).stack_depth == 2 and (~M.causal() & M.causal()).lower(5, 5).program == (0, "not", 1, "and")
    qp, kp = _pos(20, 20, 0, 0)
    _check_every_kernel(m, torch.stack([(kp < 17).expand(20, 20), (kp < 19).expand(20, 20)])[:, None], B=2)
    causal_dense = kp <= qp
    want_n = causal_dense if DEPTH % 2 == 0 else ~causal_dense  # DEPTH // 2 pairs of ~
    _check_every_kernel(n, want_n[None, None], B=2)
    assert m.to_string(20, 20, 8, 8).startswith(repr(m)[:40])


def test_a_mask_used_many_times_over_is_refused_before_lowering():
    m = M.causal()
    for _ in range(40):  # 2**40 leaves
        m = m & m
    assert m.batch_size == 1 and m.tile_counts(1, 1, 64, 64, 16, 16) == (16, 10, 4)  # shared parts walked once
    with pytest.raises(ValueError, match="atoms"):
        m.lower(64, 64)


# -- 5. tile counts in closed form ----------------------------------------------------------------------------
def _random_analytic_mask(rng):
    def window():
        return M.sliding_window(rng.randint(0, 15), rng.choice([0, rng.randint(0, 15), 2 ** 64]),
                                rng.choice(["bottom_right", "top_left"]))

    def causal():
        return M.causal(rng.choice(["bottom_right", "top_left"]))

    def pad():
        return M.key_padding([rng.randint(0, 45) for _ in range(2)])
    return rng.choice([causal(), window(), pad(), causal() & window(), window() & window(), causal() & pad(),
                       window() & pad() & causal(), pad() & pad(), window() & (causal() & window())])


def test_closed_form_tile_counts_equal_the_brute_force_class_grid():
    rng = random.Random(17)
    for _ in range(300):
        m = _random_analytic_mask(rng)
        Nq, Nk, bq, bk = rng.randint(0, 40), rng.randint(0, 40), rng.randint(1, 12), rng.randint(1, 12)
        qo, ko = rng.choice([None, None, rng.randint(-30, 50)]), rng.choice([0, 0, rng.randint(0, 20)])
        cls = M.summarize_classes(m.block_classes(2, 2, Nq, Nk, bq, bk, None, qo, ko))
        want = (cls.numel(), int((cls != M.EMPTY).sum()), int((cls == M.PARTIAL).sum()))
        assert m.tile_counts(2, 2, Nq, Nk, bq, bk, qo, ko) == want, (m, Nq, Nk, bq, bk, qo, ko)
        ranges = m._row_ranges(2, 2, Nq, Nk, bq, bk, qo, ko)
        if ranges is not None:  # the per-block ranges are python ints and sum to the same counts
            lo, hi, flo, fhi = ranges
            assert all(isinstance(x, int) for x in lo + hi + flo + fhi)
            assert sum(h - l for l, h in zip(lo, hi)) == want[1]


def test_tile_counts_at_any_length_build_nothing_of_size_n():
    """N = 2**47 with 1×1 tiles: a tensor with one entry per q block would need a petabyte (the allocation
    raises), so these answers are closed-form. Counted by hand: causal sees the lower triangle."""
    N = 1 << 47
    assert M.causal().tile_counts(1, 1, N, N, 1, 1) == (N * N, N * (N + 1) // 2, 0)
    w = 1000
    assert (M.sliding_window(w) & M.causal()).tile_counts(1, 1, N, N, 1, 1) == (N * N, N * (w + 1) - w * (w + 1) // 2, 0)
    assert M.sliding_window(w, w, "top_left").tile_counts(1, 1, N, N, 1, 1) == (N * N, N * (2 * w + 1) - w * (w + 1), 0)
    n = N // 64
    assert M.causal().tile_counts(1, 8, N, N, 64, 64) == (n * n, n * (n + 1) // 2, n)
    h = n // 2  # keys past N/2 are empty for every row: q block x computes min(x + 1, h) tiles
    assert (M.causal() & M.key_padding([N // 2])).tile_counts(1, 8, N, N, 64, 64)[1] == h * (h + 1) // 2 + (n - h) * h
    p = selfattn.plan(1, 8, 10 ** 9, 10 ** 9, 64, mask=M.causal())  # 1.42 GB and 2.8 s before
    assert (p.tiles_total, p.tiles_computed, p.tiles_partial) == \
        M.causal().tile_counts(1, 8, 10 ** 9, 10 ** 9, p.block_q, p.block_k)
    p = selfattn.plan(1, 1, 10 ** 12, 10 ** 12, 64, mask=M.sliding_window(4096) & M.causal())
    per_row = (4096 + p.block_q) // p.block_k + 2  # k blocks a 4097-key window can touch from one q block
    assert 10 ** 12 // p.block_q <= p.tiles_computed <= -(-10 ** 12 // p.block_q) * per_row


# -- 6. nothing on the call path reads tensor data on the host ------------------------------------------------
def test_the_call_path_reads_no_tensor_data():
    """Meta tensors have no values: check_shape, check_device, lowering, allows_everything and the tile counts
    of analytic masks run on them; only check_data (the kernel op's) reads values."""
    meta_lengths = torch.tensor([3, 9], device=META)
    m = M.causal() & M.key_padding(meta_lengths) & ~M.document(torch.zeros(2, 8, dtype=torch.long, device=META))
    m.check_shape(2, 4, 8, 8)
    m.check_shape(2, 4, 8, 8, 0, 0)
    m.check_device(META)
    lw = m.lower(8, 8, 2, 0)
    assert [a.kind for a in lw.atoms] == ["causal", "pad_len", "document"]
    assert not m.allows_everything(8, 8) and m._row_ranges(2, 4, 8, 8, 8, 8, None, 0) is None
    decode = M.causal() & M.sliding_window(8)
    assert decode.allows_everything(1, 9) and decode.allows_everything(1, 9, q_offset=8)  # the mask is dropped
    assert not decode.allows_everything(1, 9, q_offset=7) and not decode.allows_everything(2, 9)
    pm = M.prefix_lm(torch.tensor([2], device=META))
    pm.check_shape(1, 1, 8, 8)
    pm.lower(8, 8)


def test_values_the_host_never_saw_are_checked_by_check_data(monkeypatch):
    """Lengths given as a tensor the host cannot read at construction (a CUDA tensor, or built under tracing)
    pass check_shape; check_data -- what the kernel op runs inside -- refuses bad values."""
    monkeypatch.setattr(M, "_host_readable", lambda x: False)
    too_long = M.key_padding(torch.tensor([3, 9]))
    negative = M.prefix_lm(torch.tensor([-1]))
    too_long.check_shape(2, 1, 5, 5)
    negative.check_shape(1, 1, 5, 5)
    with pytest.raises(ValueError, match="key_padding: a length 9 exceeds the call's Nk=5"):
        (M.causal() & too_long).check_data(2, 1, 5, 5)
    with pytest.raises(ValueError, match="prefix_lm prefix_lengths: expected non-negative values"):
        (~negative).check_data(1, 1, 5, 5)
    too_long.check_data(2, 1, 5, 5, q_offset=0, k_offset=0)  # with offsets a length may reach past the call
    assert too_long._band(5, 5, None, 0) is None  # no host summary: no analytic rows, so nothing is dropped


def test_masks_built_from_tensors_trace_without_graph_breaks():
    """torch.compile(fullgraph=True) of code that builds a mask from a tensor and validates and lowers it:
    dynamo stops at any .item() / bool(tensor) with an error."""
    def f(lengths, ids):
        m = M.causal() & M.key_padding(lengths) & M.document(ids)
        m.check_shape(2, 4, 8, 8)
        m.check_device(lengths.device)
        lw = m.lower(8, 8)
        return lw.atoms[1].lengths + lw.atoms[2].ids_q.sum(-1), m.allows_everything(8, 8)
    lengths, ids = torch.tensor([3, 8]), torch.zeros(2, 8, dtype=torch.long)
    got, every = torch.compile(f, backend="eager", fullgraph=True)(lengths, ids)
    assert torch.equal(got, lengths) and every is False


def test_modifiers_build_bind_and_lower_without_host_reads():
    """ALiBi's finiteness check reads its slopes: only in eager code (and inside the kernel op), never under
    tracing; standard slopes bind once per head count (no new tensor per call)."""
    from selfattn import scores as S

    def f(slopes, table):
        mod = S.compose(S.alibi(slopes), S.t5_relative(table), S.softcap(30.0))
        mod.check_call(4, None)
        ops = mod.bind(4).lower()
        return ops[0].slopes * 2 + ops[1].table.sum(0)
    slopes, table = torch.rand(4), torch.rand(32, 4)
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(slopes, table), f(slopes, table))
    with pytest.raises(ValueError, match="finite"):  # eager construction still checks
        S.alibi(torch.tensor([1.0, float("nan")]))
    std = S.alibi()
    assert std.bind(8) is std.bind(8) and std.bind(8) is not std.bind(4)
