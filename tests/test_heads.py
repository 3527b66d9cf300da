"""Head detectors: hand-built attention patterns with known scores, a brute-force dense check on random inputs,
the streaming bound (no dense N×N for all heads), and all-MiniLM-L6-v2's real heads."""
import math

import pytest
import torch

from selfattn import attention, masks
from selfattn.inspect.heads import DETECTORS, HeadScores, detect_heads, repeated_tokens, score_heads

D = {name: i for i, name in enumerate(DETECTORS)}


def _patterned(P):
    """P: (H, N, N) row-stochastic weights -> (q, k, lse, bias) whose softmax is exactly P (q = k = 0)."""
    H, N, _ = P.shape
    # (1, H, N, N): −1e4 where P = 0 (exp underflows to exactly 0, but the key stays allowed: the causal mask
    # alone decides which keys a row may see, as in a trained model)
    bias = torch.log(P).clamp_min(-1e4)[None]
    q = torch.zeros(1, H, N, 8, dtype=torch.float64)
    _, lse = attention(q, q, q, masks.causal(), bias=bias, return_lse=True)
    return q, lse, bias


def _hand_built(L=6):
    """Six heads over tokens [perm(L), perm(L)] (no token repeats within a half)."""
    N = 2 * L
    toks = torch.randperm(L, generator=torch.Generator().manual_seed(1)).repeat(2)  # (N,)
    P = torch.zeros(6, N, N, dtype=torch.float64)
    for i in range(N):
        P[0, i, max(i - 1, 0)] = 1  # previous token (row 0 sees itself)
        P[1, i, i - L + 1 if i >= L else 0] = 1  # induction: the token after the earlier copy
        P[2, i, i - L if i >= L else 0] = 1  # duplicate token
        P[3, i, 0] = 1  # first token / sink
        P[4, i, :i + 1] = 1 / (i + 1)  # uniform over the causal prefix
        lo = max(0, i - 2)
        P[5, i, lo:i + 1] = 1 / (i + 1 - lo)  # local: the last 3 keys
    return P, toks


def test_hand_built_patterns_score_as_designed():
    L = 6
    P, toks = _hand_built(L)
    q, lse, bias = _patterned(P)
    s = score_heads(q, q, lse, masks.causal(), bias=bias, tokens=toks, window=4, block_q=5)  # (6, K); blocks not dividing N
    N = 2 * L
    assert s[0, D["previous_token"]] == pytest.approx(1) and s[0, D["local"]] == pytest.approx(1)
    assert s[0, D["induction"]] == pytest.approx(0) and s[0, D["uniform"]] == pytest.approx(0, abs=1e-12)
    assert s[1, D["induction"]] == pytest.approx(1) and s[1, D["duplicate_token"]] == pytest.approx(0)
    assert s[2, D["duplicate_token"]] == pytest.approx(1) and s[2, D["induction"]] == pytest.approx(0)
    assert s[3, D["first_token"]] == pytest.approx(1) and s[3, D["previous_token"]] == pytest.approx(1 / (N - 1))
    assert s[4, D["uniform"]] == pytest.approx(1)
    assert s[4, D["first_token"]] == pytest.approx(sum(1 / (i + 1) for i in range(N)) / N)
    # induction for the uniform head: rows L..N-1 each put 1/(i+1) on the one key after the earlier copy
    assert s[4, D["induction"]] == pytest.approx(sum(1 / (i + 1) for i in range(L, N)) / L)
    assert s[5, D["local"]] == pytest.approx(1) and s[5, D["previous_token"]] == pytest.approx(
        (1 / 2 + (N - 2) / 3) / (N - 1))
    assert s[5, D["uniform"]] == pytest.approx(sum(math.log(min(i + 1, 3)) / math.log(i + 1) for i in range(1, N)) / (N - 1))
    found = HeadScores(["toy"], [s]).found(0.9)
    assert [h for _, h, _ in found["induction"]] == [1] and [h for _, h, _ in found["duplicate_token"]] == [2]
    assert [h for _, h, _ in found["previous_token"]] == [0] and [h for _, h, _ in found["uniform"]] == [4]
    # without tokens the token-based scores are undefined, the rest unchanged
    s2 = score_heads(q, q, lse, masks.causal(), bias=bias, window=4)
    assert torch.isnan(s2[:, D["induction"]]).all() and torch.isnan(s2[:, D["duplicate_token"]]).all()
    assert torch.allclose(s2[:, D["previous_token"]], s[:, D["previous_token"]])


