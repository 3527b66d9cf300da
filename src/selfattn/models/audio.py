"""Audio in for the Whisper family: a WAV file read with the standard library's ``wave`` module, and Whisper's
log-mel features computed with torch (no network, no audio library).

    wav = read_wav("speech.wav")               # (S,) float32 in [-1, 1], mono, at 16 kHz
    feats = log_mel(wav)                        # (80, 3000): padded to 30 s like WhisperFeatureExtractor
    feats = log_mel(wav, pad_to=None)           # (80, ceil(S / 160)) frames of the audio alone

The features are those of OpenAI's Whisper (and of transformers' ``WhisperFeatureExtractor``): a centered STFT
(n_fft 400, hop 160, periodic Hann window, reflect padding), power spectrum, a Slaney-normalized mel filter bank
(80 bins, 0–8 kHz), log10 clamped at 1e-10, floored at 8 below the maximum (80 dB of dynamic range), then
(x + 4) / 4. The last STFT frame is dropped, so S samples give S / 160 frames.

Shape legend: S samples, C channels, M mel bins, T frames.
"""
from __future__ import annotations

import math
import os
import wave
from typing import Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["SAMPLE_RATE", "N_FFT", "HOP_LENGTH", "CHUNK_SECONDS", "read_wav", "wav_header", "mel_filters",
           "log_mel", "frames_of"]

SAMPLE_RATE = 16000
N_FFT = 400          # 25 ms windows
HOP_LENGTH = 160     # 10 ms hop: 100 frames a second; the encoder's stride-2 conv makes it 50 tokens a second
CHUNK_SECONDS = 30   # Whisper is trained on 30 s windows: 3000 frames, 1500 encoder positions
WAV_MAX_BYTES = 1 << 30  # a 30 s window is ~1 MB of 16-bit mono; anything near this bound is not meant for one


def _open_wav(p: str):
    """The header of a PCM WAV file -> (wave reader, channels, sample width, rate, whole frames), after the checks
    that need no samples. The frame count is the smaller of what the header declares and what the file can hold
    (a streaming header declares 2³² − 1 bytes)."""
    if not os.path.isfile(p):
        raise ValueError(f"wav: {p!r} is not a file")
    size = os.path.getsize(p)
    if size > WAV_MAX_BYTES:
        raise ValueError(f"wav: {p!r} is {size} bytes, more than the {WAV_MAX_BYTES} read here")
    try:
        w = wave.open(p, "rb")
    except (wave.Error, EOFError) as e:  # not RIFF/WAVE, a float or compressed WAV, a truncated header
        raise ValueError(f"wav: {p!r} is not a PCM WAV file the wave module can read ({e or 'truncated'})") from None
    C, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
    if C < 1 or width not in (1, 2, 3, 4):
        w.close()
        raise ValueError(f"wav: {p!r} has {C} channels of {8 * width}-bit samples; expected 8/16/24/32-bit PCM")
    return w, C, width, rate, min(n, size // (C * width))


def wav_header(path: Union[str, os.PathLike]) -> Tuple[int, int, int, int]:
    """(channels, bytes per sample, sample rate, samples per channel) of a PCM WAV file, from its header alone
    (nothing is decoded): what a caller checks against a model's window before reading."""
    w, C, width, rate, n = _open_wav(os.fspath(path))
    w.close()
    return C, width, rate, n


def read_wav(path: Union[str, os.PathLike], sample_rate: int = SAMPLE_RATE, max_samples: Optional[int] = None
             ) -> Tensor:
    """A PCM WAV file (8-, 16-, 24- or 32-bit integer samples, any channel count) -> (S,) float32 mono in
    [-1, 1], channels averaged. The file must already be at ``sample_rate`` Hz: resampling is not done here
    (a wrong rate would silently change every feature); convert first, e.g. ``ffmpeg -i in -ar 16000 out.wav``.

    max_samples: refuse a file whose header declares more samples than this, before reading any (memory is then
    bounded by the window, not the file: decoding costs ~9 bytes per byte of samples)."""
    p = os.fspath(path)
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples: expected None or a positive int, got {max_samples!r}")
    w, C, width, rate, n = _open_wav(p)
    with w:
        if rate != sample_rate:
            raise ValueError(f"wav: {p!r} is sampled at {rate} Hz, expected {sample_rate} Hz (resample it first, "
                             f"e.g. ffmpeg -i {os.path.basename(p)} -ar {sample_rate} out.wav)")
        if max_samples is not None and n > max_samples:
            raise ValueError(f"wav: {p!r} holds {n / rate:.2f} s of audio, more than the {max_samples / rate:.2f} s "
                             f"read here")
        try:
            data = w.readframes(n)
        except (wave.Error, EOFError) as e:
            raise ValueError(f"wav: {p!r} is not a PCM WAV file the wave module can read ({e or 'truncated'})"
                             ) from None
    n = len(data) // (C * width)  # a truncated data chunk: keep the whole frames that are there
    if n == 0:
        raise ValueError(f"wav: {p!r} holds no samples")
    raw = np.frombuffer(data[:n * C * width], dtype=np.uint8).reshape(n, C, width)  # (S, C, bytes)
    if width == 1:  # 8-bit WAV is unsigned, centered on 128
        x = (raw[..., 0].astype(np.float32) - 128.0) / 128.0
    else:
        # little-endian signed integers of any width: widen to int32 by putting the bytes at the top
        buf = np.zeros((n, C, 4), dtype=np.uint8)
        buf[..., 4 - width:] = raw
        x = buf.view("<i4")[..., 0].astype(np.float32) / 2.0 ** 31  # (S, C)
    return torch.from_numpy(x.mean(axis=1).astype(np.float32))  # (S,)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's scale: linear below 1 kHz (3 mels / 200 Hz), logarithmic above
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    logstep = 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), 200.0 * m / 3.0)


