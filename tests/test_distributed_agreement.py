"""Context parallelism across disagreeing ranks (issue 17): a different mask or modifier on one rank, or misuse on
one rank alone, fails *every* rank with the rank and the difference named -- before any transfer, so nothing hangs
and nothing is silently mixed. After the refusals the same group still computes a correct call.

Cost: one ``torch.multiprocessing.spawn`` of 2 gloo processes on 127.0.0.1 that runs every case and writes one
verdict per case; the group's timeout (20 s) and the test's own deadline make a regression (a hang) fail the test
instead of stalling the suite.

Shape legend: B batch, H heads, N global length, n = N/P local length, D head dim.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selfattn
from selfattn import distributed as cp
from selfattn import masks as M
from selfattn import scores as S

P = 2
B, H, n, D = 2, 4, 8, 8  # N = 16: zigzag chunks of 4
N = P * n
GROUP_TIMEOUT_S = 20  # a hang ends in a gloo timeout error after this, not after 30 minutes
DEADLINE_S = 240  # the whole spawn, on a loaded 2-core machine

# name -> (function name, kwargs for rank 0, kwargs for rank 1, words every rank's error must hold, words only the
# refusing rank's own error holds (None: both ranks see the same disagreement message))
CASES = {
    # different masks / modifiers on each rank
    "ring_mask_none_vs_causal": ("ring", {}, {"mask": lambda: M.causal()}, ["rank(s) [1]", "the mask", "causal"],
                                 None),
    "ring_key_padding_lengths_differ": ("ring", {"mask": lambda: M.key_padding([N, N - 3])},
                                        {"mask": lambda: M.key_padding([N, N - 5])},
                                        ["rank(s) [1]", "the mask", f"[{N}, {N - 3}]", f"[{N}, {N - 5}]"], None),
    "ulysses_mask_causal_vs_window": ("ulysses", {"mask": lambda: M.causal()},
                                      {"mask": lambda: M.sliding_window(3)}, ["rank(s) [1]", "the mask"], None),
    "ulysses_document_ids_differ": ("ulysses", {"mask": lambda: M.document(M.document_ids([[5, N - 5]] * B))},
                                    {"mask": lambda: M.document(M.document_ids([[6, N - 6]] * B))},
                                    ["the mask", "different data"], None),
    "ring_modifier_on_one_rank": ("ring", {}, {"bias": lambda: S.alibi()}, ["rank(s) [1]", "score modifiers"],
                                  None),
    "ulysses_t5_tables_differ": ("ulysses", {"bias": lambda: S.t5_relative(torch.zeros(8, H), num_buckets=8)},
                                 {"bias": lambda: S.t5_relative(torch.ones(8, H), num_buckets=8)},
                                 ["score modifiers", "different data"], None),
    "ring_gradients_on_one_rank": ("ring", {}, {"grad": True}, ["rank(s) [1]", "gradients"], None),
    "ulysses_return_lse_on_one_rank": ("ulysses", {}, {"return_lse": True}, ["rank(s) [1]", "return_lse"], None),
    "ring_dropout_differs": ("ring", {"dropout_p": 0.1}, {"dropout_p": 0.2}, ["dropout_p"], None),
    # misuse on rank 1 alone: rank 1 raises its own error, rank 0 hears of it
    "ring_layout_typo": ("ring", {}, {"layout": "zigzig"}, ["rank(s) [1] refused"], "layout"),
    "ring_reference_kernel": ("ring", {}, {"kernel": "reference"}, ["rank(s) [1] refused"], "kernel"),
    "ring_short_k_shard": ("ring", {}, {"short_k": True}, ["rank(s) [1] refused"], "same length"),
    "ring_dense_bias": ("ring", {}, {"bias": lambda: torch.zeros(1, 1, 1, 1)}, ["rank(s) [1] refused"],
                        "dense bias"),
    "ring_mask_wrong_batch": ("ring", {"mask": lambda: M.key_padding([N] * B)},
                              {"mask": lambda: M.key_padding([N] * (B + 1))}, ["rank(s) [1] refused"], "batch rows"),
    "ulysses_layout_typo": ("ulysses", {}, {"layout": "contiguos"}, ["rank(s) [1] refused"], "layout"),
    "ulysses_short_k_shard": ("ulysses", {}, {"short_k": True}, ["rank(s) [1] refused"], "shards of q's length"),
    "ulysses_dense_bias": ("ulysses", {}, {"bias": lambda: torch.zeros(1, 1, 1, 1)}, ["rank(s) [1] refused"],
                           "dense bias"),
    "ulysses_mask_wrong_batch": ("ulysses", {"mask": lambda: M.key_padding([N] * B)},
                                 {"mask": lambda: M.key_padding([N] * (B + 1))}, ["rank(s) [1] refused"], "batch rows"),
    # misuse of a layer under context_parallel on one rank, refused before its attention's exchange
    "layer_cache_on_one_rank": ("layer", {}, {"cache": lambda: selfattn.nn.KVCache()}, ["rank(s) [1] refused"],
                                "cache: context parallelism"),
    "layer_odd_zigzag_shard_on_one_rank": ("layer", {}, {"n": n - 1}, ["rank(s) [1] refused"], "must be even"),
    "ulysses_kernel_cannot_serve": ("ulysses", {"mask": lambda: M.causal()},
                                    {"mask": lambda: M.causal(), "kernel": "decode"}, ["rank(s) [1] refused"],
                                    "decode"),
}


def _inputs(group, layout="zigzag"):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    return (q, k, v), [cp.shard(t, group, layout if layout in cp.LAYOUTS else "zigzag") for t in (q, k, v)]


def _layer_case(rank, group, kw):
    """An Attention layer under context_parallel, called with this rank's kwargs (a cache, an odd length)."""
    torch.manual_seed(0)
    layer = cp.context_parallel(selfattn.nn.Attention(16, 2, causal=True, rope_theta=10000.0), group)
    x = torch.randn(1, kw.pop("n", n), 16)
    layer(x, **kw)


