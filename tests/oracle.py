"""The test oracle: one call checks a kernel against the float64 reference by the baseline rule (STYLE.md #3).

    from oracle import check_attention
    check_attention(2, 8, 2, 113, 203, 40, mask=masks.causal(), bias=(1, 8, 113, 1), kernel="tiled")

builds the inputs, runs

* the golden result: ``selfattn.attention(kernel="reference")`` on float64 copies of the very same inputs,
* the kernel under test in dtype X,
* ``plain_attention``: a materialized implementation whose every op (scores, softmax, matmul) runs in dtype X,

and requires err(kernel) <= 2·err(plain) for the output and the LSE, <= 3·err(plain) for every gradient (dq,
dk, dv, dbias, score-modifier parameters), plus a tiny floor relative to the reference's magnitude for the cases
where the plain error is ~0 (fp32: 1e-5, and float64 must agree to 1e-10 relative; relative to max(|ref|, 1)).

Known limit of the rule: when every query row sees exactly one key (Nk = 1, top-left causal with Nq = 1, ...),
the exact dq is 0 and the plain baseline reproduces that 0 exactly, while a FlashAttention-style backward (delta =
rowsum(dO ∘ O) from the *rounded* output) leaves a roundoff of about one ulp of the dtype; such half-precision
cases have no baseline to compare to, so test them in fp32/fp64.

Shape legend: B batch, Hq query heads, Hkv key/value heads, Nq queries, Nk keys, D q/k head dim, Dv value dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

import selfattn
from selfattn import masks as _masks
from selfattn.kernels.common import dropout_keep
from selfattn.scores import ScoreMod, compose

# relative floor added to the allowed error, by the dtype of the tensor compared (x max|reference|)
# fp32: the plain fp32 error is itself ~1e-7 and a tiled backward legitimately loses a few bits more (P is
# recomputed as exp(s - lse), delta = rowsum(dO∘O) cancels), so the floor sits one decade above fp32 roundoff;
# any real bug (a wrong mask entry, a lost tile) shows as errors of 1e-2 or more.
REL_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-6, torch.float16: 1e-6}
OUT_FACTOR, GRAD_FACTOR = 2.0, 3.0

__all__ = ["make_inputs", "plain_attention", "max_err", "check_attention", "dropout_seed", "Result",
           "noncontiguous"]


def max_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| in float64; inf if either holds NaN where the other does not (NaN never passes)."""
    if a.shape != b.shape:
        raise ValueError(f"max_err: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    a64, b64 = a.detach().double(), b.detach().double()
    if torch.isnan(a64).any() or torch.isnan(b64).any():
        return math.inf
    both_inf = torch.isinf(a64) & torch.isinf(b64) & (a64 == b64)  # -inf == -inf counts as agreement
    d = torch.where(both_inf, torch.zeros_like(a64), (a64 - b64).abs())
    return float(d.max())


def _magnitude(t: Tensor) -> float:
    t = t.detach().double()
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def noncontiguous(x: Tensor) -> Tensor:
    """Same values, (B, N, H, D)-major storage seen through a transpose: x.is_contiguous() is False."""
    if x.dim() != 4 or x.numel() == 0:
        return x
    return x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D) storage


def make_inputs(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, Dv: Optional[int] = None,
                dtype=torch.float32, seed: int = 0, noncontig: bool = False, requires_grad: bool = True,
                device="cpu"):
    """q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv): standard normal drawn in float64 from ``seed``,
    then cast to dtype; leaves (requires_grad as asked), non-contiguous (transposed storage) when noncontig."""
    Dv = D if Dv is None else Dv
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)):
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
        if noncontig:
            x = noncontiguous(x)
        out.append(x.detach().requires_grad_(requires_grad))
    return tuple(out)


