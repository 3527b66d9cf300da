"""The `selfattn` command: every subcommand, --help everywhere, and every user error as one line + exit 2 with no
file left behind."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import selfattn
import selfattn.masks

from selfattn.app import bench as bench_cmd
from selfattn.app import cli

TEXT = "The cat sat on the mat."


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _user_error(argv, capsys, match):
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("cmd", [[], ["explain"], ["bench"], ["plan"]])
def test_help_everywhere(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: selfattn" in capsys.readouterr().out


def test_explain_minilm_writes_html_and_png(tmp_path, capsys):
    html, png = tmp_path / "a.html", tmp_path / "a.png"
    code, out, err = _run(["explain", TEXT, "--out", str(html), "--out", str(png)], capsys)
    assert code == 0, err
    assert "all-MiniLM-L6-v2" in out and "[CLS] the cat sat on the mat . [SEP]" in out
    for layer in range(6):  # a summary line per layer: focused head, strongest link, what each word attends to
        assert f"layer {layer}: most focused head" in out
    assert "cat→" in out and "strongest links head" in out
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["a.html", "a.png"]


def test_explain_single_head_png(tmp_path, capsys):
    png = tmp_path / "h.png"
    code, out, err = _run(["explain", TEXT, "--layer", "1", "--head", "3", "--out", str(png)], capsys)
    assert code == 0, err
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out


def test_explain_user_errors(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    _user_error(["explain", "   ", "--out", out], capsys, "text: empty")
    _user_error(["explain", "word " * 600, "--out", out], capsys, "positions")
    _user_error(["explain", TEXT, "--model", str(tmp_path / "nope"), "--out", out], capsys,
                "no such file or directory")
    not_model = tmp_path / "notes.txt"
    not_model.write_text("hello")
    _user_error(["explain", TEXT, "--model", str(not_model), "--out", out], capsys, "not a model")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    (broken / "tokenizer.json").write_text("{}")
    _user_error(["explain", TEXT, "--model", str(broken), "--out", out], capsys, "not a loadable model")
    _user_error(["explain", TEXT, "--out", str(tmp_path / "missing_dir" / "x.png")], capsys, "cannot write there")
    (tmp_path / "dir.png").mkdir()
    _user_error(["explain", TEXT, "--out", str(tmp_path / "dir.png")], capsys, "cannot write there")
    _user_error(["explain", TEXT, "--out", str(tmp_path / "x.txt")], capsys, ".html or .png")
    _user_error(["explain", TEXT, "--layer", "6", "--out", out], capsys, "--layer 6")
    _user_error(["explain", TEXT, "--head", "-1", "--out", out], capsys, "--head -1")
    # nothing written, no temporary files left
    assert sorted(os.listdir(tmp_path)) == ["broken", "dir.png", "notes.txt"]
    assert os.listdir(tmp_path / "dir.png") == []


def test_plan_prints_kernel_tiles_and_costs(capsys):
    code, out, err = _run(["plan", "--batch", "1", "--heads", "32", "--kv-heads", "8", "--seq", "32768",
                           "--dim", "128", "--mask", "causal,window=4096", "--block-q", "256", "--block-k", "512"], capsys)
    assert code == 0, err
    auto = selfattn.plan(1, 32, 32768, 32768, 128, Hkv=8, mask=selfattn.masks.sliding_window(4096, 0),
                         block_q=256, block_k=512).kernel
    assert f"kernel: {auto} — automatic" in out
    assert "  tiled      can serve" in out and "  decode     no: " in out  # every kernel's reason
    assert "computed 1080" in out and "skipped 7112" in out  # 4097-key window over 256×512 tiles
    for row in ("FLOPs", "bytes moved", "peak extra memory"):
        assert row in out
    assert "reference: refused at this size" in out
    code, out, _ = _run(["plan", "--batch", "2", "--heads", "4", "--seq", "64", "--dim", "32"], capsys)
    small = selfattn.plan(2, 4, 64, 64, 32).kernel
    assert code == 0 and f"kernel: {small} — automatic" in out


@pytest.mark.parametrize("argv,match", [
    (["plan", "--batch", "1", "--heads", "8", "--seq", "100"], "--dim"),
    (["plan", "--batch", "1", "--heads", "8", "--kv-heads", "3", "--seq", "100", "--dim", "4"], "--kv-heads 3"),
    (["plan", "--batch", "1", "--heads", "8", "--seq", "100", "--dim", "4", "--mask", "diagonal"], "unknown part"),
    (["plan", "--batch", "1", "--heads", "8", "--seq", "100", "--dim", "4", "--mask", "window=x"], "integer"),
    (["plan", "--batch", "0", "--heads", "8", "--seq", "100", "--dim", "4"], "--batch"),
    (["plan", "--batch", "1", "--heads", "8", "--seq", "ten", "--dim", "4"], "--seq"),
])
def test_plan_user_errors(argv, match, capsys):
    try:
        _user_error(argv, capsys, match)
    except SystemExit as e:  # argparse's own errors exit from inside parse_args
        assert e.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and match in err


def test_bench_table_progress_and_plot(tmp_path, capsys, monkeypatch):
    """The CLI's side of `bench` (progress, table, memory sweep, plot) on canned timings; the measurements
    themselves are selfattn.app.measure's job (benchmarks/ and its own tests)."""
    from selfattn.app import measure as real
    calls = []

    def run_core_bench(quick, progress, sizes, B, H, D, memory, paths):
        calls.append((quick, tuple(sizes), memory, tuple(paths)))
        rows = []
        plan = [(n, m, mode) for n in sizes for mode in ("fwd", "fwd+bwd") for m in ("none", "causal")]
        for i, (n, mask, mode) in enumerate(plan):
            progress(i, len(plan), f"N={n}")
            for p in paths:
                rows.append({"impl": p, "path": p, "mode": mode, "mask": mask, "N": n, "ms": n / 100,
                             "gflops": 1.0, "tokens_per_s": 1e5 / n, "vs_sdpa": 1.0, "peak_mib": None})
        return rows

    def peak_memory(path, B, H, N, D, causal, backward):
        return {"extra": N * (N if path == "plain" else 4) * 4, "hidden": 0}

    fake = types.SimpleNamespace(run_core_bench=run_core_bench, peak_memory=peak_memory,
                                 format_rows=real.format_rows)
    monkeypatch.setattr("selfattn.app.measure", fake, raising=False)
    monkeypatch.setitem(sys.modules, "selfattn.app.measure", fake)
    png = tmp_path / "b.png"
    code, out, err = _run(["bench", "--quick", "--out", str(png)], capsys)
    assert code == 0, err
    from selfattn.kernels import native
    want = tuple(p for p in bench_cmd.BENCH_PATHS if p != "native" or native.available())
    assert calls == [(True, bench_cmd.QUICK_SIZES, False, want)]
    assert "vs SDPA" in out and "peak extra MiB" in out and "plain" in out
    assert "4.0" in out  # plain at N=1024: 1024·1024·4 bytes = 4.0 MiB, from the memory sweep
    assert "bench" in err and "100%" in err  # the tqdm progress bar goes to stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    _user_error(["bench", "--out", str(tmp_path / "b.txt")], capsys, ".png")


