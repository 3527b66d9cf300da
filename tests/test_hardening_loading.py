"""Loading untrusted model directories (issue 11): names read from files stay inside the directory, every file is
read with a bound, config.json is checked field by field and against the weights before anything is allocated,
and no tensor is silently cast or silently chosen. Each class of problem is tried on every family it concerns.

Checkpoints are tiny transformers models saved with ``save_pretrained`` (real config.json layouts of each family),
or the GPT-2 state of test_loading.py.
"""
from __future__ import annotations

import json
import os
import time

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

import selfattn.models as M
from selfattn.models import loading as L
from test_loading import HF, _hf_state, _write

# -- tiny checkpoints of every family (real config.json layouts) ------------------------------------------------
_LAYERS = {"bert": "num_hidden_layers", "gpt2": "n_layer", "llama": "num_hidden_layers", "t5": "num_layers",
           "vit": "num_hidden_layers"}
_HEADS = {"bert": "num_attention_heads", "gpt2": "n_head", "llama": "num_attention_heads", "t5": "num_heads",
          "vit": "num_attention_heads"}
_HIDDEN = {"bert": "hidden_size", "gpt2": "n_embd", "llama": "hidden_size", "t5": "d_model", "vit": "hidden_size"}
_VOCAB = {"bert": "vocab_size", "gpt2": "vocab_size", "llama": "vocab_size", "t5": "vocab_size"}
FAMILIES = sorted(_LAYERS)


def _tiny(family):
    torch.manual_seed(0)
    if family == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
            max_position_embeddings=32))
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=16,
                                                                     n_layer=2, n_head=2))
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32))
    if family == "t5":
        return transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=40, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=4))
    return transformers.ViTModel(transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, image_size=8,
        patch_size=4))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    out = {}
    for fam in FAMILIES:
        _tiny(fam).eval().save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def _copy(src, dst, edit=None, config=None):
    """A copy of a saved model directory with config.json edited (edit(cfg) mutates it) or replaced."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    if edit is not None:
        edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg if config is None else config))
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_every_family_still_loads(saved):
    for fam in FAMILIES:
        model = M.load(saved[fam])
        assert not model.training


# -- 1. sharded checkpoint indexes -------------------------------------------------------------------------------
def _sharded(path, state, fmt="safetensors", names=None, index_doc=None):
    """A two-shard checkpoint; names: the shard file names the index gives (default the real ones)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(HF))
    keys = sorted(state)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    files = [f"model-0000{i}-of-00002.{ext}" for i in (1, 2)]
    for fname, ks in zip(files, (keys[::2], keys[1::2])):
        part = {k: state[k] for k in ks}
        save_file(part, str(path / fname)) if fmt == "safetensors" else torch.save(part, str(path / fname))
    names = names or files
    wm = {k: names[0] for k in keys[::2]} | {k: names[1] for k in keys[1::2]}
    index = f"model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (path / index).write_text(json.dumps({"metadata": {}, "weight_map": wm} if index_doc is None else index_doc))
    return path, files


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_index_entries_must_stay_inside_the_model_directory(tmp_path, fmt):
    sd = _hf_state()
    outside = tmp_path / "outside"
    outside.mkdir()
    ext = "safetensors" if fmt == "safetensors" else "bin"
    secret = outside / f"secret.{ext}"
    save_file({"x": torch.zeros(1)}, str(secret)) if fmt == "safetensors" else torch.save({"x": torch.zeros(1)},
                                                                                          str(secret))
    for i, bad in enumerate([f"../outside/secret.{ext}", str(secret), f"sub/../../outside/secret.{ext}"]):
        d, files = _sharded(tmp_path / f"dotdot{i}", sd, fmt, names=[f"model-00001-of-00002.{ext}", bad])
        with pytest.raises(ValueError, match=r"index\.json.*weight_map.*" + ("absolute" if os.path.isabs(bad)
                                                                             else "outside the model directory")):
            M.load(d)
    # a symlink inside the directory that points outside: resolved, refused
    d, files = _sharded(tmp_path / "link", sd, fmt)
    (d / "evil").symlink_to(secret)
    wm = json.loads((d / next(d.glob("*.index.json")).name).read_text())
    wm["weight_map"] = {k: ("evil" if v == files[1] else v) for k, v in wm["weight_map"].items()}
    next(d.glob("*.index.json")).write_text(json.dumps(wm))
    with pytest.raises(ValueError, match=r"'evil' resolves to .*outside the model directory"):
        M.load(d)
    with pytest.raises(ValueError, match="outside the model directory"):
        M.read_state_dict(d)


