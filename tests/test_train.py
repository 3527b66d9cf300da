"""selfattn.train: every task generator, text data with a held-out split, exact resume, the outputs, a toy model
whose induction head the detectors find after training (and not at initialization), and the CLI's errors."""
import json
import os

import pytest
import torch

from selfattn.inspect.heads import DETECTORS
from selfattn.train import GPT, GPTConfig, TrainConfig, from_checkpoint, load_checkpoint, make_task, resume, train
from selfattn.train.tasks import IGNORE

IND = DETECTORS.index("induction")


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_copy_reverse_sort():
    for name, f in (("copy", lambda a: a), ("reverse", lambda a: a.flip(1)), ("sort", lambda a: a.sort(1).values)):
        t = make_task(name, 12, n_symbols=5)
        x, y = t.batch(7, _g())
        assert x.shape == y.shape == (7, 12) and t.vocab_size == 6 and t.seq_len == 12
        a = x[:, :6]
        assert (x[:, 6] == 5).all() and (a < 5).all()  # SEP, then the answer
        assert (y[:, :6] == IGNORE).all() and torch.equal(y[:, 6:], f(a))
        x2, y2 = t.batch(7, _g())
        assert torch.equal(x, x2) and torch.equal(y, y2)  # the generator alone decides the batch


def test_recall():
    t = make_task("recall", 16, n_symbols=8)
    x, y = t.batch(5, _g())
    P = 4
    assert x.shape == (5, 4 * P - 1) and t.vocab_size == 16
    for b in range(5):
        s = torch.cat([x[b], y[b, -1:]])
        table = {int(s[2 * i]): int(s[2 * i + 1]) for i in range(P)}
        assert len(table) == P and all(k < 8 <= v < 16 for k, v in table.items())
        scored = (y[b] != IGNORE).nonzero().flatten().tolist()
        assert scored == [2 * P + 2 * i for i in range(P)]
        for i in scored:
            assert int(y[b, i]) == table[int(x[b, i])]  # the value of the queried key
        assert sorted(int(s[2 * P + 2 * i]) for i in range(P)) == sorted(table)


def test_repeat():
    t = make_task("repeat", 20, n_symbols=9, period=6)
    x, y = t.batch(64, _g())
    assert x.shape == (64, 20) and t.vocab_size == 9 and (x < 9).all()
    s = torch.cat([x, y[:, -1:]], 1)  # (B, 21): the whole sequence (the last target is never ignored)
    periods = []
    for b in range(64):
        p = next(p for p in range(3, 7) if torch.equal(s[b, p:], s[b, :21 - p]))  # the row's period
        periods.append(p)
        assert (y[b, :p - 1] == IGNORE).all() and torch.equal(y[b, p - 1:], s[b, p:])
    assert set(periods) == {3, 4, 5, 6}  # drawn per row from [period/2, period]: no fixed offset finds the copy
    with pytest.raises(ValueError, match="period"):
        make_task("repeat", 8, period=8)


def test_text_bytes_and_tokenizer(tmp_path):
    from selfattn import models
    f = tmp_path / "t.txt"
    text = "the cat sat on the mat. " * 40
    f.write_text(text)
    t = make_task(str(f), 16, val_fraction=0.25)
    assert t.vocab_size == 256 and len(t.train_ids) + len(t.val_ids) == len(text)
    assert len(t.val_ids) == len(text) // 4 and bytes(t.val_ids.tolist()) == text.encode()[-len(t.val_ids):]
    x, y = t.batch(4, _g(), split="val")
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    tok = models.minilm_path() / "tokenizer.json"
    t2 = make_task(str(f), 8, tokenizer=str(tok))
    assert t2.vocab_size == 30522 and len(t2.train_ids) + len(t2.val_ids) == 7 * 40
    with pytest.raises(FileNotFoundError):
        make_task(str(tmp_path / "missing.txt"), 8)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        make_task(str(f), 500)
    with pytest.raises(ValueError, match="tokenizer"):
        make_task(str(f), 8, tokenizer=str(f))
    with pytest.raises(ValueError, match="tokenizer"):
        make_task("copy", 8, tokenizer=str(tok))


TINY = dict(task="sort", seq_len=16, n_symbols=6, n_layer=2, n_head=2, d_model=16, steps=8, batch_size=4,
            warmup=2, eval_every=3, eval_batches=1)


