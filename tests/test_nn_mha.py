"""selfattn.nn.MultiheadAttention against torch.nn.MultiheadAttention: same state_dict, outputs, weights and
gradients across the constructor and forward options.

Golden: torch's module in float64. float64 must agree to 1e-10 (relative to the magnitude); float32 follows the
oracle rule: err(selfattn fp32) <= 2 x err(torch fp32) + 1e-6 x magnitude, gradients 3x."""
import pytest
import torch

from selfattn.nn import MultiheadAttention, record_attention

E, H, L, S, NB = 16, 4, 7, 9, 3


def _masks(kind, gen):
    """torch conventions: bool True = NOT allowed; float added."""
    out = {}
    if "kpm" in kind:
        kpm = torch.rand(NB, S, generator=gen) < 0.3
        kpm[:, 0] = False  # every row keeps a key: torch would give NaN for a fully masked row
        out["key_padding_mask"] = kpm
    if "bool2d" in kind:
        am = torch.rand(L, S, generator=gen) < 0.3
        am[:, 1] = False
        out["attn_mask"] = am
    if "bool3d" in kind:
        am = torch.rand(NB * H, L, S, generator=gen) < 0.3
        am[:, :, 1] = False
        out["attn_mask"] = am
    if "float2d" in kind:
        out["attn_mask"] = torch.randn(L, S, generator=gen, dtype=torch.float64)
    if "float3d" in kind:
        out["attn_mask"] = torch.randn(NB * H, L, S, generator=gen, dtype=torch.float64)
    if "fkpm" in kind:
        out["key_padding_mask"] = torch.randn(NB, S, generator=gen, dtype=torch.float64)
    return out


CTOR = [dict(), dict(batch_first=True), dict(kdim=5, vdim=11), dict(add_bias_kv=True), dict(add_zero_attn=True),
        dict(bias=False), dict(add_bias_kv=True, add_zero_attn=True, batch_first=True, kdim=6, vdim=6)]
FWD = [("", dict()), ("kpm", dict()), ("bool2d", dict()), ("bool3d", dict()), ("float2d", dict()),
       ("float3d", dict()), ("kpm+bool2d", dict(average_attn_weights=False)), ("fkpm+float2d", dict())]


def _pair(ctor, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, **ctor, dtype=torch.float64)
    with torch.no_grad():
        for p in ref.parameters():  # non-zero biases: the default init leaves them 0
            if p.dim() == 1:
                p.normal_()
    ours = MultiheadAttention(E, H, **ctor, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())  # strict: same keys and shapes
    return ref.eval(), ours.eval()


def _inputs(ctor, gen, self_attn=False):
    bf = ctor.get("batch_first", False)
    shp = lambda n, d: (NB, n, d) if bf else (n, NB, d)  # noqa: E731
    q = torch.randn(shp(L, E), generator=gen, dtype=torch.float64)
    if self_attn:
        return q, q, q
    k = torch.randn(shp(S, ctor.get("kdim") or E), generator=gen, dtype=torch.float64)
    v = torch.randn(shp(S, ctor.get("vdim") or E), generator=gen, dtype=torch.float64)
    return q, k, v


def _cast(x, dtype):
    if x is None or not torch.is_tensor(x) or not x.is_floating_point():
        return x
    return x.to(dtype)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check(ref, ours, args, kw, need_weights):
    o_ref, w_ref = ref(*args, need_weights=need_weights, **kw)
    o, w = ours(*args, need_weights=need_weights, **kw)
    mag = o_ref.abs().max().item()
    assert _err(o, o_ref) <= 1e-10 * max(mag, 1.0)
    if need_weights:
        assert w.shape == w_ref.shape and _err(w, w_ref) <= 1e-10
    else:
        assert w is None and w_ref is None
    # float32: the oracle rule against torch's own float32 computation
    ref32, ours32 = ref.float(), ours.float()
    a32, kw32 = [_cast(a, torch.float32) for a in args], {k: _cast(v, torch.float32) for k, v in kw.items()}
    o_ref32, w_ref32 = ref32(*a32, need_weights=need_weights, **kw32)
    o32, w32 = ours32(*a32, need_weights=need_weights, **kw32)
    assert o32.dtype == torch.float32
    assert _err(o32, o_ref) <= 2 * _err(o_ref32, o_ref) + 1e-6 * max(mag, 1.0)
    if need_weights:
        assert _err(w32, w_ref) <= 2 * _err(w_ref32, w_ref) + 1e-6
    ref.double(), ours.double()


# every mask option on the default and batch_first layers; three mask mixes on every other constructor option
CASES = [(c, f) for c in CTOR[:2] for f in FWD] + [(c, f) for c in CTOR[2:] for f in (FWD[0], FWD[5], FWD[6])]


def _id(case):
    c, f = case
    return (",".join(f"{k}={v}" for k, v in c.items()) or "default") + "-" + (f[0] or "none")


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_mha_matches_torch(case, need_weights):
    ctor, fwd = case
    gen = torch.Generator().manual_seed(1)
    ref, ours = _pair(ctor)
    args = _inputs(ctor, gen)
    kw = dict(_masks(fwd[0], gen), **fwd[1])
    _check(ref, ours, args, kw, need_weights)


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_is_causal_hint(need_weights):
    gen = torch.Generator().manual_seed(2)
    ref, ours = _pair(dict(batch_first=True))
    x = torch.randn(NB, L, E, generator=gen, dtype=torch.float64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)  # float -inf above
    _check(ref, ours, (x, x, x), dict(attn_mask=causal, is_causal=True), need_weights)
    bool_causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    _check(ref, ours, (x, x, x), dict(attn_mask=bool_causal, is_causal=True), need_weights)
    with pytest.raises(RuntimeError, match="attn_mask"):
        ours(x, x, x, is_causal=True)


