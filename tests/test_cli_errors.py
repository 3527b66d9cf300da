"""`selfattn` on bad input (issue 11): every error from what the user typed or pointed at is one line on stderr,
exit status 2, no traceback — argparse's errors, the CLI's own checks, and any ValueError / TypeError / OSError
the library raises on the way (a broken model directory, a bad environment variable)."""
import json
import re

import pytest
import torch
import transformers

import selfattn.models as M
from selfattn.app import cli
from selfattn.app import plan as plan_cmd

TEXT = "The cat sat on the mat."
PLAN = ["plan", "--batch", "1", "--heads", "4", "--seq", "64", "--dim", "16"]


def _one_line_exit_2(argv, capsys, match):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("selfattn") and "error:" in lines[0], lines[0]
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


@pytest.mark.parametrize("extra, match", [
    (["--block-q", "-5"], r"--block-q: expected a positive integer, got -5"),
    (["--block-q", "0"], r"--block-q: expected a positive integer, got 0"),  # was read as "not given"
    (["--block-k", "-1"], r"--block-k: expected a positive integer, got -1"),
    (["--kv-seq", "0"], r"--kv-seq: expected a positive integer"),
    (["--dv", "-3"], r"--dv: expected a positive integer"),
    (["--kv-heads", "0"], r"--kv-heads: expected a positive integer"),
    (["--kv-heads", "3"], r"--kv-heads 3: must divide --heads 4"),
    (["--mask", "window=-3"], r"window must be ≥ 0"),
    (["--mask", "window=10**30"], r"window=W needs an integer"),
    (["--mask", "top_left"], r"top_left alone is not a mask"),
    (["--dtype", "int8"], r"invalid choice"),
    (["--seq", "abc"], r"argument --seq: invalid int value: 'abc'"),
    (["--seq", "10**30"], r"argument --seq: invalid int value"),
    (["--seq", "0"], r"--seq: expected a positive integer, got 0"),
    (["--batch", "-1"], r"--batch: expected a positive integer"),
])
def test_plan_bad_arguments(extra, match, capsys):
    _one_line_exit_2(PLAN + extra, capsys, match)


@pytest.mark.parametrize("exc", [ValueError("x: bad\nsecond line"), TypeError("x: not a tensor"),
                                 FileNotFoundError(2, "No such file or directory", "/nope"),
                                 OverflowError("int too large to convert")])
def test_library_errors_reaching_main_are_one_line(exc, capsys, monkeypatch):
    def boom(args):
        raise exc
    monkeypatch.setattr(plan_cmd, "run", boom)
    line = _one_line_exit_2(PLAN, capsys, ".")
    assert "second line" not in line


@pytest.mark.parametrize("value", ["8e9", "", "lots", "-1"])
def test_bad_environment_variable_is_one_line_or_accepted(value, capsys, monkeypatch):
    monkeypatch.setenv("SELFATTN_REFERENCE_MAX_BYTES", value)
    try:
        code = cli.main(PLAN)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert code == 0 or (code == 2 and len(err.strip().splitlines()) == 1), (code, err)


# -- explain on broken model directories ------------------------------------------------------------------------
@pytest.fixture
def minilm_like(tmp_path):
    """A model directory sharing MiniLM's weights (symlinked) and tokenizer, with a config of our choosing."""
    src = M.minilm_path()

    def make(name, edit=None, config=None):
        d = tmp_path / name
        d.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        if edit is not None:
            edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg) if config is None else config)
        (d / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
        (d / "model.safetensors").symlink_to(src / "model.safetensors")
        return d
    return make


def _explain(d, tmp_path, text=TEXT):
    return ["explain", text, "--model", str(d), "--out", str(tmp_path / "out.png")]


def test_explain_broken_config(minilm_like, tmp_path, capsys):
    d = minilm_like("list", config="[1, 2]")
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"not a loadable model \(config.json.*JSON object, got a list")
    d = minilm_like("heads", lambda c: c.update(num_attention_heads=0))
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"config.json.*'num_attention_heads': expected an int")
    d = minilm_like("layers", lambda c: c.update(num_hidden_layers=20000))
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"'num_hidden_layers'")
    d = minilm_like("str", lambda c: c.update(hidden_size="384"))
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"'hidden_size': expected an int .* got a string '384'")
    d = minilm_like("notjson", config="{")
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"config.json.*not valid JSON")
    assert not (tmp_path / "out.png").exists()


def test_explain_broken_weights(minilm_like, tmp_path, capsys):
    d = minilm_like("trunc")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").write_bytes((M.minilm_path() / "model.safetensors").read_bytes()[:5000])
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"not a readable safetensors file")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    d = minilm_like("pickle")
    (d / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": Evil()}, str(d / "pytorch_model.bin"))
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"pytorch_model.bin.*cannot be loaded safely")
    d = minilm_like("escape")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../../etc/passwd"}}))
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"outside the model directory")


def test_explain_broken_tokenizer_text_and_path(minilm_like, tmp_path, capsys):
    d = minilm_like("tok")
    (d / "tokenizer.json").write_text('{"model": []}')
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"tokenizer.json cannot be read")
    _one_line_exit_2(_explain(tmp_path / "nope", tmp_path), capsys, r"no such file or directory")
    # an undecodable command-line byte arrives as a lone surrogate (os.fsdecode)
    _one_line_exit_2(_explain("minilm", tmp_path, text="caf\udcc3 au lait"), capsys, r"text: not valid UTF-8")


def test_explain_tokenizer_ids_beyond_the_vocabulary(tmp_path, capsys):
    torch.manual_seed(0)
    d = tmp_path / "tiny"
    transformers.BertModel(transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=24)).save_pretrained(d)
    (d / "tokenizer.json").write_bytes((M.minilm_path() / "tokenizer.json").read_bytes())  # 30522 ids
    capsys.readouterr()  # save_pretrained's progress bar
    _one_line_exit_2(_explain(d, tmp_path), capsys, r"token id \d+, but the model's vocabulary has 40 ids")


def test_explain_writes_every_output_or_none(tmp_path, capsys, monkeypatch):
    import selfattn.inspect.render as render

    def broken(*a, **k):  # e.g. matplotlib refusing a title it parses as math
        raise ValueError("title: unknown symbol \\frac\nmore detail")
    monkeypatch.setattr(render, "head_grid_png", broken)
    html, png = tmp_path / "a.html", tmp_path / "a.png"
    _one_line_exit_2(["explain", "$\\frac$ and $5 and $10", "--out", str(html), "--out", str(png)], capsys,
                     r"title: unknown symbol")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no HTML without its PNG, no temporary file