def mel_filters(n_mels: int = 80, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                f_max: float = 8000.0) -> Tensor:
    """(1 + n_fft/2, n_mels) float32 Slaney-normalized triangular filters on the Slaney mel scale, 0..f_max Hz
    (librosa.filters.mel(sr, n_fft, n_mels, htk=False, norm="slaney"), transposed)."""
    if isinstance(n_mels, bool) or not isinstance(n_mels, int) or n_mels < 1:
        raise ValueError(f"n_mels: expected a positive int, got {n_mels!r}")
    fft_hz = np.linspace(0, sample_rate // 2, 1 + n_fft // 2)  # (F,)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(f_max), n_mels + 2))  # (M + 2,)
    diff = np.diff(edges)
    slopes = edges[None, :] - fft_hz[:, None]  # (F, M + 2)
    tri = np.maximum(0.0, np.minimum(-slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]))  # (F, M)
    tri *= (2.0 / (edges[2:] - edges[:-2]))[None, :]  # equal area per filter (Slaney)
    return torch.from_numpy(tri.astype(np.float32))


def log_mel(audio: Tensor, n_mels: int = 80, pad_to: Optional[int] = CHUNK_SECONDS * SAMPLE_RATE) -> Tensor:
    """(S,) or (B, S) float waveform at 16 kHz -> (M, T) or (B, M, T) float32 Whisper features.

    pad_to: samples the audio is zero-padded (or cut) to first, as WhisperFeatureExtractor does (default 30 s:
    T = 3000, what Whisper checkpoints expect); None keeps the audio's own length, T = S // 160. The floor at
    max − 8 is taken over the whole padded input (per example), as in transformers."""
    if not isinstance(audio, Tensor) or audio.dim() not in (1, 2) or not audio.is_floating_point():
        raise ValueError(f"audio: expected a (S,) or (B, S) float tensor, got "
                         f"{tuple(audio.shape) if isinstance(audio, Tensor) else type(audio).__name__}")
    if pad_to is not None and (isinstance(pad_to, bool) or not isinstance(pad_to, int) or pad_to < 1):
        raise ValueError(f"pad_to: expected None or a positive number of samples, got {pad_to!r}")
    x = audio.to(torch.float32)
    if pad_to is not None:
        x = x[..., :pad_to]
        x = torch.nn.functional.pad(x, (0, pad_to - x.shape[-1]))  # (…, pad_to)
    if x.shape[-1] < N_FFT // 2 + 1:
        raise ValueError(f"audio: {x.shape[-1]} samples; the centered STFT needs at least {N_FFT // 2 + 1} "
                         f"({1000 * (N_FFT // 2 + 1) / SAMPLE_RATE:.1f} ms)")
    window = torch.hann_window(N_FFT, device=x.device)  # periodic, as in Whisper
    stft = torch.stft(x, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (…, F, T + 1), reflect-padded
    power = (stft[..., :-1].abs() ** 2).contiguous()  # (…, F, T): the last frame dropped, as Whisper does
    mel = mel_filters(n_mels).to(x.device).T @ power  # (…, M, T)
    logm = torch.clamp(mel, min=1e-10).log10()
    peak = logm.amax(dim=(-2, -1), keepdim=True)  # per example
    logm = torch.maximum(logm, peak - 8.0)
    return (logm + 4.0) / 4.0


def frames_of(samples: int) -> int:
    """Feature frames that hold audio, for S samples (the rest of a padded input is silence)."""
    return max(1, math.ceil(samples / HOP_LENGTH))