@pytest.mark.parametrize("need_weights", [True, False])
def test_mha_unbatched(need_weights):
    gen = torch.Generator().manual_seed(3)
    ref, ours = _pair(dict(kdim=5, vdim=5, add_zero_attn=True))
    q = torch.randn(L, E, generator=gen, dtype=torch.float64)
    kv = torch.randn(S, 5, generator=gen, dtype=torch.float64)
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-2:] = True
    _check(ref, ours, (q, kv, kv), dict(key_padding_mask=kpm, average_attn_weights=False), need_weights)
    _check(ref, ours, (q, kv, kv), dict(attn_mask=torch.randn(H, L, S, generator=gen, dtype=torch.float64)),
           need_weights)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's own deprecation notice
def test_mha_self_attention_gradients():
    gen = torch.Generator().manual_seed(4)
    ref, ours = _pair(dict(batch_first=True, add_bias_kv=True))
    x = torch.randn(NB, L, E, generator=gen, dtype=torch.float64, requires_grad=True)
    am = torch.randn(L, L + 1, generator=gen, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(NB, L, dtype=torch.bool)
    kpm[0, -3:] = True
    grads = []
    for m in (ref, ours):
        for p in list(m.parameters()) + [x, am]:
            p.grad = None
        out, w = m(x, x, x, key_padding_mask=kpm, attn_mask=am[:, :L], need_weights=False)
        (out.square().sum()).backward()
        grads.append([p.grad.clone() for p in list(m.parameters()) + [x, am]])
    for g_ref, g in zip(*grads):
        assert _err(g, g_ref) <= 1e-10 * max(g_ref.abs().max().item(), 1.0)


def test_mha_fully_masked_rows_are_zero_not_nan():
    gen = torch.Generator().manual_seed(5)
    _, ours = _pair(dict(batch_first=True))
    x = torch.randn(2, 5, E, generator=gen, dtype=torch.float64)
    am = torch.zeros(5, 5, dtype=torch.bool)
    am[2] = True  # query 2 may attend to nothing
    for need in (True, False):
        out, w = ours(x, x, x, attn_mask=am, need_weights=need, average_attn_weights=False)
        assert torch.isfinite(out).all()
        if need:
            assert torch.isfinite(w).all() and (w[:, :, 2] == 0).all()
            torch.testing.assert_close(w[:, :, [0, 1, 3, 4]].sum(-1), torch.ones(2, H, 4, dtype=torch.float64))


def test_mha_records_and_validation():
    _, ours = _pair(dict())
    x = torch.randn(L, NB, E, dtype=torch.float64)
    recs = []
    with record_attention(recs.append):
        ours(x, x, x, need_weights=True)
        ours(x, x, x, need_weights=False)
    assert len(recs) == 2 and all(r.module is ours and r.q.shape == (NB, H, L, E // H) for r in recs)
    torch.testing.assert_close(recs[0].lse, recs[1].lse)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(x, x, x, key_padding_mask=torch.zeros(NB, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(2, L, L, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        ours(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_heads"):
        MultiheadAttention(10, 3)


def test_mha_long_sequence_runs_tiled():
    """need_weights=False on a long sequence goes through the tiled kernel and still matches torch."""
    gen = torch.Generator().manual_seed(6)
    ref, ours = _pair(dict(batch_first=True))
    x = torch.randn(1, 300, E, generator=gen, dtype=torch.float64)
    kpm = torch.zeros(1, 300, dtype=torch.bool)
    kpm[:, 250:] = True
    o_ref, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
    o, _ = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert _err(o, o_ref) <= 1e-10 * o_ref.abs().max().item()


def test_drop_in_inside_torch_transformer_encoder_layer_runs_selfattn(monkeypatch):
    """Placed in torch.nn.TransformerEncoderLayer (eval, no_grad: where torch takes its fused fast path), the
    drop-in's forward -- and so selfattn's kernel -- runs, and the layer equals the same layer on torch's MHA."""
    from selfattn import functional
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    ours = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True).eval()
    ours.load_state_dict(ref.state_dict())
    mha = MultiheadAttention(32, 4, batch_first=True)
    mha.load_state_dict(ref.self_attn.state_dict())
    ours.self_attn = mha
    calls = []
    for module in functional._KERNEL_MODULES:
        monkeypatch.setattr(module, "forward", lambda call, _r=module.forward: calls.append(1) or _r(call))
    x = torch.randn(2, 10, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[1, 7:] = True
    with torch.no_grad():
        for kw in ({}, {"src_key_padding_mask": pad}):
            calls.clear()
            got, want = ours(x, **kw), ref(x, **kw)
            assert calls, "selfattn's kernel did not run"
            real = ~pad[..., None] if kw else torch.ones(2, 10, 1, dtype=torch.bool)
            assert (got - want).masked_fill(~real, 0).abs().max() < 1e-5
    enc = torch.nn.TransformerEncoder(ours, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        enc(x, src_key_padding_mask=pad)
    merged, kind = mha.merge_masks(None, pad, x)
    assert kind == 1 and merged is pad


def test_is_causal_hint_ignores_attn_mask_shape_like_torch():
    torch.manual_seed(0)
    t = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    m = MultiheadAttention(16, 2, batch_first=True)
    m.load_state_dict(t.state_dict())
    x = torch.randn(2, 6, 16)
    odd = torch.zeros(3, 3)  # wrong shape: torch never reads it under the hint
    want, _ = t(x, x, x, attn_mask=odd, is_causal=True, need_weights=False)
    got, _ = m(x, x, x, attn_mask=odd, is_causal=True, need_weights=False)
    assert (got - want).abs().max() < 1e-5