def dropout_seed(seed: int) -> int:
    """The per-call dropout seed ``selfattn.attention`` draws from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=g).item())


def _split_bias(bias):
    if bias is None:
        return None, []
    if isinstance(bias, (list, tuple)) and bias and all(isinstance(b, int) for b in bias):
        raise TypeError("internal: bias shape must be turned into a tensor first")
    if isinstance(bias, Tensor):
        return bias, []
    if isinstance(bias, ScoreMod):
        return None, [bias]
    t = [b for b in bias if isinstance(b, Tensor)]
    return (t[0] if t else None), [b for b in bias if isinstance(b, ScoreMod)]


def plain_attention(q: Tensor, k: Tensor, v: Tensor, mask=None, bias=None, scale: Optional[float] = None,
                    dropout_p: float = 0.0, seed: int = 0, return_lse: bool = False):
    """Textbook attention with every op in q's dtype (the baseline whose error sets the tolerance).

    mask: None, bool tensor or selfattn.masks object (via .dense); bias: None, tensor, ScoreMod or list
    [tensor, mods...]; GQA by repeat_interleave; dropout: keep pattern from ``dropout_keep(seed, ...)`` — the
    per-call seed, see ``dropout_seed``. Empty rows give out 0 and lse -inf without NaN in the gradients."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    dt = q.dtype
    scale = (1.0 / math.sqrt(D) if D > 0 else 1.0) if scale is None else scale  # selfattn's default
    G = Hq // Hkv
    kr = k.repeat_interleave(G, dim=1)  # (B, Hq, Nk, D)
    vr = v.repeat_interleave(G, dim=1)  # (B, Hq, Nk, Dv)
    s = (q @ kr.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk) in dtype X
    bias_t, mods = _split_bias(bias)
    if bias_t is not None:
        s = s + bias_t.to(dt)
    if mods:
        q_idx = torch.arange(Nq, device=q.device)[:, None]
        k_idx = torch.arange(Nk, device=q.device)[None, :]
        s = compose(*mods)(s, q_idx, k_idx).to(dt).expand(B, Hq, Nq, Nk)
    if mask is not None:
        allowed = mask if isinstance(mask, Tensor) else mask.dense(B, Hq, Nq, Nk, device=q.device)
        allowed = allowed.expand(B, Hq, Nq, Nk)
        empty = ~allowed.any(-1, keepdim=True)  # (B, Hq, Nq, 1)
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)
        # empty rows: softmax over zeros then weight 0, so neither the output nor a gradient sees a NaN
        w = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    else:
        lse = torch.logsumexp(s, -1)
        w = torch.softmax(s, -1)
    if dropout_p > 0.0:
        keep = dropout_keep(seed, dropout_p, torch.arange(B), torch.arange(Hq),
                            torch.arange(Nq, device=q.device)[:, None], torch.arange(Nk, device=q.device)[None, :])
        w = w * keep.to(dt) / (1.0 - dropout_p)
    out = w @ vr  # (B, Hq, Nq, Dv)
    return (out, lse) if return_lse else out


@dataclass
class Result:
    """What check_attention computed, for tests that look further (determinism, NaN, ...)."""
    out: Tensor
    lse: Tensor
    grads: Dict[str, Optional[Tensor]]
    ref_out: Tensor
    ref_lse: Tensor
    ref_grads: Dict[str, Optional[Tensor]]
    errors: Dict[str, tuple] = field(default_factory=dict)  # name -> (err kernel, err plain, limit)