def test_installed_entry_point():
    """`selfattn` is an installed console script; a user error through it is one line, exit 2, no traceback."""
    exe = Path(sys.executable).parent / "selfattn"
    assert exe.exists(), "the selfattn entry point is not installed (pip install -e .)"
    res = subprocess.run([str(exe), "explain", ""], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip() == ("selfattn explain: error: text: empty; give a sentence to explain, e.g. "
                                  "selfattn explain \"The cat sat on the mat.\"")


def test_explain_another_family_from_a_directory(tmp_path, capsys):
    """--model PATH with a (tiny, random) GPT-2 checkpoint: causal self-attention, its own position limit."""
    import shutil

    import torch
    import transformers

    from selfattn import models
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=30522, n_positions=12, n_embd=32, n_layer=2, n_head=4, bos_token_id=101,
                                  eos_token_id=102)
    path = tmp_path / "gpt2-tiny"
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    shutil.copy(models.minilm_path() / "tokenizer.json", path / "tokenizer.json")
    png = tmp_path / "g.png"
    code, out, err = _run(["explain", "the cat sat", "--model", str(path), "--out", str(png)], capsys)
    assert code == 0, err
    assert "(gpt2), 2 layers × 4 heads, 5 tokens" in out and png.exists()
    _user_error(["explain", "one two three four five six seven eight nine ten eleven", "--model", str(path),
                 "--out", str(tmp_path / "h.png")], capsys, "13 tokens, but gpt2-tiny has 12 positions")


def test_demo_explain_step(tmp_path, capsys):
    """The README's first command runs `python -m selfattn.app.demo`: explain (here) then bench --quick."""
    from selfattn.app import demo
    code = demo.main(["--out-dir", str(tmp_path / "out"), "--skip-bench"])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["attention.html", "attention.png"]
    assert "$ selfattn explain" in out and "Open " in out


def test_plan_ring_prints_steps_per_rank(capsys):
    code, out, err = _run(["plan", "--batch", "1", "--heads", "8", "--seq", "4096", "--dim", "64", "--mask",
                           "causal,window=256", "--ring", "4", "--layout", "contiguous"], capsys)
    assert code == 0, err
    assert "context parallelism over 4 ranks, layout contiguous" in out and "9 of 16 steps skipped" in out
    code, out, err = _run(["plan", "--batch", "1", "--heads", "8", "--seq", "4095", "--dim", "64", "--ring", "4"],
                          capsys)
    assert code == 2 and out == "" and "--ring" in err and len(err.strip().splitlines()) == 1
