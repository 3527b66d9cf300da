"""The models' speed-only paths compute what the plain paths compute: the column-major decode layout of the
weights (``stream_layout_``) and BERT's padding-free encoding (``encode(skip_padding=True)``), each checked
against float64 by the baseline rule (err(fast, fp32) <= 2 x err(plain, fp32) + a 1e-6 relative floor)."""
import copy

import torch

from selfattn.models import generate
from selfattn.models.bert import Bert, BertConfig, mean_pool, sentence_embeddings
from selfattn.models.generation import stream_layout_
from selfattn.models.gpt2 import GPT2, GPT2Config
from selfattn.models.llama import Llama, LlamaConfig
from selfattn.models.loading import load_checked


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _column_major(t):
    return t.dim() == 2 and t.stride() == (1, t.shape[0]) and t.shape[0] > 1


def _row_major_copy(model):
    """The same model with every parameter contiguous (the plain layout)."""
    plain = copy.deepcopy(model)
    for m in plain.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            setattr(m, name, torch.nn.Parameter(p.detach().contiguous(), requires_grad=p.requires_grad))
    return plain


def test_gpt2_layout_is_column_major_where_out_is_wider():
    torch.manual_seed(0)
    m = GPT2(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    b = m.blocks[0]
    assert _column_major(b.attn.qkv_proj.weight)  # (48, 16): out > in
    assert _column_major(b.attn.out_proj.weight)  # (16, 16): out == in
    assert _column_major(b.mlp_in.weight)  # (64, 16)
    assert b.mlp_out.weight.is_contiguous()  # (16, 64): out < in stays row-major
    assert _column_major(m.wte.weight)  # the tied head reads wte as (E, V)
    plain = _row_major_copy(m)
    # shapes and names unchanged; a state_dict from the plain layout loads and keeps the decode layout
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    fresh = GPT2(m.config).eval()
    load_checked(fresh, {k: v.clone() for k, v in plain.state_dict().items()})
    assert _column_major(fresh.blocks[1].attn.qkv_proj.weight) and _column_major(fresh.wte.weight)
    assert _column_major(fresh.to(torch.float64).blocks[1].mlp_in.weight)  # .to() keeps the strides


def test_gpt2_layout_logits_and_tokens():
    torch.manual_seed(0)
    m = GPT2(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    plain = _row_major_copy(m)
    ref = _row_major_copy(m).double()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gold = ref(ids)
        scale = gold.abs().max().item()
        assert _err(m(ids), gold) <= 2 * _err(plain(ids), gold) + 1e-6 * scale
    assert torch.equal(generate(m, ids, 12), generate(plain, ids, 12))


def test_llama_layout_logits():
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, tie_word_embeddings=True)
    m = Llama(c).eval()
    assert _column_major(m.layers[0].gate_up.weight) and _column_major(m.embed.weight)
    assert m.layers[0].down.weight.is_contiguous()
    plain, ref = _row_major_copy(m), _row_major_copy(m).double()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gold = ref(ids)
        assert _err(m(ids), gold) <= 2 * _err(plain(ids), gold) + 1e-6 * gold.abs().max().item()


def test_layout_trains():
    """Gradients reach column-major parameters and an optimizer step keeps their layout."""
    torch.manual_seed(0)
    m = GPT2(GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=1, n_head=2, dropout=0.0,
                        attn_dropout=0.0))
    plain = _row_major_copy(m)
    ids = torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(3))
    for model in (m, plain):
        torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 31), ids[:, 1:].reshape(-1)).backward()
    w, wp = m.blocks[0].attn.qkv_proj.weight, plain.blocks[0].attn.qkv_proj.weight
    assert _err(w.grad, wp.grad) <= 1e-5 * wp.grad.abs().max().item()
    assert _err(m.wte.weight.grad, plain.wte.weight.grad) <= 1e-5 * plain.wte.weight.grad.abs().max().item()
    torch.optim.AdamW(m.parameters(), lr=1e-3).step()
    assert _column_major(w) and torch.isfinite(w).all()


def test_stream_layout_is_idempotent_and_keeps_values():
    lin = torch.nn.Linear(4, 12)
    before = lin.weight.detach().clone()
    stream_layout_(stream_layout_(lin))
    assert _column_major(lin.weight) and torch.equal(lin.weight, before) and lin.weight.requires_grad


def _tiny_bert():
    torch.manual_seed(0)
    return Bert(BertConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                           max_position=64)).eval()


def test_bert_skip_padding_matches_padded_rows():
    m = _tiny_bert()
    ref = _row_major_copy(m).double()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (4, 23), generator=g)
    tt = torch.randint(0, 2, (4, 23), generator=g)
    am = torch.ones(4, 23, dtype=torch.int64)
    am[1, 15:] = 0
    am[2, 3:] = 0
    am[3, :5] = 0  # left padding too
    real = am.bool()
    with torch.no_grad():
        gold = ref.encode(ids, am, tt)[real]
        plain = m.encode(ids, am, tt)
        packed = m.encode(ids, am, tt, skip_padding=True)
        assert packed.shape == plain.shape
        assert torch.equal(packed[~real], torch.zeros_like(packed[~real]))  # padding: not computed, zeros
        assert _err(packed[real], gold) <= 2 * _err(plain[real], gold) + 1e-6 * gold.abs().max().item()
        # nothing padded: the plain path, bit for bit
        assert torch.equal(m.encode(ids, torch.ones_like(am), tt, skip_padding=True), m.encode(ids, None, tt))
        # sentence embeddings read real rows only: the packed path gives the padded path's vectors
        sent = sentence_embeddings(m, ids, am)
        plain_sent = torch.nn.functional.normalize(mean_pool(m.encode(ids, am), am), dim=-1)  # token types 0
        assert _err(sent, plain_sent) <= 1e-5