def test_index_entries_inside_the_directory_load(tmp_path):
    sd = _hf_state()
    ref = M.load(_write(tmp_path / "ref", sd))
    # a shard in a subfolder, and one reached through a symlink that stays inside
    d, files = _sharded(tmp_path / "sub", sd)
    (d / "shards").mkdir()
    os.replace(d / files[0], d / "shards" / files[0])
    (d / "alias.safetensors").symlink_to(d / files[1])
    _sharded(d, sd, names=[f"shards/{files[0]}", "alias.safetensors"])
    (d / files[0]).unlink()
    assert torch.equal(M.load(d).wte.weight, ref.wte.weight)


def test_hub_cache_snapshot_symlinks_into_blobs_load(tmp_path):
    # models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>: the layout huggingface_hub writes
    sd = _hf_state()
    src, files = _sharded(tmp_path / "src", sd)
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for i, f in enumerate(src.iterdir()):
        os.replace(f, repo / "blobs" / f"hash{i}")
        (snap / f.name).symlink_to(f"../../blobs/hash{i}")
    assert M.load(snap).config.n_layer == 2


@pytest.mark.parametrize("doc, match", [
    ([1, 2], "expected a JSON object, got a list"),
    ({"metadata": {}}, "no 'weight_map' field"),
    ({"weight_map": ["a", "b"]}, "'weight_map' must be a non-empty object.*got a list"),
    ({"weight_map": {}}, "'weight_map' must be a non-empty object"),
    ({"weight_map": {"transformer.wte.weight": 3}},
     r"values must be shard file names.*'transformer.wte.weight': an int"),
    ({"weight_map": {"transformer.wte.weight": ["x"]}}, "values must be shard file names"),
    ({"weight_map": {"transformer.wte.weight": ""}}, "expected a file name"),
])
def test_index_of_the_wrong_shape_names_file_and_field(tmp_path, doc, match):
    d, _ = _sharded(tmp_path / "m", _hf_state(), index_doc=doc)
    with pytest.raises(ValueError, match="model.safetensors.index.json.*" + match):
        M.load(d)