def test_resume_reproduces_losses_exactly(tmp_path):
    c = TrainConfig(**TINY, snapshot_every=4)
    full = train(c, progress=False)  # in memory: no files
    part = train(c, tmp_path / "part", stop_at=4, progress=False)
    assert part.step == 4 and part.losses == full.losses[:4]
    cfg, tensors, step, losses, evals = load_checkpoint(tmp_path / "part")
    assert cfg == c and step == 4 and losses == full.losses[:4] and "rng.data" in tensors
    assert any(k.startswith("optim.") and k.endswith(".exp_avg_sq") for k in tensors)
    rest = resume(tmp_path / "part", progress=False)
    assert rest.step == 8 and rest.losses == full.losses  # bit-exact, not approximately
    assert rest.evals == full.evals and [s.step for s in rest.snapshots] == [0, 4, 8]
    a = dict(full.model.state_dict())
    for k, v in rest.model.state_dict().items():
        assert torch.equal(v, a[k]), k
    for name in ("checkpoint.safetensors", "loss.png", "attention.png", "training.html", "snapshots.json"):
        assert (tmp_path / "part" / name).is_file(), name
    assert not [n for n in os.listdir(tmp_path / "part") if n.endswith(".tmp")]
    doc = json.loads((tmp_path / "part" / "snapshots.json").read_text())
    assert [s["step"] for s in doc["snapshots"]] == [0, 4, 8] and doc["detectors"] == list(DETECTORS)
    assert [s.scores for s in rest.snapshots] == [s.scores for s in full.snapshots]
    model, cfg2 = from_checkpoint(tmp_path / "part")
    ids = torch.randint(0, 6, (2, 16))
    assert torch.equal(model(ids), full.model.eval()(ids))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="not a training checkpoint"):
        resume(tmp_path)
    (tmp_path / "checkpoint.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        resume(tmp_path)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "checkpoint.safetensors"))
    with pytest.raises(ValueError, match="not a selfattn training checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(TrainConfig(**TINY), tmp_path, progress=False)
    with pytest.raises(FileNotFoundError):
        resume(tmp_path / "nope")
    for bad in (dict(steps=0), dict(lr=0.0), dict(batch_size=-1), dict(lr=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**{**TINY, **bad})
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    for bad in (0.0, -0.1, float("inf"), True):
        with pytest.raises(ValueError, match="init_std"):
            GPTConfig(init_std=bad)
    with pytest.raises(ValueError, match="ids"):
        GPT(GPTConfig(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.int64))


def test_init_std_sets_the_linear_weights_only():
    """init_std scales every linear layer's initial weights (not the embeddings, not GPT-2's scaled residual
    projections); the default 0.02 draws the same weights as before the option existed."""
    def build(**kw):
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=64, d_model=64, n_head=4, mlp=True, **kw))
    a, b = build(), build(init_std=0.1)
    qkv_a, qkv_b = a.blocks[0].attn.qkv_proj.weight, b.blocks[0].attn.qkv_proj.weight
    assert 0.018 < float(qkv_a.detach().std()) < 0.022 and 0.09 < float(qkv_b.detach().std()) < 0.11
    assert torch.allclose(qkv_b, 5 * qkv_a)  # same draws, scaled: the option changes nothing else
    assert torch.equal(a.tok_emb.weight, b.tok_emb.weight)
    assert torch.equal(a.blocks[1].attn.out_proj.weight, b.blocks[1].attn.out_proj.weight)
    assert torch.allclose(b.blocks[0].mlp[0].weight, 5 * a.blocks[0].mlp[0].weight)


def test_model_variants_and_sdpa_baseline():
    torch.manual_seed(0)
    for kw in (dict(positions="learned"), dict(n_kv_head=1), dict(window=5), dict(mlp=False)):
        m = GPT(GPTConfig(vocab_size=11, n_layer=2, n_head=4, d_model=32, max_seq_len=24, **kw)).double()
        ids = torch.randint(0, 11, (2, 24))
        ours = m(ids)
        ref = m.set_attention("sdpa")(ids)
        assert ours.shape == (2, 24, 11) and torch.allclose(ours, ref, atol=1e-10), kw
        ours.sum().backward()  # gradients flow through the kernel's backward


def test_toy_model_phase_change_seen_by_the_detectors():
    """A 2-layer attention-only model on repeats of one fixed period (16): at the loss drop its layer-1 heads learn
    to read the token after the earlier copy, which the induction detector scores ~0.9 on a probe of that period
    (and ~0.06 at initialization). With one fixed period a head that looks back 15 positions does this job, so
    this is the detector seeing the mechanism form, not proof of a content-matching induction head (varying
    periods, the default, need one: the README demo, periods 4-32 with init_std=0.1, forms it in ~500 steps)."""
    c = TrainConfig(task="repeat", seq_len=32, period=16, min_period=16, n_symbols=64, n_layer=2, n_head=4,
                    d_model=64, mlp=False, steps=120, batch_size=32, lr=3e-3, warmup=10, eval_every=120, snapshot_every=120)
    run = train(c, progress=False)
    first, last = run.snapshots[0], run.snapshots[-1]
    ind0 = max(s[IND] for layer in first.scores for s in layer)
    ind1 = [s[IND] for s in last.scores[1]]
    assert ind0 < 0.2 and min(ind1) > 0.6, (ind0, ind1)  # seeds 0-2 give 0.75-0.92 for every layer-1 head
    assert max(s[IND] for s in last.scores[0]) < 0.2
    assert run.evals[-1][1] < 0.4 * run.losses[0]  # log 64 ≈ 4.2 -> ~1.3


def _cli(argv, capsys):
    from selfattn.app import cli
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(argv, capsys, match):
    try:
        code, out, err = _cli(argv, capsys)
    except SystemExit as e:  # argparse's usage errors exit from inside main
        code, (out, err) = e.code, capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, out, err)
    assert match in lines[0], lines[0]