def _dense_scores(w, toks, window):
    """Brute force over the full (H, N, N) weights: the module docstring's definitions, one row at a time."""
    H, N, _ = w.shape
    out = torch.full((H, len(DETECTORS)), float("nan"), dtype=torch.float64)
    for h in range(H):
        acc = {d: [] for d in DETECTORS}
        for i in range(N):
            row = w[h, i]
            if i >= 1:
                acc["previous_token"].append(row[i - 1])
            ind = [j for j in range(1, i + 1) if toks[j - 1] == toks[i]]
            if ind:
                acc["induction"].append(sum(row[j] for j in ind))
            dup = [j for j in range(i) if toks[j] == toks[i]]
            if dup:
                acc["duplicate_token"].append(sum(row[j] for j in dup))
            acc["first_token"].append(row[0])
            if i >= window:
                acc["local"].append(sum(row[j] for j in range(N) if abs(i - j) < window))
            nz = row[row > 0]
            if nz.numel() >= 2:
                acc["uniform"].append(-(nz * nz.log()).sum() / math.log(nz.numel()))
        for d, v in acc.items():
            if v:
                out[h, D[d]] = float(sum(v)) / len(v)
    return out


@pytest.mark.parametrize("mask", [None, masks.causal(), masks.sliding_window(5)])
def test_streamed_scores_match_dense_brute_force(mask):
    g = torch.Generator().manual_seed(0)
    H, Hkv, N = 4, 2, 23  # GQA 4:2, N not a block multiple
    q = torch.randn(1, H, N, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, Hkv, N, 8, generator=g, dtype=torch.float64)
    toks = torch.randint(0, 5, (N,), generator=g)  # small vocabulary: many duplicates
    _, lse = attention(q, k, k, mask, return_lse=True)
    s = score_heads(q, k, lse, mask, tokens=toks, window=3, block_q=7)
    dense = mask.dense(1, H, N, N) if mask is not None else torch.ones(1, H, N, N, dtype=torch.bool)
    sc = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    w = torch.softmax(sc.masked_fill(~dense, float("-inf")), -1)[0]  # (H, N, N)
    ref = _dense_scores(w, toks.tolist(), 3)
    assert torch.allclose(s, ref, atol=1e-9, equal_nan=True), (s, ref)


def test_long_sequence_streams_per_head_and_row_block(monkeypatch):
    """N = 2048, 4 heads: the dense weights of the layer would be 64 MiB; with the weights limit at 4 MiB (below
    one head's 16 MiB) the detectors still run, because they hold one (rows, N) block at a time."""
    monkeypatch.setenv("SELFATTN_REFERENCE_MAX_BYTES", str(4 << 20))
    N, L = 2048, 1024
    toks = repeated_tokens(1, L, 2, high=50000, seed=3)  # (1, N)
    pos = torch.arange(N, dtype=torch.float32)
    # head 0 attends to the previous token (a sharp positional kernel under an 8-key window), the others are random
    q = torch.randn(1, 4, N, 16, generator=torch.Generator().manual_seed(0))
    k = torch.randn(1, 4, N, 16, generator=torch.Generator().manual_seed(1))
    freq = torch.tensor([0.5])
    q[0, 0, :, 0], q[0, 0, :, 1] = 40 * torch.cos((pos - 1) * freq), 40 * torch.sin((pos - 1) * freq)
    k[0, 0, :, 0], k[0, 0, :, 1] = 40 * torch.cos(pos * freq), 40 * torch.sin(pos * freq)
    q[0, 0, :, 2:], k[0, 0, :, 2:] = 0, 0
    with pytest.raises(ValueError, match="SELFATTN_REFERENCE_MAX_BYTES"):
        from selfattn.inspect import attention_weights
        _, lse = attention(q, k, k, masks.sliding_window(7), return_lse=True)
        attention_weights(q, k, lse, masks.sliding_window(7), heads=[0])  # one head's matrix: over the limit
    s = score_heads(q, k, lse, masks.sliding_window(7), tokens=toks, block_q=64)
    assert s[0, D["previous_token"]] > 0.99 and (s[1:, D["previous_token"]] < 0.5).all()
    assert s[0, D["local"]] > 0.99 and (s[1:, D["local"]] < 0.9).all()  # random heads spread over the 8 keys


def test_detect_heads_on_a_model_and_errors():
    from selfattn.nn import Attention

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 16)
            self.a = torch.nn.ModuleList([Attention(16, 2, causal=True, rope_theta=10000.0) for _ in range(2)])

        def forward(self, ids):
            x = self.emb(ids)
            for a in self.a:
                x = x + a(x)
            return x

    ids = repeated_tokens(2, 5, 3, high=20, seed=0)
    assert ids.shape == (2, 15) and torch.equal(ids[:, :5], ids[:, 5:10])
    res = detect_heads(Two(), ids)
    assert res.names == ["a.0", "a.1"] and [s.shape for s in res.scores] == [(2, 6), (2, 6)]
    assert len(res.table()) == 4 and "induction (> 0.4): " in res.format()
    assert not torch.isnan(torch.stack(res.scores)).any()
    with pytest.raises(TypeError, match="model"):
        detect_heads(lambda x: x, ids)
    with pytest.raises(ValueError, match="no selfattn self-attention call"):
        detect_heads(torch.nn.Embedding(20, 4), ids)
    q = torch.zeros(1, 2, 4, 8)
    _, lse = attention(q, q, q, return_lse=True)
    with pytest.raises(ValueError, match="tokens"):
        score_heads(q, q, lse, tokens=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="window"):
        score_heads(q, q, lse, window=0)
    with pytest.raises(ValueError, match="detector"):
        res.best("nope")
    with pytest.raises(ValueError, match="low, high"):
        repeated_tokens(1, 4, high=0)


