"""Whisper on selfattn's layer against transformers' WhisperForConditionalGeneration (tiny random weights):
logits, greedy tokens with and without the KV cache, loading through the registry, and Whisper's log-mel
features against WhisperFeatureExtractor on a synthetic WAV."""
import json
import math
import wave

import numpy as np
import pytest
import torch

import transformers  # a test dependency (requirements-dev.txt): missing means a failed set-up

from selfattn import models
from selfattn.models import audio, generate
from selfattn.models.whisper import Whisper, WhisperConfig, sinusoids

TINY = dict(vocab_size=99, num_mel_bins=80, d_model=48, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=6, encoder_ffn_dim=96, decoder_ffn_dim=80,
            max_source_positions=30, max_target_positions=24, decoder_start_token_id=3, pad_token_id=1,
            bos_token_id=2, eos_token_id=4, begin_suppress_tokens=None, suppress_tokens=None)


def tiny_whisper(path, seed=0, **over):
    """A random WhisperForConditionalGeneration saved to path (safetensors). init_std 0.1 instead of 0.02: the
    logits then lie far enough apart that greedy decoding changes token from step to step, not by rounding."""
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(**{**TINY, "init_std": 0.1, **over})
    hf = transformers.WhisperForConditionalGeneration(cfg).eval()
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def features(B=1, T=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 80, T, generator=g)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("whisper")
    hf = tiny_whisper(path)
    return hf, models.load(path), path


def test_sinusoids_match_transformers():
    from transformers.models.whisper.modeling_whisper import sinusoids as hf_sinusoids
    assert torch.equal(sinusoids(30, 48), hf_sinusoids(30, 48))