def _materialize_bias(bias, B, Hq, Nq, Nk, dtype, seed):
    """Shape tuples become random float tensors (requires_grad) of that shape; everything else passes."""
    g = torch.Generator().manual_seed(seed + 7919)

    def one(b):
        if isinstance(b, tuple) and all(isinstance(x, int) for x in b):
            return torch.randn(b, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
        return b

    if bias is None:
        return None
    if isinstance(bias, list):
        return [one(b) for b in bias]
    return one(bias)


def _bias_copy(bias, dtype):
    """The same bias with its tensor as a float64 leaf (for the reference), modifiers untouched."""
    def one(b):
        if isinstance(b, Tensor):
            return b.detach().to(dtype).requires_grad_(b.requires_grad)
        return b
    if isinstance(bias, list):
        return [one(b) for b in bias]
    return one(bias)


def _grad_inputs(q, k, v, bias):
    names, ts = [], []
    for n, t in (("dq", q), ("dk", k), ("dv", v)):
        if t.requires_grad:
            names.append(n)
            ts.append(t)
    bias_t, mods = _split_bias(bias)
    if bias_t is not None and bias_t.requires_grad:
        names.append("dbias")
        ts.append(bias_t)
    for i, p in enumerate(compose(*mods).parameters() if mods else ()):
        if p.requires_grad:
            names.append(f"dparam{i}")
            ts.append(p)
    return names, ts


def _grads(out, names, inputs, dout):
    if not inputs:
        return {}
    gs = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    return dict(zip(names, gs))


def _limit(err_plain: float, factor: float, ref: Tensor, dtype) -> float:
    # the floor scales with max(|ref|, 1): inputs are O(1) normals, so a gradient that is exactly 0 in exact
    # arithmetic (one key: softmax has no gradient) still gets an fp-roundoff-sized allowance
    return factor * err_plain + REL_FLOOR[dtype] * max(_magnitude(ref), 1.0)


def check_attention(B: int, Hq: int, Hkv: int, Nq: int, Nk: int, D: int, Dv: Optional[int] = None,
                    dtype=torch.float32, mask=None, bias=None, kernel: Optional[str] = "tiled",
                    grads: bool = True, dropout_p: float = 0.0, seed: int = 0, noncontig: bool = False,
                    block_q: Optional[int] = None, block_k: Optional[int] = None,
                    scale: Optional[float] = None, bias_dtype=None) -> Result:
    """Run the kernel under test and check output, LSE and every gradient against the float64 reference.

    mask: None | bool tensor | selfattn.masks object.  bias: None | tensor | ScoreMod | a shape tuple (a random
    bias of that shape in ``bias_dtype`` (default dtype) with requires_grad) | a list [tensor or shape, mods...].
    Returns a Result (kernel outputs and grads, reference ones, and the measured errors)."""
    Dv = D if Dv is None else Dv
    q, k, v = make_inputs(B, Hq, Hkv, Nq, Nk, D, Dv, dtype, seed, noncontig, requires_grad=grads)
    bias = _materialize_bias(bias, B, Hq, Nq, Nk, bias_dtype or dtype, seed)
    q64, k64, v64 = (t.detach().double().requires_grad_(grads) for t in (q, k, v))
    bias64 = _bias_copy(bias, torch.float64)
    kwargs = dict(scale=scale, dropout_p=dropout_p, return_lse=True)

    def gen():
        return torch.Generator().manual_seed(seed)

    ref_out, ref_lse = selfattn.attention(q64, k64, v64, mask, bias=bias64, kernel="reference", generator=gen(),
                                          **kwargs)
    out, lse = selfattn.attention(q, k, v, mask, bias=bias, kernel=kernel, generator=gen(), block_q=block_q,
                                  block_k=block_k, **kwargs)
    pl_out, pl_lse = plain_attention(q, k, v, mask, bias, scale=scale, dropout_p=dropout_p,
                                     seed=dropout_seed(seed) if dropout_p > 0 else 0, return_lse=True)

    case = f"case B={B} Hq={Hq} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {dtype} kernel={kernel} mask={mask!r}"
    if out.shape != (B, Hq, Nq, Dv) or out.dtype != dtype:
        raise AssertionError(f"{case}: out {tuple(out.shape)} {out.dtype}, expected {(B, Hq, Nq, Dv)} {dtype}")
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if lse.shape != (B, Hq, Nq) or lse.dtype != lse_dtype:
        raise AssertionError(f"{case}: lse {tuple(lse.shape)} {lse.dtype}, expected {(B, Hq, Nq)} {lse_dtype}")
    if torch.isnan(out).any():
        raise AssertionError(f"{case}: NaN in the output")

    errors = {}

    def compare(name, got, ref, plain, factor, tdtype):
        e_k, e_p = max_err(got, ref), max_err(plain, ref)
        lim = _limit(e_p, factor, ref, tdtype)
        errors[name] = (e_k, e_p, lim)
        if not e_k <= lim:
            raise AssertionError(f"{case}: {name} error {e_k:.3e} > limit {lim:.3e} (plain {dtype} error "
                                 f"{e_p:.3e}, x{factor})")

    compare("out", out, ref_out, pl_out, OUT_FACTOR, dtype)
    # LSE: -inf exactly where the reference says the row is empty; finite entries by the baseline rule
    ref_empty = torch.isneginf(ref_lse)
    if not torch.equal(torch.isneginf(lse), ref_empty) or not torch.isfinite(lse[~ref_empty]).all():
        raise AssertionError(f"{case}: lse -inf pattern differs from the reference's")
    compare("lse", lse[~ref_empty], ref_lse[~ref_empty], pl_lse.detach()[~ref_empty], OUT_FACTOR, dtype)
    if ref_empty.any():
        if out.detach()[ref_empty].abs().max() != 0:
            raise AssertionError(f"{case}: empty rows must give output 0")

    grads_k, grads_r = {}, {}
    if grads:
        g = torch.Generator().manual_seed(seed + 1)
        dout64 = torch.randn(out.shape, generator=g, dtype=torch.float64)
        dout = dout64.to(dtype)
        dout64 = dout.double()
        names, ins = _grad_inputs(q, k, v, bias)
        names64, ins64 = _grad_inputs(q64, k64, v64, bias64)
        grads_r = _grads(ref_out, names64, ins64, dout64)
        grads_k = _grads(out, names, ins, dout)
        grads_p = _grads(pl_out, names, ins, dout)
        for name, t in zip(names, ins):
            gk, gr, gp = grads_k[name], grads_r[name], grads_p[name]
            if gr is None:  # the reference does not use this input at all (e.g. B = 0): nothing must flow
                gr = torch.zeros_like(t, dtype=torch.float64)
            gk = torch.zeros_like(t) if gk is None else gk
            gp = torch.zeros_like(t) if gp is None else gp
            if gk.shape != t.shape or gk.dtype != t.dtype:
                raise AssertionError(f"{case}: {name} has shape {tuple(gk.shape)} {gk.dtype}, expected "
                                     f"{tuple(t.shape)} {t.dtype}")
            if torch.isnan(gk).any():
                raise AssertionError(f"{case}: NaN in {name}")
            compare(name, gk, gr, gp, GRAD_FACTOR, t.dtype)
    return Result(out.detach(), lse.detach(), grads_k, ref_out.detach(), ref_lse, grads_r, errors)


def cpu_kernels():
    """The kernels that serve CPU calls here (native only when built and not switched off with
    SELFATTN_NATIVE=0; triton runs in tests/test_triton.py; decode serves only generation-step shapes)."""
    from selfattn import functional
    q = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    call, _, _ = functional.prepare(q, q, q)
    return [m.NAME for m in functional._KERNEL_MODULES
            if m.NAME not in ("decode", "triton") and m.why_not(call) is None]