def _run_case(rank, group, fn_name, kw):
    kw = {name: (val() if callable(val) else val) for name, val in kw.items()}
    if fn_name == "layer":
        return _layer_case(rank, group, kw)
    _, (q, k, v) = _inputs(group)
    if kw.pop("short_k", False):
        k, v = k[:, :, :-2], v[:, :, :-2]
    if kw.pop("grad", False):
        q = q.clone().requires_grad_(True)
    fn = cp.ring_attention if fn_name == "ring" else cp.ulysses_attention
    fn(q, k, v, group=group, **kw)


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    group = dist.group.WORLD
    verdicts = {}
    for name, (fn_name, kw0, kw1, words, own) in CASES.items():
        try:
            _run_case(rank, group, fn_name, kw0 if rank == 0 else kw1)
            verdicts[name] = {"raised": None}
        except Exception as e:
            verdicts[name] = {"raised": type(e).__name__, "text": str(e)}
    # the group still works after every refusal: a correct call equals the single-process one
    try:
        (q, k, v), shards = _inputs(group)
        for fn in (cp.ring_attention, cp.ulysses_attention):
            out = cp.unshard(fn(*shards, M.causal(), group=group), group)
            ref = selfattn.attention(q, k, v, M.causal(), kernel="reference")
            if not torch.allclose(out, ref, atol=1e-12, rtol=0):
                raise AssertionError(f"{fn.__name__}: {float((out - ref).abs().max()):.3e} from the reference")
        # a from_tensor mask edited outside torch's version counter between two calls: the ring's plan (which
        # steps run, which K/V hops are sent) follows the new data, since it is keyed by the data's fingerprint
        t = torch.ones(N, N, dtype=torch.bool).tril()
        m = M.from_tensor(t)
        for want in (M.causal(), None):
            sh = [cp.shard(x, group, "contiguous") for x in (q, k, v)]
            out = cp.unshard(cp.ring_attention(*sh, m, group=group, layout="contiguous"), group, "contiguous")
            ref = selfattn.attention(q, k, v, want, kernel="reference")
            if not torch.allclose(out, ref, atol=1e-12, rtol=0):
                raise AssertionError(f"from_tensor edited in place ({want!r}): "
                                     f"{float((out - ref).abs().max()):.3e} from the reference")
            t.numpy()[:] = True  # every key visible now; torch's version counter does not see this write
        verdicts["after"] = {"ok": True}
    except Exception as e:
        verdicts["after"] = {"ok": False, "text": f"{e}\n{traceback.format_exc()}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(verdicts, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    d = tmp_path_factory.mktemp("agree")
    ctx = mp.start_processes(_worker, args=(str(d / "store"), str(d)), nprocs=P, join=False, start_method="spawn")
    end = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > end:
                pytest.fail(f"the ranks did not finish within {DEADLINE_S} s: a disagreement hangs")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [json.loads((d / f"rank{r}.json").read_text()) for r in range(P)]


@pytest.mark.parametrize("case", CASES)
def test_disagreement_fails_every_rank(verdicts, case):
    fn_name, _, _, words, own = CASES[case]
    for r, v in enumerate(verdicts):
        got = v[case]
        # a hang would end in gloo's timeout RuntimeError after GROUP_TIMEOUT_S; a refusal is a clear error
        assert got["raised"] in ("ValueError", "TypeError"), f"rank {r}: {got}"
        if own is not None and r == 1:  # the refusing rank raises its own error
            assert own in got["text"], f"rank 1: {got['text']}"
            continue
        for w in words:
            assert w in got["text"], f"rank {r}: {w!r} not in {got['text']!r}"
        if own is not None:  # its peers quote it
            assert own in got["text"], f"rank {r}: {got['text']}"
        assert f"this is rank {r}" in got["text"]


def test_group_still_works_after_the_refusals_and_plans_follow_edited_mask_data(verdicts):
    for r, v in enumerate(verdicts):
        assert v["after"]["ok"], f"rank {r}: {v['after']['text']}"
