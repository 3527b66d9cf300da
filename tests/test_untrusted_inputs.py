"""Untrusted files through `selfattn explain` (issue 17): image headers that declare huge pixel counts, WAV files
longer than the model's window, and checkpoint directories for the transformers backend whose config.json
contradicts (or would crash) the model it builds. Every one is a single stderr line and exit status 2, decided
from headers before anything large is decoded or built, with nothing else printed (no transformers load report,
no progress bar). Small files are generated in tmp_path."""
import json
import shutil
import struct
import wave
import zlib

import numpy as np
import pytest
import torch

import transformers  # a test dependency (requirements-dev.txt): missing means a failed set-up

from selfattn import models
from selfattn.app import cli
from selfattn.models import audio, image
from test_whisper import chirp, tiny_whisper, write_wav


def _one_line_exit_2(argv, capfd, match):
    """capfd, not capsys: transformers' own logging handler and tqdm write to the stderr it found at import."""
    capfd.readouterr()  # what building the fixtures printed
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    assert out == "", out
    return lines[0]


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8)
    transformers.ViTModel(cfg).eval().save_pretrained(d, safe_serialization=True)
    return d


# -- images: the declared size is checked before decoding ------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR declares w × h RGB pixels, with one tiny IDAT: a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _chunk(b"IEND", b""))


def gif_header(w: int, h: int) -> bytes:
    """A GIF89a whose screen and first image declare w × h pixels (2-colour table, a minimal LZW stream)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    img = b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return screen + img + b"\x3b"


@pytest.mark.parametrize("name, data", [("bomb.png", png_header(100000, 100000)),
                                        ("bomb.gif", gif_header(65535, 65535))])
def test_image_declaring_too_many_pixels(vit_dir, tmp_path, capfd, name, data):
    f = tmp_path / name
    f.write_bytes(data)
    _one_line_exit_2(["explain", f, "--model", vit_dir, "--out", tmp_path / "a.png"], capfd, "pixels")
    with pytest.raises(ValueError, match="pixels"):
        image.read_image(f, (32, 32), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_image_over_selfattn_own_pixel_bound(vit_dir, tmp_path, capfd, monkeypatch):
    """Below Pillow's own bomb limit, IMAGE_MAX_PIXELS still holds (read from the header, nothing decoded)."""
    f = tmp_path / "big.png"
    f.write_bytes(png_header(300, 200))
    monkeypatch.setattr(image, "IMAGE_MAX_PIXELS", 300 * 200 - 1)
    _one_line_exit_2(["explain", f, "--model", vit_dir, "--out", tmp_path / "a.png"], capfd,
                     "declares 300×200 pixels, more than the 59999")


# -- WAV: the declared length against the window before any sample is read -----------------------------------
def test_long_wav_refused_from_its_header(tmp_path, capfd, monkeypatch):
    d = tmp_path / "whisper"
    tiny_whisper(d)  # a window of 0.6 s
    long = tmp_path / "long.wav"
    write_wav(long, chirp(3.0))

    def no_decoding(self, n):
        raise AssertionError(f"readframes({n}) called: the length must be refused from the header")
    monkeypatch.setattr(wave.Wave_read, "readframes", no_decoding)
    _one_line_exit_2(["explain", long, "--model", d, "--out", tmp_path / "a.png"], capfd, "takes at most 0.60 s")
    with pytest.raises(ValueError, match="3.00 s of audio, more than the 0.60 s"):
        audio.read_wav(long, max_samples=9600)


def test_wav_header_that_declares_more_than_the_file_holds(tmp_path):
    """A streaming header (data size 2³²−1) counts at most the frames the file's size can hold (not 2³¹ samples);
    the samples that are there are all read."""
    f = tmp_path / "stream.wav"
    want = write_wav(f, chirp(0.1))
    raw = bytearray(f.read_bytes())
    at = raw.index(b"data") + 4
    raw[at:at + 4] = struct.pack("<I", 0xFFFFFFFF)
    f.write_bytes(bytes(raw))
    C, width, rate, n = audio.wav_header(f)
    assert (C, width, rate) == (1, 2, 16000) and len(want) <= n <= len(raw) // 2
    got = audio.read_wav(f, max_samples=16000)
    assert np.allclose(got.numpy()[:len(want)], want, atol=1e-6)