def test_index_file_size_bounded_and_not_json(tmp_path, monkeypatch):
    d, _ = _sharded(tmp_path / "m", _hf_state())
    monkeypatch.setattr(L, "INDEX_MAX_BYTES", 100)
    with pytest.raises(ValueError, match=r"model.safetensors.index.json.*bytes.*100"):
        M.load(d)
    monkeypatch.undo()
    (d / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json.*not valid JSON"):
        M.load(d)
    (d / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)  # recursion, not a crash
    with pytest.raises(ValueError, match="not valid JSON|expected a JSON object"):
        M.load(d)


def test_index_naming_a_fifo_or_the_wrong_shard(tmp_path):
    d, files = _sharded(tmp_path / "m", _hf_state())
    os.mkfifo(d / "pipe.safetensors")  # opening it would block forever
    _sharded(d, _hf_state(), names=[files[0], "pipe.safetensors"])
    with pytest.raises(ValueError, match="not a regular file"):
        M.load(d)
    d2, files = _sharded(tmp_path / "m2", _hf_state())
    idx = json.loads((d2 / "model.safetensors.index.json").read_text())
    wm = idx["weight_map"]
    wm["transformer.wte.weight"] = files[1] if wm["transformer.wte.weight"] == files[0] else files[0]
    (d2 / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match=r"do not hold those tensors: 'transformer.wte.weight' -> "):
        M.load(d2)


# -- 2. config.json: checked field by field and against the weights, before allocating -------------------------
def test_absurd_layer_count_fails_fast_for_every_family(saved, tmp_path):
    for fam in FAMILIES:
        d = _copy(saved[fam], tmp_path / fam, lambda c: c.update({_LAYERS[fam]: 20_000}))
        t = time.perf_counter()
        with pytest.raises(ValueError, match=rf"config.json.*'{_LAYERS[fam]}'.*got an int 20000"):
            M.load(d)
        assert time.perf_counter() - t < 5.0, fam
        # in range, but not what the weights hold: the layer count is read off the tensor names
        d = _copy(saved[fam], tmp_path / f"{fam}3", lambda c: c.update({_LAYERS[fam]: 3}))
        with pytest.raises(ValueError, match=rf"config.json.*'{_LAYERS[fam]}': 3 layers, but the weights hold 2 "
                                             rf"\(indices 0..1\)"):
            M.load(d)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("case", ["string", "bool", "zero_heads", "negative_heads", "not_divisible", "list",
                                  "float", "absurd", "null", "missing"])
def test_config_field_type_and_range_name_file_and_field(saved, tmp_path, fam, case):
    heads, hidden = _HEADS[fam], _HIDDEN[fam]
    field, value, match = {
        "string": (hidden, "16", r"expected an int in \[1, \d+\], got a string '16'"),
        "bool": (_LAYERS[fam], True, r"expected an int in \[1, 1024\], got a bool True"),
        "zero_heads": (heads, 0, "expected an int in .*got an int 0"),
        "negative_heads": (heads, -2, "got an int -2"),
        "not_divisible": (hidden, 15, f"'{hidden}': 15 is not a multiple of {heads}"),
        "list": (hidden, [16], "got a list"),
        "float": (heads, 2.0, "got a float 2.0"),
        "absurd": (hidden, 10 ** 12, "got an int 1000000000000"),
        "null": (heads, None, "missing"),
        "missing": (heads, ..., "missing; expected an int"),
    }[case]
    if fam == "t5" and case == "not_divisible":  # T5's head dim d_kv is its own field
        field, value, match = "d_kv", 0, "'d_kv': expected an int"
    if fam == "llama" and case == "not_divisible":  # Llama may give head_dim, else hidden must divide
        field, value, match = "num_attention_heads", 3, "'num_attention_heads': 3 is not a multiple of " \
                                                        "num_key_value_heads=2"

    def edit(c):
        c.pop(field) if value is ... else c.update({field: value})
    d = _copy(saved[fam], tmp_path / "m", edit)
    with pytest.raises(ValueError) as e:
        M.load(d)
    msg = str(e.value)
    assert "config.json" in msg and str(d) in msg and f"'{field}'" in msg, msg
    assert __import__("re").search(match, msg), msg


def test_what_only_values_tell_is_decided_after_the_meta_check(tmp_path):
    # GPT-2 ties lm_head to wte when they are equal: the meta pass cannot compare values, the real pass does
    sd = _hf_state()
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    assert M.load(_write(tmp_path / "tied", sd)).lm_head is None
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    model = M.load(_write(tmp_path / "untied", sd))
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])


def test_config_lists_every_problem_and_nested_objects(saved, tmp_path):
    d = _copy(saved["llama"], tmp_path / "rope", lambda c: c.update(rope_scaling=[8.0], rope_parameters=None))
    with pytest.raises(ValueError, match=r"'rope_scaling': expected an object, got a list"):
        M.load(d)
    d = _copy(saved["llama"], tmp_path / "rope2", lambda c: c.update(
        rope_parameters={"rope_type": "llama3", "factor": "8", "rope_theta": 1e4}))
    with pytest.raises(ValueError, match=r"'rope_parameters.factor': expected a finite number.*got a string"):
        M.load(d)
    d = _copy(saved["gpt2"], tmp_path / "many", lambda c: c.update(n_head="2", vocab_size=-1, resid_pdrop=2.0))
    with pytest.raises(ValueError) as e:
        M.load(d)
    assert all(f in str(e.value) for f in ("'n_head'", "'vocab_size'", "'resid_pdrop'")), str(e.value)
    d = _copy(saved["vit"], tmp_path / "vit", lambda c: c.update(patch_size=[4, 0]))
    with pytest.raises(ValueError, match=r"'patch_size': expected an int in \[1, 65536\] or a pair"):
        M.load(d)


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "must hold a JSON object, got a list"),
    ('"bert"', "must hold a JSON object, got a string"),
    ("{", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ('{"model_type": 3}', "'model_type': expected a string, got an int 3"),
    ('{"vocab_size": 3}', "'model_type': expected a string, got nothing"),
])
def test_config_json_itself_of_the_wrong_shape(tmp_path, content, match):
    d = _write(tmp_path / "m", _hf_state())
    (d / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match="config.json.*" + match):
        M.load(d)
    if "model_type" not in match:
        with pytest.raises(ValueError, match="config.json"):
            M.read_config(d)