def test_cli_train_resume_heads(tmp_path, capsys):
    run = tmp_path / "run"
    small = ["--seq-len", "16", "--symbols", "6", "--layers", "1", "--heads", "2", "--d-model", "16",
             "--batch-size", "4", "--eval-every", "2", "--quiet", "--threads", "1"]
    code, out, err = _cli(["train", "sort", "--out", str(run), "--steps", "3", "--snapshot-every", "3"] + small,
                          capsys)
    assert code == 0, err
    assert "sort: 3 steps, loss " in out and f"wrote {run / 'training.html'}" in out and "heads at step 3" in out
    code, out, err = _cli(["train", "--resume", str(run), "--steps", "5", "--quiet"], capsys)
    assert code == 0, err
    assert load_checkpoint(run)[2] == 5 and "sort: 5 steps" in out
    code, out, err = _cli(["heads", str(run), "--length", "6", "--batch", "2"], capsys)
    assert code == 0, err
    assert "1 attention layers" in out and "induction (> 0.4):" in out and " 0.1 " in out


def test_cli_errors_one_line_nothing_written(tmp_path, capsys):
    out = tmp_path / "o"
    text = tmp_path / "t.txt"
    text.write_text("abc")
    _one_line_error(["train", "--out", str(out)], capsys, "task: give a task")
    _one_line_error(["train", "repeat"], capsys, "--out")
    _one_line_error(["train", str(tmp_path / "missing.txt"), "--out", str(out)], capsys, "no such file")
    _one_line_error(["train", str(text), "--out", str(out)], capsys, "fewer than seq_len")
    _one_line_error(["train", "repeat", "--out", str(out), "--steps", "0"], capsys, "steps")
    _one_line_error(["train", "repeat", "--out", str(out), "--heads", "3", "--d-model", "16"], capsys, "d_model")
    _one_line_error(["train", "repeat", "--out", str(out), "--init-std", "0"], capsys, "init_std")
    _one_line_error(["train", "repeat", "--out", str(tmp_path / "a" / "b")], capsys, "does not exist")
    _one_line_error(["train", "--resume", str(tmp_path)], capsys, "not a training checkpoint")
    _one_line_error(["train", "--resume", str(tmp_path / "nope")], capsys, "no such file")
    _one_line_error(["train", "--resume", str(text)], capsys, "not a")
    _one_line_error(["train", "repeat", "--out", str(out), "--bogus"], capsys, "unrecognized arguments")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]  # nothing half-made
    _one_line_error(["heads", str(tmp_path / "nope")], capsys, "no such file")
    _one_line_error(["heads", str(text)], capsys, "not a model")
    _one_line_error(["heads", str(tmp_path)], capsys, "not a model")
    _one_line_error(["heads", "minilm", "--length", "0"], capsys, "--length")
    _one_line_error(["heads", "minilm", "--length", "400"], capsys, "802 tokens")


def test_data_parallel_two_processes(tmp_path):
    """procs=2: each rank trains on half of every batch and the gradients are averaged, so the losses are the
    one-process run's up to rounding (the reduction order differs), and the run resumes like any other."""
    c1 = TrainConfig(**{**TINY, "steps": 2})
    one = train(c1, progress=False)
    two = train(TrainConfig(**{**TINY, "steps": 2, "procs": 2}), tmp_path / "dp", progress=False)
    assert two.step == 2 and len(two.losses) == 2
    assert torch.allclose(torch.tensor(two.losses), torch.tensor(one.losses), rtol=1e-4), (two.losses, one.losses)
    assert load_checkpoint(tmp_path / "dp")[0].procs == 2
    with pytest.raises(ValueError, match="procs"):
        TrainConfig(**{**TINY, "procs": 3})  # batch 4 does not split over 3
    with pytest.raises(ValueError, match="needs a directory"):
        train(TrainConfig(**{**TINY, "procs": 2}), progress=False)