# -- checkpoints for the transformers backend: config checked against the weights before building ------------
@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.Qwen2Model(cfg).eval().save_pretrained(d, safe_serialization=True)
    shutil.copy(models.minilm_path() / "tokenizer.json", d / "tokenizer.json")
    return d


def _variant(src, dst, config=None, weights=None):
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if weights is not None:
        sd = load_file(str(dst / "model.safetensors"))
        weights(sd)
        save_file(sd, str(dst / "model.safetensors"))
    return dst


def _set(**kv):
    return lambda cfg: cfg.update(kv)


def _recast(name, fn):
    return lambda sd: sd.update({name: fn(sd[name])})


CASES = {
    "zero heads": (_set(num_attention_heads=0), None, "num_attention_heads must be an integer in 1.."),
    "string rms_norm_eps": (_set(rms_norm_eps="1e-6"), None, "rms_norm_eps must be a positive number"),
    "odd head_dim": (_set(head_dim=7), None, "head_dim 7 is odd"),
    "bad layer_types": (_set(layer_types=["full_attention", "no_such_layer"]), None, "layer_types holds"),
    "short layer_types": (_set(layer_types=["full_attention"]), None, "layer_types has 1 entries"),
    "200000 layers": (_set(num_hidden_layers=200000, layer_types=None), None, "num_hidden_layers must be"),
    "50 layers in config, 2 in file": (_set(num_hidden_layers=50, layer_types=["full_attention"] * 50), None,
                                       "50 layers, but the weights hold 2"),
    "size mismatch": (_set(intermediate_size=96), None, "shape mismatches"),
    "missing tensor": (None, lambda sd: sd.pop("layers.1.mlp.up_proj.weight"), "missing tensors"),
    "bool weights": (None, _recast("norm.weight", lambda t: t > 0), "norm.weight (bool)"),
    "int32 weights": (None, _recast("norm.weight", lambda t: t.to(torch.int32)), "norm.weight (int32)"),
    "complex weights": (None, _recast("norm.weight", lambda t: t.to(torch.complex64)), "norm.weight"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backend_checkpoint_checked_before_building(qwen_src, tmp_path, capfd, case):
    config, weights, match = CASES[case]
    d = _variant(qwen_src, tmp_path / "m", config, weights)
    line = _one_line_exit_2(["explain", "The cat sat.", "--model", d, "--out", tmp_path / "a.png"], capfd, match)
    assert "not a loadable model" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_backend_checkpoint_that_fits_loads_quietly(qwen_src, tmp_path, capfd):
    capfd.readouterr()
    code = cli.main(["explain", "The cat sat.", "--model", str(qwen_src), "--out", str(tmp_path / "a.png")])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert "through transformers with the selfattn backend" in out and err == ""


def test_backend_config_with_fewer_layers_than_the_file(qwen_src, tmp_path, capfd):
    """transformers would drop the file's last layer without a word."""
    d = _variant(qwen_src, tmp_path / "m", _set(num_hidden_layers=1, layer_types=["full_attention"]))
    _one_line_exit_2(["explain", "The cat sat.", "--model", d, "--out", tmp_path / "a.png"], capfd,
                     "1 layers, but the weights hold 2")


def test_backend_text_too_long_is_one_line(qwen_src, tmp_path, capfd):
    text = " ".join(["cat"] * 80)  # 82 tokens with [CLS]/[SEP]; the model has 64 positions
    _one_line_exit_2(["explain", text, "--model", qwen_src, "--out", tmp_path / "a.png"], capfd,
                     "82 tokens, but")