@pytest.fixture(scope="module")
def minilm_scores():
    from selfattn import models
    path = models.minilm_path()
    model = models.load(path).eval()
    tok = models.load_tokenizer(path).tok
    words = [i for i in range(2000, tok.get_vocab_size()) if tok.id_to_token(i).isalpha()]
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    ids = repeated_tokens(4, 40, 2, choices=words, prefix=[cls], suffix=[sep], seed=0)  # (4, 82)
    return detect_heads(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_minilm_real_heads(minilm_scores):
    """all-MiniLM-L6-v2 (6 layers × 12 heads) on [CLS] r r [SEP], r = 40 random words. What it has: one sharp
    previous-token head (0.2), a duplicate-token head (2.9), many [CLS] sinks in layers 1-4, near-uniform heads in
    layer 0. What it lacks: induction heads (a bidirectional sentence encoder never needed to continue a text)."""
    res = minilm_scores
    assert len(res.names) == 6 and all(s.shape == (12, len(DETECTORS)) for s in res.scores)
    found = res.found()
    assert [(c, h) for c, h, _ in found["previous_token"]] == [(0, 2)] and found["previous_token"][0][2] > 0.95
    assert [(c, h) for c, h, _ in found["duplicate_token"]] == [(2, 9)]
    assert found["induction"] == [] and res.best("induction")[2] < 0.1
    assert res.best("first_token")[:2] == (1, 11) and len(found["first_token"]) > 20
    assert {c for c, _, _ in found["uniform"]} <= {0, 3} and len(found["uniform"]) >= 8
    text = res.format()
    assert "previous_token (> 0.4): 0.2 (0.99)" in text and "induction (> 0.4): none" in text


class HandSetInduction(torch.nn.Module):
    """A 2-layer attention-only circuit with hand-set weights (Olsson et al.'s induction mechanism, by hand).
    Residual stream = [token one-hot (V) | position one-hot (N) | previous token one-hot (V)].
    Layer 0, a previous-token head: query position i matches key position i − 1; it copies the key's token into
    the "previous token" slot. Layer 1, an induction head: query token t matches keys whose previous token is t,
    and copies their token."""

    def __init__(self, V, N, sharp=30.0):
        super().__init__()
        from selfattn.nn import Attention
        E = 2 * V + N
        self.V, self.N = V, N
        D0 = max(N, V)
        self.l0 = Attention(E, 1, head_dim=D0, bias=False, causal=True, scale=1.0)
        self.l1 = Attention(E, 1, head_dim=V, bias=False, causal=True, scale=1.0)
        tok, pos, prev = slice(0, V), slice(V, V + N), slice(V + N, E)
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()
            self.l0.q_proj.weight[:N - 1, pos] = sharp * torch.eye(N)[1:]  # query at position i: e_{i-1}
            self.l0.k_proj.weight[:N, pos] = torch.eye(N)  # key at j: e_j
            self.l0.v_proj.weight[:V, tok] = torch.eye(V)  # value: the key's token ...
            self.l0.out_proj.weight[prev, :V] = torch.eye(V)  # ... written to the previous-token slot
            self.l1.q_proj.weight[:, tok] = sharp * torch.eye(V)  # query: my token
            self.l1.k_proj.weight[:, prev] = torch.eye(V)  # key: the token before the key
            self.l1.v_proj.weight[:, tok] = torch.eye(V)  # value: the key's token, copied to the output
            self.l1.out_proj.weight[tok, :] = torch.eye(V)

    def forward(self, ids):
        B, N = ids.shape
        x = torch.cat([torch.nn.functional.one_hot(ids, self.V).float(),
                       torch.eye(self.N)[:N].expand(B, N, self.N),
                       torch.zeros(B, N, self.V)], -1)  # (B, N, E)
        x = x + self.l0(x)
        return x + self.l1(x)


def test_detectors_find_a_hand_set_induction_circuit():
    ids = repeated_tokens(3, 10, 2, high=40, seed=5)  # (3, 20)
    res = detect_heads(HandSetInduction(40, 20), ids)
    (c0, s0), (c1, s1) = zip(res.names, res.scores)
    assert s0[0, D["previous_token"]] > 0.99 and s0[0, D["induction"]] < 0.1
    assert s1[0, D["induction"]] > 0.9 and s1[0, D["previous_token"]] < 0.2  # rows without a copy: uniform
    assert [(c, h) for c, h, _ in res.found()["induction"]] == [(1, 0)]
    assert [(c, h) for c, h, _ in res.found()["previous_token"]] == [(0, 0)]