def test_logits_match_transformers(pair):
    hf, ours, _ = pair
    x = features(B=2)
    dec = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_features=x, decoder_input_ids=dec).logits
        got = ours(x, dec)
    assert got.shape == ref.shape == (2, 7, 99)
    assert rel(got, ref) <= 1e-5
    with torch.no_grad():  # the encoder alone too
        assert rel(ours.encode(x), hf.model.encoder(x).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_match_transformers(pair, use_cache):
    hf, ours, _ = pair
    x = features(B=2, seed=5)
    prompt = torch.tensor([[3, 7], [3, 9]])
    steps = 10
    seq = prompt
    with torch.no_grad():  # transformers' forward, no cache, argmax each step: an independent greedy loop
        for _ in range(steps):
            nxt = hf(input_features=x, decoder_input_ids=seq).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    got = generate(ours.with_audio(x), prompt, max_new_tokens=steps, use_cache=use_cache)
    assert torch.equal(got, seq), (got, seq)
    assert len(set(seq[:, 2:].flatten().tolist())) >= 4  # sequences that move, not one token repeated
    assert torch.equal(ours.generate(x, steps, prompt=prompt, use_cache=use_cache), seq)


def test_cached_step_logits_match_full_forward(pair):
    _, ours, _ = pair
    x = features(seed=7)
    ids = torch.tensor([[3, 5, 8, 13, 21]])
    from selfattn.nn import KVCache
    with torch.no_grad():
        full = ours(x, ids)
        enc = ours.encode(x)
        caches = list(zip(KVCache.for_model(2, 8), KVCache.for_model(2)))
        parts = [ours.decode(ids[:, :2], enc, caches)] + [ours.decode(ids[:, i:i + 1], enc, caches) for i in range(2, 5)]
    assert rel(torch.cat(parts, 1), full) <= 1e-5


def test_generate_refuses_beyond_decoder_positions(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="max_target_positions|decoder positions"):
        ours.generate(features(), max_new_tokens=30)


def test_encoder_refuses_bad_features(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="input_features"):
        ours.encode(torch.randn(1, 40, 60))  # 40 mel bins, the model has 80
    with pytest.raises(ValueError, match="frames"):
        ours.encode(torch.randn(1, 80, 61 + 60))  # beyond 2 * max_source_positions


def test_whisper_model_checkpoint_loads(tmp_path):
    """A WhisperModel directory (no 'model.' prefix, no proj_out) gives the same weights."""
    hf = tiny_whisper(tmp_path / "g")
    base = transformers.WhisperModel(hf.config)
    base.load_state_dict(hf.model.state_dict())
    base.save_pretrained(tmp_path / "m", safe_serialization=True)
    a, b = models.load(tmp_path / "g"), models.load(tmp_path / "m")
    x, ids = features(), torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(a(x, ids), b(x, ids))


def test_config_checked_against_weights(tmp_path):
    tiny_whisper(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["decoder_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="decoder_layers"):
        models.load(tmp_path)


def test_config_defaults():
    c = WhisperConfig.from_hf({**{k: v for k, v in TINY.items() if not k.endswith("suppress_tokens")},
                               "model_type": "whisper"})
    assert (c.encoder_heads, c.decoder_heads, c.eos_token_id, c.decoder_start_token_id) == (4, 6, 4, 3)
    with pytest.raises(ValueError, match="activation"):
        WhisperConfig.from_hf({**TINY, "activation_function": "mish"})


# -- features ------------------------------------------------------------------------------------------------------
def write_wav(path, x, rate=16000, width=2, channels=1):
    """x (S,) in [-1, 1] -> PCM WAV; returns the float samples a PCM reader should give back."""
    scale = {1: 127, 2: 32767, 3: 8388607, 4: 2147483647}[width]
    q = np.round(np.clip(x, -1, 1) * scale).astype(np.int64)
    q = np.repeat(q[:, None], channels, axis=1)  # (S, C)
    if width == 1:
        raw = (q + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in q.reshape(-1)) if width == 3 \
            else q.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    if width == 1:
        return (q[:, 0].astype(np.float32)) / 128.0
    return (q[:, 0] / float(1 << (8 * width - 1))).astype(np.float32)


def chirp(seconds=1.37, rate=16000, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.4 * np.sin(2 * np.pi * (200 + 900 * t) * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
            + 0.02 * noise).astype(np.float32)


@pytest.mark.parametrize("width,channels", [(2, 1), (1, 1), (3, 2), (4, 1)])
def test_read_wav_pcm(tmp_path, width, channels):
    x = chirp(0.2)
    want = write_wav(tmp_path / "a.wav", x, width=width, channels=channels)
    got = audio.read_wav(tmp_path / "a.wav")
    assert got.dtype == torch.float32 and got.shape == (x.size,)
    assert np.allclose(got.numpy(), want, atol=1e-7)


def test_log_mel_matches_feature_extractor(tmp_path):
    want = write_wav(tmp_path / "s.wav", chirp())
    wav = audio.read_wav(tmp_path / "s.wav")
    fe = transformers.WhisperFeatureExtractor()
    assert np.abs(fe.mel_filters - audio.mel_filters().numpy()).max() < 1e-7
    ref = fe(want, sampling_rate=16000, return_tensors="np")["input_features"][0]  # (80, 3000)
    got = audio.log_mel(wav)
    assert got.shape == (80, 3000)
    assert np.abs(got.numpy() - ref).max() <= 1e-4
    batch = audio.log_mel(torch.stack([wav, wav * 0.5]))  # (2, 80, 3000), the floor per example
    assert np.abs(batch[0].numpy() - ref).max() <= 1e-4


def test_log_mel_unpadded_length():
    x = torch.from_numpy(chirp(0.5))
    assert audio.log_mel(x, pad_to=None).shape == (80, x.numel() // 160)


@pytest.mark.parametrize("what", ["rate", "not_wav", "empty", "missing"])
def test_read_wav_refuses(tmp_path, what):
    p = tmp_path / "x.wav"
    if what == "rate":
        write_wav(p, chirp(0.1), rate=8000)
    elif what == "not_wav":
        p.write_bytes(b"not a wav file at all" * 10)
    elif what == "empty":
        write_wav(p, np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match="wav"):
        audio.read_wav(p)
