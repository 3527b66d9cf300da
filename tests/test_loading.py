"""selfattn.models loading: weight formats, strict key checking, registry, tokenizer, minilm_path."""
import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import selfattn.models as M
from selfattn.models.gpt2 import GPT2, GPT2Config

HF = {"model_type": "gpt2", "vocab_size": 50, "n_positions": 16, "n_embd": 16, "n_layer": 2, "n_head": 2}


def _hf_state(seed=0):
    """A GPT-2 checkpoint in Hugging Face's names and Conv1D (in, out) layout."""
    g = torch.Generator().manual_seed(seed)
    E, sd = 16, {}
    sd["transformer.wte.weight"] = torch.randn(50, E, generator=g)
    sd["transformer.wpe.weight"] = torch.randn(16, E, generator=g)
    for i in range(2):
        h = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            sd[h + ln + ".weight"], sd[h + ln + ".bias"] = torch.rand(E, generator=g) + 0.5, torch.randn(E, generator=g)
        for name, (i_, o_) in (("attn.c_attn", (E, 3 * E)), ("attn.c_proj", (E, E)), ("mlp.c_fc", (E, 4 * E)),
                               ("mlp.c_proj", (4 * E, E))):
            sd[h + name + ".weight"] = torch.randn(i_, o_, generator=g) * 0.2
            sd[h + name + ".bias"] = torch.randn(o_, generator=g) * 0.1
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = torch.ones(E), torch.zeros(E)
    return sd


def _write(path, state, config=HF, fmt="safetensors"):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(state, str(path / "model.safetensors"))
    elif fmt == "sharded":
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for fname, ks in shards.items():
            save_file({k: state[k] for k in ks}, str(path / fname))
        index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    elif fmt == "bin":
        torch.save(state, str(path / "pytorch_model.bin"))
    return path


def test_formats_load_identically(tmp_path):
    sd = _hf_state()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    outs = []
    for fmt in ("safetensors", "sharded", "bin"):
        model = M.load(_write(tmp_path / fmt, sd, fmt=fmt))
        assert isinstance(model, GPT2) and not model.training
        with torch.no_grad():
            outs.append(model(ids))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    # the Conv1D transpose happened: c_attn (in, out) became Linear (out, in)
    torch.testing.assert_close(model.blocks[0].attn.qkv_proj.weight, sd["transformer.h.0.attn.c_attn.weight"].t())


def test_dtype_cast(tmp_path):
    model = M.load(_write(tmp_path / "m", _hf_state()), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    with pytest.raises(TypeError, match="dtype"):
        M.load(tmp_path / "m", dtype=torch.int32)


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path):
    sd = _hf_state()
    del sd["transformer.h.1.mlp.c_fc.bias"]
    sd["transformer.h.0.attn.rotary.inv_freq"] = torch.zeros(4)
    sd["transformer.wpe.weight"] = torch.zeros(17, 16)
    with pytest.raises(ValueError) as e:
        M.load(_write(tmp_path / "bad", sd))
    msg = str(e.value)
    assert "missing keys (1): blocks.1.mlp_in.bias" in msg
    assert "unexpected keys (1): h.0.attn.rotary.inv_freq" in msg
    assert "wpe.weight (17, 16) vs expected (16, 16)" in msg


def test_load_checked_direct():
    model = GPT2(GPT2Config(vocab_size=10, n_positions=4, n_embd=8, n_layer=1, n_head=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.pop("wte.weight")
    with pytest.raises(ValueError, match=r"missing keys \(1\): wte.weight"):
        M.load_checked(model, state)


def test_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        M.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        M.load(tmp_path / "empty")
    d = _write(tmp_path / "unknown", _hf_state(), config=dict(HF, model_type="mamba"))
    with pytest.raises(ValueError, match="'mamba'"):
        M.load(d)
    (d / "config.json").write_text(json.dumps(HF))
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        M.load(d)
    d2 = _write(tmp_path / "shards", _hf_state(), fmt="sharded")
    (d2 / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        M.load(d2)


def test_register_validation():
    with pytest.raises(TypeError, match="model_cls"):
        M.register("x-test", GPT2Config.from_hf, None, lambda s, c: s)
    assert "bert" in M.families() and "gpt2" in M.families()


def test_tokenizer_pads_to_longest_and_truncates(tmp_path):
    path = M.minilm_path()
    tok = M.load_tokenizer(path)
    assert tok.max_length == 256  # sentence_bert_config.json, not tokenizer.json's fixed 128 padding
    b = tok(["hello world", "a somewhat longer sentence than the first"])
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[1] < 128
    assert b["attention_mask"][0].sum() < b["attention_mask"][1].sum()
    assert tok.decode(b["input_ids"][0]) == "hello world"
    short = M.load_tokenizer(path, max_length=4)
    assert short(["one two three four five six"])["input_ids"].shape == (1, 4)
    d = tmp_path / "tok"
    d.mkdir()
    with pytest.raises(ValueError, match="tokenizer.json"):
        M.load_tokenizer(d)
    shutil.copy(path / "tokenizer.json", d / "tokenizer.json")
    assert M.load_tokenizer(d)("hi")["input_ids"].shape[0] == 1