def test_config_json_size_bounded(tmp_path, monkeypatch):
    d = _write(tmp_path / "m", _hf_state())
    monkeypatch.setattr(L, "CONFIG_MAX_BYTES", 50)
    with pytest.raises(ValueError, match=r"config.json.*bytes, more than the 50"):
        M.load(d)
    monkeypatch.undo()
    (d / "config.json").unlink()
    os.mkfifo(d / "config.json")
    with pytest.raises(ValueError, match="config.json.*not a regular file"):
        M.load(d)


@pytest.mark.parametrize("fam", ["bert", "gpt2", "llama", "t5"])
def test_config_against_weight_shapes_before_allocating(saved, tmp_path, monkeypatch, fam):
    # a vocabulary within the sanity bound but ~1 GB of embedding: refused from the headers, on the meta device
    d = _copy(saved[fam], tmp_path / "m", lambda c: c.update({_VOCAB[fam]: 16_000_000}))
    built = []
    fam_obj = L._family(fam)

    def recording(config):
        built.append(torch.empty(0).device.type)
        return fam_obj.model_cls(config)
    monkeypatch.setitem(L._REGISTRY, fam, L.Family(fam, fam_obj.config_from_hf, recording,
                                                   fam_obj.convert_state_dict, fam_obj.buffers))
    with pytest.raises(ValueError, match=r"the weights do not fit the .* config.json describes: shape mismatches"
                                         r" \(\d+\): .*\(40, 16\) vs expected \(16000000, 16\)"):
        M.load(d)
    assert built == ["meta"]  # no real model was built
    monkeypatch.undo()


# -- 3. dtypes and duplicates ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_weights_are_refused_by_name(tmp_path, fmt, dtype):
    sd = _hf_state()
    sd["transformer.h.1.mlp.c_fc.bias"] = torch.ones(64, dtype=dtype)
    with pytest.raises(ValueError, match=r"integer/bool tensors.*\(1\): transformer.h.1.mlp.c_fc.bias in "
                                         rf".* \({str(dtype).replace('torch.', '')}\)"):
        M.load(_write(tmp_path / "m", sd, fmt=fmt))


@pytest.mark.parametrize("fmt, dtype", [(fmt, dt) for fmt in ("safetensors", "bin")
                                        for dt in (torch.float8_e4m3fn, torch.float8_e5m2)]
                         + [("bin", torch.complex64)])  # safetensors has no complex dtype
def test_float8_and_other_dtypes_are_refused_by_name(tmp_path, fmt, dtype):
    sd = {k: (v.to(dtype) if k.endswith("weight") else v) for k, v in _hf_state().items()}
    with pytest.raises(ValueError, match=r"dtype selfattn does not load.*float16, bfloat16, float32 or float64"
                                         r".*transformer.h.0.attn.c_attn.weight in \S+ \((F8_E|float8_e|complex)"):
        M.load(_write(tmp_path / "m", sd, fmt=fmt))


