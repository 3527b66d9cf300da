"""selfattn.nn: Attention (projections, GQA, RoPE, cross-attention, KV cache), KVCache, record_attention.

Golden values are float64 computations; float32 results follow the oracle rule (error <= 2x a plain float32
implementation's error against the same golden)."""
import math

import pytest
import torch

import selfattn
from selfattn import masks
from selfattn.nn import Attention, AttentionRecord, KVCache, apply_rope, record_attention, rope_inv_freq


def plain_attention(layer: Attention, x, context=None, mask=None, positions=None):
    """Materialized multi-head attention written out directly (independent of selfattn.attention)."""
    B, N, _ = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    src = x if context is None else context
    if layer.qkv_fused:
        w, b = layer.qkv_proj.weight, layer.qkv_proj.bias
        q = torch.nn.functional.linear(x, w[:H * D], None if b is None else b[:H * D])
        kv = torch.nn.functional.linear(src, w[H * D:], None if b is None else b[H * D:])
        k, v = kv.split(Hkv * D, -1)
    else:
        q, k, v = layer.q_proj(x), layer.k_proj(src), layer.v_proj(src)
    M = k.shape[1]
    q = q.view(B, N, H, D).transpose(1, 2)
    k = k.view(B, M, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = v.view(B, M, Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    if layer.rope_inv_freq is not None and context is None:
        pos = torch.arange(N) if positions is None else positions
        q, k = apply_rope(q, pos, layer.rope_inv_freq), apply_rope(k, pos, layer.rope_inv_freq)
    s = q @ k.transpose(-1, -2) * layer.scale
    allowed = torch.ones(N, M, dtype=torch.bool)
    if layer.causal and context is None:
        allowed = torch.ones(N, M, dtype=torch.bool).tril(M - N)
    if mask is not None:
        allowed = allowed & mask
    s = s.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(s, -1) @ v
    return layer.out_proj(out.transpose(1, 2).reshape(B, N, H * D))


def _layer(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    layer = Attention(**kw, dtype=dtype)
    with torch.no_grad():  # non-zero biases so that bias handling is exercised
        for n, p in layer.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    return layer


CONFIGS = [
    dict(embed_dim=32, num_heads=4),
    dict(embed_dim=32, num_heads=4, qkv_fused=True, causal=True),
    dict(embed_dim=32, num_heads=8, num_kv_heads=2, causal=True, rope_theta=10000.0, bias=False),
    dict(embed_dim=24, num_heads=4, num_kv_heads=1, head_dim=8, rope_theta=500.0, rope_dim=4, causal=True),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_attention_matches_plain_float64(cfg):
    layer = _layer(**cfg)
    x = torch.randn(2, 13, cfg["embed_dim"], dtype=torch.float64)
    mask = torch.rand(13, 13) < 0.8
    mask[:, 0] = True
    torch.testing.assert_close(layer(x, mask=mask), plain_attention(layer, x, mask=mask), rtol=1e-10, atol=1e-10)


def test_attention_float32_oracle_rule():
    cfg = CONFIGS[2]
    layer64 = _layer(**cfg)
    layer32 = _layer(dtype=torch.float32, **cfg)
    layer32.load_state_dict(layer64.state_dict())
    layer32.kernel = "tiled"
    x = torch.randn(2, 300, cfg["embed_dim"], dtype=torch.float64)
    golden = plain_attention(layer64, x)
    with torch.no_grad():
        err = (layer32(x.float()).double() - golden).abs().max()
        err_plain = (plain_attention(layer32, x.float()).double() - golden).abs().max()
    assert err <= 2 * err_plain + 1e-7


def test_cross_attention_kdim_vdim():
    layer = _layer(embed_dim=16, num_heads=2, kdim=6, vdim=10)
    x, ctx = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 9, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # k_proj reads 6 features; value projection from the same context: vdim
        layer(x, context=ctx)
    layer = _layer(embed_dim=16, num_heads=2, kdim=6, vdim=6)
    torch.testing.assert_close(layer(x, context=ctx), plain_attention(layer, x, context=ctx), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("max_len", [None, 40])
@pytest.mark.parametrize("cfg", CONFIGS[1:])
def test_kv_cache_incremental_equals_full(cfg, max_len):
    layer = _layer(**cfg)
    x = torch.randn(2, 23, cfg["embed_dim"], dtype=torch.float64)
    full = layer(x)
    cache = KVCache(max_len)
    outs = [layer(x[:, :7], cache=cache)]  # prefill a block, then one token at a time
    for i in range(7, 23):
        outs.append(layer(x[:, i:i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.length == 23


def test_kv_cache_views_and_growth():
    cache = KVCache()
    k = torch.randn(1, 2, 5, 4)
    ka, va = cache.update(k, k + 1)
    assert ka.shape == (1, 2, 5, 4) and ka.data_ptr() == cache._k.data_ptr()  # a view, no copy
    cap = cache.capacity
    for _ in range(cap - 5):
        cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert cache.capacity == cap  # no reallocation while it fits
    ka, _ = cache.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert cache.capacity >= 2 * cap and torch.equal(ka[:, :, :5], k)
    static = KVCache(max_len=6)
    static.update(k, k)
    with pytest.raises(ValueError, match="max_len=6"):
        static.update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="k_new"):
        static.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4))
    caches = KVCache.for_model(3, max_len=8)
    assert len(caches) == 3 and all(c.max_len == 8 for c in caches)


def test_cross_attention_cache_filled_once():
    layer = _layer(embed_dim=16, num_heads=4)
    x, ctx = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 9, 16, dtype=torch.float64)
    cache = KVCache()
    a = layer(x[:, :1], context=ctx, cache=cache)
    b = layer(x[:, 1:], cache=cache)  # context not needed any more
    assert cache.length == 9
    torch.testing.assert_close(torch.cat([a, b], 1), layer(x, context=ctx), rtol=1e-10, atol=1e-10)


def test_rope_matches_hf_convention():
    # HF Llama: q*cos + rotate_half(q)*sin, inv_freq = 1 / theta^(arange(0, d, 2)/d), emb = cat(freqs, freqs)
    D, theta = 8, 10000.0
    x = torch.randn(1, 1, 5, D, dtype=torch.float64)
    pos = torch.arange(3, 8)
    inv = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().double(), torch.cat([ang, ang], -1).sin().double()
    rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
    torch.testing.assert_close(apply_rope(x, pos, rope_inv_freq(D, theta)), x * cos + rot * sin)


def test_record_attention_contract():
    layer = _layer(embed_dim=32, num_heads=8, num_kv_heads=2, causal=True, rope_theta=10000.0)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    records = []
    with record_attention(records.append):
        out = layer(x)
    assert len(records) == 1
    r = records[0]
    assert isinstance(r, AttentionRecord) and r.module is layer
    assert r.q.shape == (2, 8, 11, 4) and r.k.shape == (2, 2, 11, 4) and r.v.shape == (2, 2, 11, 4)
    assert isinstance(r.mask, masks.Mask) and r.bias is None and r.score_mod is None
    assert r.scale == pytest.approx(0.5) and r.lse.shape == (2, 8, 11)
    # the record reproduces the call: re-running the kernel on it gives the layer's output
    o = selfattn.attention(r.q, r.k, r.v, r.mask, scale=r.scale).transpose(1, 2).reshape(2, 11, 32)
    torch.testing.assert_close(layer.out_proj(o), out)
    s = (r.q @ r.k.repeat_interleave(4, 1).transpose(-1, -2)) * r.scale
    s = s.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(r.lse, torch.logsumexp(s, -1))
    with record_attention(records.append):
        layer(x, mask=torch.ones(11, 11, dtype=torch.bool))
    assert isinstance(records[-1].mask, masks.Mask)  # bool tensors arrive converted
    n = len(records)
    torch.testing.assert_close(layer(x), out)
    assert len(records) == n  # nothing recorded outside the context


def test_attention_validation():
    with pytest.raises(ValueError, match="num_kv_heads"):
        Attention(32, 8, num_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="rope_dim"):
        Attention(32, 4, rope_theta=1e4, rope_dim=3)
    layer = Attention(32, 4)
    with pytest.raises(ValueError, match="x: expected"):
        layer(torch.randn(2, 5, 31))
    with pytest.raises(TypeError, match="mask"):
        layer(torch.randn(2, 5, 32), mask=torch.ones(5, 5))
    with pytest.raises(TypeError, match="cache"):
        layer(torch.randn(2, 5, 32), cache=[])


def test_attention_gradients_flow():
    layer = _layer(dtype=torch.float32, embed_dim=32, num_heads=4, causal=True)
    layer.kernel = "tiled"
    x = torch.randn(2, 9, 32, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_decode_attention_oracle_rule():
    """The decode kernel (few query rows per KV head, long cache) against the float64 reference."""
    from oracle import make_inputs, plain_attention as plain
    for Nq, dtype in ((1, torch.float64), (1, torch.float32), (2, torch.float32)):
        q, k, v = make_inputs(2, 8, 2, Nq, 1500, 40, dtype=dtype, seed=Nq, requires_grad=True)
        scale = 40 ** -0.5
        out, lse = selfattn.attention(q, k, v, kernel="decode", return_lse=True)
        _, lse_ref = selfattn.attention(q.double(), k.double(), v.double(), kernel="reference", return_lse=True)
        assert (lse.double() - lse_ref).abs().max() <= 1e-5 * lse_ref.abs().max()
        golden = selfattn.attention(q.double(), k.double(), v.double(), kernel="reference")
        err = (out.double() - golden).abs().max()
        if dtype == torch.float64:
            assert err <= 1e-10 * golden.abs().max()
            continue
        base = (plain(q, k, v, scale=scale).double() - golden).abs().max()
        assert err <= 2 * base + 1e-6 * golden.abs().max()
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v), g)
        base_grads = torch.autograd.grad(plain(q, k, v, scale=scale), (q, k, v), g)
        want = torch.autograd.grad(golden, (q, k, v), g.double())
        for a, b, w in zip(got, base_grads, want):
            assert (a.double() - w).abs().max() <= 3 * (b.double() - w).abs().max() + 1e-6 * w.abs().max()


def test_decode_steps_through_layer_use_decode_path(monkeypatch):
    from selfattn import functional
    layer = _layer(embed_dim=32, num_heads=8, num_kv_heads=2, causal=True, rope_theta=10000.0)
    x = torch.randn(2, 20, 32, dtype=torch.float64)
    full = layer(x)
    calls = []
    for module in functional._KERNEL_MODULES:  # record which kernel's forward primitive each step ran
        monkeypatch.setattr(module, "forward", lambda call, _r=module.forward, _n=module.NAME:
                            calls.append((_n, call.Nq)) or _r(call))
    cache = KVCache(max_len=20)
    with torch.no_grad():
        outs = [layer(x[:, :10], cache=cache)] + [layer(x[:, i:i + 1], cache=cache) for i in range(10, 20)]
    # every one-token step takes a decode path (the decode kernel, or the native kernel's split-K decode)
    steps = [name for name, nq in calls if nq == 1]
    assert len(steps) == 10 and set(steps) <= {"decode", "native"}, calls
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_alibi_score_modifier_through_layer_and_cache():
    from selfattn import scores
    layer = _layer(embed_dim=32, num_heads=4, causal=True)
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    slopes = scores.alibi_slopes(4)
    # plain: scores + slope_h (k - q), causal
    q, k, v = (p(x).view(2, 12, 4, 8).transpose(1, 2) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    pos = torch.arange(12)
    s = q @ k.transpose(-1, -2) * layer.scale + slopes[:, None, None] * (pos[None, :] - pos[:, None])
    s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    want = layer.out_proj((torch.softmax(s, -1) @ v).transpose(1, 2).reshape(2, 12, 32))
    torch.testing.assert_close(layer(x, bias=scores.alibi(num_heads=4)), want, rtol=1e-10, atol=1e-10)
    cache = KVCache()
    first = layer(x[:, :8], bias=scores.alibi(num_heads=4), cache=cache)
    rest = [layer(x[:, i:i + 1], bias=scores.alibi(num_heads=4, q_offset=i), cache=cache) for i in range(8, 12)]
    torch.testing.assert_close(torch.cat([first] + rest, 1), want, rtol=1e-10, atol=1e-10)
