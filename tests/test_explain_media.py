"""`selfattn explain --model DIR` on a WAV file (Whisper), an image file (ViT) and a text for a checkpoint
family selfattn.models lacks (through transformers' selfattn backend). Tiny random checkpoints are built in
tmp_path with save_pretrained (safetensors); every bad input is one stderr line and exit 2."""
import os
import shutil

import numpy as np
import pytest
import torch

import transformers  # a test dependency (requirements-dev.txt): missing means a failed set-up

from selfattn import models
from selfattn.app import cli, explain
from selfattn.models.image import read_image
from test_whisper import chirp, tiny_whisper, write_wav


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _user_error(argv, capsys, match):
    code, out, err = _run(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("whisper")
    tiny_whisper(d)  # max_source_positions 30: a window of 60 frames = 0.6 s
    return d


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, num_labels=3,
                                 id2label={0: "cat", 1: "dog", 2: "bird"}, label2id={"cat": 0, "dog": 1, "bird": 2})
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Qwen2 (no selfattn.models family) with MiniLM's tokenizer.json, so texts tokenize."""
    d = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.Qwen2Model(cfg).eval().save_pretrained(d, safe_serialization=True)
    shutil.copy(models.minilm_path() / "tokenizer.json", d / "tokenizer.json")
    return d


@pytest.fixture
def wav(tmp_path):
    p = tmp_path / "speech.wav"
    write_wav(p, chirp(0.37))
    return p


@pytest.fixture
def png(tmp_path):
    from matplotlib.image import imsave
    p = tmp_path / "pic.png"
    y, x = np.mgrid[0:40, 0:48]
    imsave(p, np.stack([x / 48, y / 40, (x + y) % 7 / 7], -1))
    return p


def test_explain_wav_whisper(whisper_dir, wav, tmp_path, capsys):
    out_png = tmp_path / "w.png"
    code, out, err = _run(["explain", wav, "--model", whisper_dir, "--out", out_png], capsys)
    assert code == 0, err
    assert "0.37 s of audio -> 19 of 30 encoder positions" in out
    assert "decoded" in out and "encoder layer 1: most focused head" in out and "cross layer 1:" in out
    assert "on padding" in out and "→0." in out
    for p in (out_png, tmp_path / "w.cross.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(tmp_path)) == ["speech.wav", "w.cross.png", "w.png"]


def test_explain_wav_single_head(whisper_dir, wav, tmp_path, capsys):
    code, out, err = _run(["explain", wav, "--model", whisper_dir, "--layer", "0", "--head", "2",
                           "--out", tmp_path / "h.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "h.png").exists() and (tmp_path / "h.cross.png").exists()


def test_explain_wav_errors(whisper_dir, vit_dir, wav, tmp_path, capsys):
    long = tmp_path / "long.wav"
    write_wav(long, chirp(1.0))
    _user_error(["explain", long, "--model", whisper_dir, "--out", tmp_path / "a.png"], capsys, "takes at most 0.60 s")
    slow = tmp_path / "8k.wav"
    write_wav(slow, chirp(0.2), rate=8000)
    _user_error(["explain", slow, "--model", whisper_dir, "--out", tmp_path / "a.png"], capsys, "8000 Hz")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEjunk")
    _user_error(["explain", broken, "--model", whisper_dir, "--out", tmp_path / "a.png"], capsys, "not a PCM WAV")
    _user_error(["explain", tmp_path / "nope.wav", "--model", whisper_dir], capsys, "no such file")
    _user_error(["explain", "hello there", "--model", whisper_dir], capsys, "whisper model explains a WAV")
    _user_error(["explain", wav, "--model", vit_dir], capsys, "needs --model DIR of a whisper")
    _user_error(["explain", wav], capsys, "minilm explains text")
    _user_error(["explain", wav, "--model", whisper_dir, "--out", tmp_path / "a.html"], capsys, "write a .png")
    _user_error(["explain", wav, "--model", whisper_dir, "--layer", "5", "--out", tmp_path / "a.png"], capsys,
                "encoder layers 0..1")
    assert sorted(os.listdir(tmp_path)) == ["8k.wav", "broken.wav", "long.wav", "speech.wav"]


def test_explain_image_vit(vit_dir, png, tmp_path, capsys):
    html, out_png = tmp_path / "v.html", tmp_path / "v.png"
    code, out, err = _run(["explain", png, "--model", vit_dir, "--out", html, "--out", out_png], capsys)
    assert code == 0, err
    assert "2 layers × 4 heads, 17 tokens: [CLS] + 16 patches" in out
    assert "predicted class" in out and "layer 1: most focused head" in out
    assert html.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_explain_image_matches_processor(vit_dir, png):
    """Pixels as transformers' ViTImageProcessor makes them (PIL bilinear resize, mean = std = 0.5)."""
    from PIL import Image
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32})
    ref = proc(Image.open(png).convert("RGB"), return_tensors="pt")["pixel_values"]
    got = read_image(str(png), (32, 32), 3, vit_dir)
    assert got.shape == ref.shape == (1, 3, 32, 32)
    assert float((got - ref).abs().max()) < 0.02  # resampling kernels differ by a grey level at most


def test_explain_image_errors(vit_dir, whisper_dir, png, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    _user_error(["explain", bad, "--model", vit_dir, "--out", tmp_path / "a.png"], capsys, "not an image")
    _user_error(["explain", "a cat", "--model", vit_dir], capsys, "vit model explains an image")
    _user_error(["explain", png, "--model", whisper_dir], capsys, "whisper model explains a WAV")
    _user_error(["explain", tmp_path / "missing.png", "--model", vit_dir], capsys, "no such file")
    _user_error(["explain", png, "--model", vit_dir, "--head", "9", "--out", tmp_path / "a.png"], capsys,
                "heads 0..3")


def test_explain_text_through_transformers_backend(qwen_dir, tmp_path, capsys):
    out_png = tmp_path / "q.png"
    code, out, err = _run(["explain", "The cat sat on the mat.", "--model", qwen_dir, "--out", out_png], capsys)
    assert code == 0, err
    assert "(qwen2, through transformers with the selfattn backend), 2 layers × 4 heads" in out
    assert "layer 1: most focused head" in out and out_png.read_bytes()[:4] == b"\x89PNG"


def test_backend_capture_equals_output_attentions(qwen_dir):
    """The weights explain pictures for a backend model are transformers' own (eager) attention weights."""
    from selfattn.inspect import capture
    ids = torch.tensor([[101, 1996, 4937, 2938, 2006, 1996, 13523, 1012, 102]])
    ours = explain._transformers_model(qwen_dir)
    eager = transformers.AutoModel.from_pretrained(qwen_dir, attn_implementation="eager").eval()
    cap = capture(ours, {"input_ids": ids})
    with torch.no_grad():
        ref = eager(input_ids=ids, output_attentions=True).attentions
    assert len(cap.layers) == len(ref) == 2
    for lc, r in zip(cap.layers, ref):
        assert torch.allclose(lc.weights, r, atol=1e-5)


def test_backend_errors(tmp_path, capsys):
    d = tmp_path / "unknown"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "no-such-family"}')
    (d / "tokenizer.json").write_text("{}")
    _user_error(["explain", "hello", "--model", d], capsys, "not a loadable model")