def test_known_integer_buffers_are_skipped(tmp_path, saved):
    sd = _hf_state()
    sd["transformer.h.0.attn.bias"] = torch.ones(1, 1, 16, 16, dtype=torch.bool).tril()  # old GPT-2 causal mask
    sd["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    sd["transformer.position_ids"] = torch.arange(16)
    assert M.load(_write(tmp_path / "gpt2", sd)).config.n_layer == 2
    # BERT's position_ids / token_type_ids buffers (int64), as old checkpoints saved them
    with safe_open(str(saved["bert"] / "model.safetensors"), "pt") as f:
        bert = {k: f.get_tensor(k) for k in f.keys()}
    bert["embeddings.position_ids"] = torch.arange(32)[None]
    bert["embeddings.token_type_ids"] = torch.zeros(1, 32, dtype=torch.int64)
    d = _copy(saved["bert"], tmp_path / "bert")
    save_file(bert, str(d / "model.safetensors"))
    M.load(d)
    # the real MiniLM (its safetensors carries an int64 position_ids)
    M.load(M.minilm_path())


def test_load_checked_refuses_integer_values():
    from selfattn.models.gpt2 import GPT2, GPT2Config
    model = GPT2(GPT2Config(vocab_size=10, n_positions=4, n_embd=8, n_layer=1, n_head=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["wpe.weight"] = state["wpe.weight"].round().long()
    with pytest.raises(ValueError, match=r"integer/bool tensors.*wpe.weight \(int64\)"):
        M.load_checked(model, state)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_tensor_in_two_shards_names_both(tmp_path, fmt):
    sd = _hf_state()
    d, files = _sharded(tmp_path / "m", sd, fmt)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    third = f"model-00003-of-00003.{ext}"
    dup = {"transformer.wte.weight": torch.zeros(50, 16)}
    save_file(dup, str(d / third)) if fmt == "safetensors" else torch.save(dup, str(d / third))
    idx_file = next(d.glob("*.index.json"))
    idx = json.loads(idx_file.read_text())
    idx["weight_map"]["extra"] = third
    idx_file.write_text(json.dumps(idx))
    holder = idx["weight_map"]["transformer.wte.weight"]
    with pytest.raises(ValueError, match=rf"'transformer.wte.weight' is in two shards, '{holder}' and '{third}'"):
        M.load(d)


# -- broken weight files ----------------------------------------------------------------------------------------
def test_truncated_safetensors_and_refused_pickles_name_the_file(tmp_path):
    d = _write(tmp_path / "trunc", _hf_state())
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors.*not a readable safetensors file"):
        M.load(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        M.load(d)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    d = _write(tmp_path / "pickle", {"transformer.wte.weight": torch.zeros(1)}, fmt="bin")
    torch.save({"transformer.wte.weight": Evil()}, str(d / "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"pytorch_model.bin.*cannot be loaded safely"):
        M.load(d)
    torch.save({"transformer.wte.weight": [1, 2]}, str(d / "pytorch_model.bin"))
    with pytest.raises(ValueError, match="not named tensors: 'transformer.wte.weight' \\(list\\)"):
        M.load(d)
    (d / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        M.load(d)


def test_legacy_bin_format_loads(tmp_path):
    # the pre-1.6 serialization cannot be memory-mapped: read whole, same result
    sd = _hf_state()
    d = _write(tmp_path / "legacy", sd, fmt="safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, str(d / "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    assert torch.equal(M.load(d).wte.weight, sd["transformer.wte.weight"])


# -- 4. tokenizer files ------------------------------------------------------------------------------------------
def test_tokenizer_files_are_bounded_and_checked(tmp_path, monkeypatch):
    src = M.minilm_path()
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    monkeypatch.setattr(L, "TOKENIZER_MAX_BYTES", 1000)
    with pytest.raises(ValueError, match=r"tokenizer.json.*bytes, more than the 1000"):
        M.load_tokenizer(d)
    monkeypatch.undo()
    (d / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="tokenizer_config.json.*must hold a JSON object, got a list"):
        M.load_tokenizer(d)
    (d / "tokenizer_config.json").write_text('{"model_max_length": true}')  # a bool is not a length
    assert M.load_tokenizer(d).max_length is None
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match="tokenizer.json.*cannot be read"):
        M.load_tokenizer(d)
    (d / "tokenizer.json").unlink()
    os.mkfifo(d / "tokenizer.json")
    with pytest.raises(ValueError, match="tokenizer.json.*not a regular file"):
        M.load_tokenizer(d)
