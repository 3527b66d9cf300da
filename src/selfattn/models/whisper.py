"""Whisper (Radford et al. 2022): speech encoder-decoder on ``selfattn.nn.Attention``.

What differs from T5 / BERT, and where it lives here:

* the encoder reads log-mel features (``models.audio.log_mel``), not tokens: two 1-D convolutions with GELU
  (the second of stride 2: 100 frames/s -> 50 positions/s), then fixed sinusoidal positions (a buffer loaded
  from the checkpoint, where HF saves it);
* the decoder has learned absolute positions (max_target_positions of them, 448 for OpenAI's checkpoints);
* pre-LayerNorm blocks (biases everywhere but the key projections, see ``convert_state_dict``), GELU MLP;
* decoder: causal self-attention (KV cache while generating) + cross-attention to the encoder output, whose
  K/V are computed once on the first step and reused from a cross KVCache;
* logits = h · embed_tokens^T (the output head is tied to the token embedding);
* ``scale_embedding`` is read and, as in transformers, not applied (HF's Whisper defines the scale, never uses it).

Generation: the audio is bound first, the decoder prompt (start-of-transcript and task tokens) is the input_ids:

    model = selfattn.models.load("path/to/whisper")
    feats = audio.log_mel(audio.read_wav("a.wav"))[None]        # (1, 80, 3000)
    ids = generate(model.with_audio(feats), prompt, max_new_tokens=32)   # or model.generate(feats, ...)

Shape legend: B batch, M mel bins, T feature frames, N encoder positions (ceil(T / 2)), Nd decoder tokens,
E d_model, H heads, F ffn width, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Attention, KVCache
from .activations import activation
from .loading import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Field, check_config, register

__all__ = ["WhisperConfig", "Whisper", "WhisperState", "WithAudio", "sinusoids", "convert_state_dict"]

_ENC = r"(?:model\.)?encoder\.layers\.(\d{1,9})\."
_DEC = r"(?:model\.)?decoder\.layers\.(\d{1,9})\."
# config.json fields from_hf reads, checked (type, range, layer counts against the weights) before use
HF_FIELDS = {
    "vocab_size": Field("int", 1, MAX_VOCAB, required=True),
    "num_mel_bins": Field("int", 1, 1 << 12, required=True),
    "d_model": Field("int", 2, MAX_WIDTH, required=True, multiple_of="encoder_attention_heads"),
    "encoder_layers": Field("int", 1, MAX_LAYERS, required=True, layers=_ENC),
    "decoder_layers": Field("int", 1, MAX_LAYERS, required=True, layers=_DEC),
    "encoder_attention_heads": Field("int", 1, MAX_HEADS, required=True),
    "decoder_attention_heads": Field("int", 1, MAX_HEADS, required=True),
    "encoder_ffn_dim": Field("int", 1, MAX_WIDTH, required=True),
    "decoder_ffn_dim": Field("int", 1, MAX_WIDTH, required=True),
    "max_source_positions": Field("int", 1, MAX_POSITIONS, required=True),
    "max_target_positions": Field("int", 1, MAX_POSITIONS, required=True),
    "activation_function": Field("str"), "scale_embedding": Field("bool"), "tie_word_embeddings": Field("bool"),
    "decoder_start_token_id": Field("int", 0, MAX_VOCAB, null_ok=True),
    "eos_token_id": Field("ints", 0, MAX_VOCAB, null_ok=True),
    "pad_token_id": Field("int", 0, MAX_VOCAB, null_ok=True),
}


@dataclass(frozen=True)
class WhisperConfig:
    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    encoder_heads: int = 6
    decoder_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_ffn_dim: int = 1536
    max_source_positions: int = 1500  # encoder positions: 30 s of audio (3000 frames), attention is 1500²
    max_target_positions: int = 448   # learned decoder positions: prompt + generated tokens fit in these
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5      # nn.LayerNorm's default, which HF's Whisper uses
    separate_head: bool = False       # True only for a checkpoint with tie_word_embeddings false and a proj_out
    decoder_start_token_id: int = 50257
    eos_token_id: Optional[int] = 50257
    pad_token_id: int = 50257

    @classmethod
    def from_hf(cls, hf: dict, state: Optional[Dict[str, Tensor]] = None) -> "WhisperConfig":
        check_config(hf, HF_FIELDS, state)
        if hf["d_model"] % hf["decoder_attention_heads"]:
            raise ValueError(f"config.json: d_model {hf['d_model']} is not a multiple of decoder_attention_heads "
                             f"{hf['decoder_attention_heads']}")
        if hf["d_model"] % 2:
            raise ValueError(f"config.json: d_model {hf['d_model']} must be even (sin|cos encoder positions)")
        act = hf.get("activation_function", "gelu")
        activation(act)  # raises for an activation selfattn does not have
        tied = hf.get("tie_word_embeddings", True) is not False
        separate = (not tied) and (state is None or "proj_out.weight" in state)
        eos = hf.get("eos_token_id", 50257)
        pad = hf.get("pad_token_id")
        start = hf.get("decoder_start_token_id")
        return cls(vocab_size=hf["vocab_size"], num_mel_bins=hf["num_mel_bins"], d_model=hf["d_model"],
                   encoder_layers=hf["encoder_layers"], decoder_layers=hf["decoder_layers"],
                   encoder_heads=hf["encoder_attention_heads"], decoder_heads=hf["decoder_attention_heads"],
                   encoder_ffn_dim=hf["encoder_ffn_dim"], decoder_ffn_dim=hf["decoder_ffn_dim"],
                   max_source_positions=hf["max_source_positions"], max_target_positions=hf["max_target_positions"],
                   activation=act, separate_head=separate,
                   decoder_start_token_id=start if start is not None else (pad or 0),
                   eos_token_id=eos[0] if isinstance(eos, list) and eos else eos, pad_token_id=pad or 0)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """(length, channels) Whisper's encoder positions: sin | cos of geometric timescales 1..max_timescale."""
    inc = math.log(max_timescale) / (channels // 2 - 1) if channels > 2 else 0.0
    inv = torch.exp(-inc * torch.arange(channels // 2))  # (E/2,)
    t = torch.arange(length).view(-1, 1) * inv.view(1, -1)  # (length, E/2)
    return torch.cat([t.sin(), t.cos()], dim=1)


class WhisperBlock(nn.Module):
    """x + attn(LN(x)) [+ cross(LN(x), encoder)] + fc2(act(fc1(LN(x))))."""

    def __init__(self, c: WhisperConfig, decoder: bool):
        super().__init__()
        E = c.d_model
        H, Fd = (c.decoder_heads, c.decoder_ffn_dim) if decoder else (c.encoder_heads, c.encoder_ffn_dim)
        self.attn_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.self_attn = Attention(E, H, bias=True, qkv_fused=True, causal=decoder)
        if decoder:
            self.cross_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
            self.cross_attn = Attention(E, H, bias=True)
        self.mlp_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(E, Fd)
        self.fc2 = nn.Linear(Fd, E)
        self.act = activation(c.activation)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, self_cache: Optional[KVCache] = None,
                cross_cache: Optional[KVCache] = None) -> Tensor:
        x = x + self.self_attn(self.attn_norm(x), cache=self_cache)  # (B, N, E)
        if hasattr(self, "cross_attn"):
            x = x + self.cross_attn(self.cross_norm(x), context=context, cache=cross_cache)
        return x + self.fc2(self.act(self.fc1(self.mlp_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, c: WhisperConfig):
        super().__init__()
        E = c.d_model
        self.conv1 = nn.Conv1d(c.num_mel_bins, E, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(E, E, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positions", sinusoids(c.max_source_positions, E))  # (max_source, E), saved by HF
        self.layers = nn.ModuleList(WhisperBlock(c, decoder=False) for _ in range(c.encoder_layers))
        self.norm = nn.LayerNorm(E, eps=c.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.conv1(x))  # (B, E, T)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, E, N) -> (B, N, E)
        x = x + self.positions[:x.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class WhisperDecoder(nn.Module):
    def __init__(self, c: WhisperConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_positions = nn.Embedding(c.max_target_positions, c.d_model)
        self.layers = nn.ModuleList(WhisperBlock(c, decoder=True) for _ in range(c.decoder_layers))
        self.norm = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)

    def forward(self, ids: Tensor, context: Optional[Tensor],
                caches: Optional[List[Tuple[KVCache, KVCache]]] = None) -> Tensor:
        past = caches[0][0].length if caches is not None else 0  # new tokens sit after the cached ones
        Nd = ids.shape[1]
        if past + Nd > self.embed_positions.num_embeddings:
            raise ValueError(f"decoder_input_ids: positions {past}..{past + Nd - 1} are beyond the decoder's "
                             f"{self.embed_positions.num_embeddings} (max_target_positions)")
        x = self.embed_tokens(ids) + self.embed_positions.weight[past:past + Nd]  # (B, Nd, E)
        for i, layer in enumerate(self.layers):
            sc, cc = caches[i] if caches is not None else (None, None)
            x = layer(x, context, sc, cc)
        return self.norm(x)


@dataclass
class WhisperState:
    """Generation state: the encoder output (computed once) and per decoder layer (self cache, cross cache);
    caches is None when generating without a cache."""
    encoder_out: Tensor
    caches: Optional[List[Tuple[KVCache, KVCache]]]


def _ids(name: str, t) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point():
        raise ValueError(f"{name}: expected a (B, Nd) integer tensor, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    return t


class Whisper(nn.Module):
    """WhisperForConditionalGeneration (or WhisperModel, whose checkpoint holds the same weights)."""

    def __init__(self, config: WhisperConfig):
        super().__init__()
        if not isinstance(config, WhisperConfig):
            raise TypeError(f"config: expected a WhisperConfig, got {type(config).__name__}")
        self.config = c = config
        self.encoder = WhisperEncoder(c)
        self.decoder = WhisperDecoder(c)
        self.proj_out = nn.Linear(c.d_model, c.vocab_size, bias=False) if c.separate_head else None

    def encode(self, input_features: Tensor) -> Tensor:
        """input_features (B, M, T) log-mel -> encoder output (B, ceil(T/2), E). Checkpoints are trained on
        T = 2 · max_source_positions (30 s, what ``audio.log_mel`` pads to); a shorter T runs (transformers
        refuses it) but the model has never seen such inputs."""
        c = self.config
        if not isinstance(input_features, Tensor) or input_features.dim() != 3 or \
                not input_features.is_floating_point() or input_features.shape[1] != c.num_mel_bins:
            raise ValueError(f"input_features: expected a (B, {c.num_mel_bins}, T) float tensor of log-mel "
                             f"features, got {tuple(input_features.shape) if isinstance(input_features, Tensor) else type(input_features).__name__}")
        T = input_features.shape[2]
        if not 1 <= T <= 2 * c.max_source_positions:
            raise ValueError(f"input_features: {T} frames; the encoder takes 1..{2 * c.max_source_positions} "
                             f"({c.max_source_positions} positions after the stride-2 convolution)")
        return self.encoder(input_features.to(self.encoder.conv1.weight.dtype))

    def decode(self, decoder_input_ids: Tensor, encoder_out: Tensor,
               caches: Optional[List[Tuple[KVCache, KVCache]]] = None) -> Tensor:
        """decoder_input_ids (B, Nd), encoder_out (B, N, E) -> logits (B, Nd, V). With caches, the ids are the
        tokens not yet cached; cross-attention K/V are computed on the first call and reused."""
        if caches is not None and len(caches) != len(self.decoder.layers):
            raise ValueError(f"caches: expected {len(self.decoder.layers)} (self, cross) pairs, got {len(caches)}")
        h = self.decoder(_ids("decoder_input_ids", decoder_input_ids), encoder_out, caches)  # (B, Nd, E)
        return F.linear(h, self.decoder.embed_tokens.weight) if self.proj_out is None else self.proj_out(h)

    def forward(self, input_features: Tensor, decoder_input_ids: Tensor) -> Tensor:
        """input_features (B, M, T), decoder_input_ids (B, Nd) -> logits (B, Nd, V)."""
        return self.decode(decoder_input_ids, self.encode(input_features))

    def with_audio(self, input_features: Tensor) -> "WithAudio":
        """This model with its audio bound: a ``Generative`` whose input_ids are the decoder prompt."""
        return WithAudio(self, input_features)

    def generate(self, input_features: Tensor, max_new_tokens: int, prompt: Optional[Tensor] = None, **kw) -> Tensor:
        """``generation.generate`` on this audio; prompt (B, n0) defaults to the decoder start token. Returns
        (B, n0 + T) ids, the prompt first. kw: temperature, top_k, top_p, eos_token_id, generator, use_cache."""
        from .generation import generate
        if prompt is None:
            B = input_features.shape[0] if isinstance(input_features, Tensor) and input_features.dim() == 3 else 1
            prompt = torch.full((B, 1), self.config.decoder_start_token_id, dtype=torch.long)
        return generate(self.with_audio(input_features), prompt, max_new_tokens, **kw)


class WithAudio:
    """The ``Generative`` protocol for Whisper: start_generation runs the encoder once on the bound features;
    the prompt (input_ids) is the decoder's start of sequence (e.g. <|startoftranscript|><|en|><|transcribe|>)."""

    def __init__(self, model: Whisper, input_features: Tensor):
        if not isinstance(model, Whisper):
            raise TypeError(f"model: expected a Whisper, got {type(model).__name__}")
        self.model, self.input_features, self.config = model, input_features, model.config

    def start_generation(self, input_ids: Tensor, max_len: int, use_cache: bool) -> Tuple[Tensor, WhisperState]:
        c = self.config
        if max_len > c.max_target_positions:  # checked before the encoder runs
            raise ValueError(f"max_new_tokens: the prompt ({input_ids.shape[1]} tokens) plus the new tokens need "
                             f"{max_len} decoder positions; the model has {c.max_target_positions} "
                             f"(ask for at most {max(0, c.max_target_positions - input_ids.shape[1])})")
        if int(input_ids.max()) >= c.vocab_size:
            raise ValueError(f"input_ids: token id {int(input_ids.max())} is beyond the vocabulary of {c.vocab_size}")
        enc = self.model.encode(self.input_features)  # (B, N, E), once: every decoder step reads it
        if enc.shape[0] != input_ids.shape[0]:
            if enc.shape[0] != 1:
                raise ValueError(f"input_ids: {input_ids.shape[0]} prompts for {enc.shape[0]} audio inputs")
            enc = enc.expand(input_ids.shape[0], -1, -1)  # one audio, several prompts
        caches = None
        if use_cache:
            n = c.decoder_layers
            caches = list(zip(KVCache.for_model(n, max_len), KVCache.for_model(n)))  # self static, cross once
        return input_ids, WhisperState(enc, caches)

    def generation_step(self, tokens: Tensor, state: WhisperState) -> Tensor:
        return self.model.decode(tokens, state.encoder_out, state.caches)


def convert_state_dict(hf_state: Dict[str, Tensor], config: WhisperConfig) -> Dict[str, Tensor]:
    """Hugging Face ``WhisperForConditionalGeneration`` / ``WhisperModel`` names -> ours. Self-attention
    q|k|v are concatenated for one fused matmul. HF's key projections have no bias; ours get a zero one (a key
    bias b adds q·b to every score of a row, which softmax cancels, so zeros change nothing). The tied proj_out
    and any copy of it are dropped. Unknown names are kept for the strict check in ``load`` to report."""
    sd = dict(hf_state)
    pre = "model." if any(k.startswith("model.") for k in sd) else ""
    out: Dict[str, Tensor] = {}
    if config.separate_head:
        if "proj_out.weight" in sd:
            out["proj_out.weight"] = sd.pop("proj_out.weight")
    else:
        sd.pop("proj_out.weight", None)

    def move(src: str, dst: str):
        if pre + src in sd:
            out[dst] = sd.pop(pre + src)

    def attention(src: str, dst: str, fused: bool):
        w = [pre + f"{src}.{x}_proj.weight" for x in "qkv"]
        qb, vb = pre + f"{src}.q_proj.bias", pre + f"{src}.v_proj.bias"
        if fused and all(k in sd for k in w):
            out[f"{dst}.qkv_proj.weight"] = torch.cat([sd.pop(k) for k in w])  # (3E, E)
            if qb in sd and vb in sd:
                q, v = sd.pop(qb), sd.pop(vb)
                out[f"{dst}.qkv_proj.bias"] = torch.cat([q, torch.zeros_like(q), v])  # (3E,)
        elif not fused:
            for x in "qkv":
                move(f"{src}.{x}_proj.weight", f"{dst}.{x}_proj.weight")
            move(f"{src}.q_proj.bias", f"{dst}.q_proj.bias")
            move(f"{src}.v_proj.bias", f"{dst}.v_proj.bias")
            if f"{dst}.q_proj.bias" in out:
                out[f"{dst}.k_proj.bias"] = torch.zeros_like(out[f"{dst}.q_proj.bias"])
        for p in ("weight", "bias"):
            move(f"{src}.out_proj.{p}", f"{dst}.out_proj.{p}")

    for p in ("weight", "bias"):
        move(f"encoder.conv1.{p}", f"encoder.conv1.{p}")
        move(f"encoder.conv2.{p}", f"encoder.conv2.{p}")
        move(f"encoder.layer_norm.{p}", f"encoder.norm.{p}")
        move(f"decoder.layer_norm.{p}", f"decoder.norm.{p}")
    move("encoder.embed_positions.weight", "encoder.positions")
    move("decoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    move("decoder.embed_positions.weight", "decoder.embed_positions.weight")
    for stack, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        for i in range(n):
            a, o = f"{stack}.layers.{i}.", f"{stack}.layers.{i}."
            attention(a + "self_attn", o + "self_attn", fused=True)
            if stack == "decoder":
                attention(a + "encoder_attn", o + "cross_attn", fused=False)
            for p in ("weight", "bias"):
                for src, dst in (("self_attn_layer_norm", "attn_norm"), ("encoder_attn_layer_norm", "cross_norm"),
                                 ("final_layer_norm", "mlp_norm"), ("fc1", "fc1"), ("fc2", "fc2")):
                    move(f"{a}{src}.{p}", f"{o}{dst}.{p}")
    out.update(sd)  # leftovers: reported by the strict check
    return out


register("whisper", config_from_hf=WhisperConfig.from_hf, model_cls=Whisper, convert_state_dict=convert_state_dict)
