"""Llama (Touvron et al. 2023): pre-norm decoder with RMSNorm, SwiGLU, rotary positions and grouped-query
attention, on ``selfattn.nn.Attention`` (causal, RoPE, GQA and the KV cache all live in that one layer).

    model = selfattn.models.load("path/to/llama")          # a Hugging Face directory, model_type "llama"
    logits = model(input_ids)                               # (B, N, V)
    ids = model.generate(input_ids, max_new_tokens=32, attention_mask=am)   # padded prompts: am (B, N) 1/0

Shape legend: B batch, N new tokens, Nk keys attended (cache + new), E hidden size, F intermediate size,
V vocabulary, L layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks as _masks
from ..nn import Attention, KVCache
from .generation import DecoderState, GenerationMixin, column_major_, stream_layout_
from .loading import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Field, check_config, register

__all__ = ["LlamaConfig", "Llama", "RMSNorm", "convert_state_dict", "llama3_inv_freq"]

_ROPE_TYPES = ("default", "llama3")


def _get(hf: dict, key: str, default=None, required: bool = False):
    if key not in hf or hf[key] is None:
        if required:
            raise ValueError(f"config.json: missing {key!r}")
        return default
    return hf[key]


_ROPE_FIELDS = {"rope_type": Field("str"), "type": Field("str"), "rope_theta": Field("float", 1, 1e12),
                "factor": Field("float", 1e-3, 1e6), "low_freq_factor": Field("float", 0, 1e6),
                "high_freq_factor": Field("float", 0, 1e6), "partial_rotary_factor": Field("float", 0, 1),
                "original_max_position_embeddings": Field("int", 1, MAX_POSITIONS)}
# config.json fields from_hf reads, checked (type, range, layer count against the weights) before use; null is
# read as absent throughout (``_get``)
HF_FIELDS = {
    "vocab_size": Field("int", 1, MAX_VOCAB, required=True),
    "hidden_size": Field("int", 1, MAX_WIDTH, required=True),
    "intermediate_size": Field("int", 1, MAX_WIDTH, required=True),
    "num_hidden_layers": Field("int", 1, MAX_LAYERS, required=True, layers=r"(?:model\.)?layers\.(\d{1,9})\."),
    "num_attention_heads": Field("int", 1, MAX_HEADS, required=True, multiple_of="num_key_value_heads"),
    "num_key_value_heads": Field("int", 1, MAX_HEADS, null_ok=True),
    "head_dim": Field("int", 1, MAX_WIDTH, null_ok=True),
    "max_position_embeddings": Field("int", 1, MAX_POSITIONS, null_ok=True),
    "rms_norm_eps": Field("float", 0, 1, null_ok=True), "rope_theta": Field("float", 1, 1e12, null_ok=True),
    "rope_parameters": Field("object", null_ok=True, fields=_ROPE_FIELDS),
    "rope_scaling": Field("object", null_ok=True, fields=_ROPE_FIELDS),
    "hidden_act": Field("str", null_ok=True), "pretraining_tp": Field("int", 1, MAX_HEADS, null_ok=True),
    "attention_bias": Field("bool", null_ok=True), "mlp_bias": Field("bool", null_ok=True),
    "tie_word_embeddings": Field("bool", null_ok=True),
    "bos_token_id": Field("int", 0, MAX_VOCAB, null_ok=True), "eos_token_id": Field("ints", 0, MAX_VOCAB, null_ok=True),
}


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int           # < num_heads is GQA: the KV cache is num_heads / num_kv_heads times smaller
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"  # "llama3": long-wavelength frequencies divided by rope_factor (Llama 3.1+)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False  # True: the output projection is the embedding matrix (no lm_head weight)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @classmethod
    def from_hf(cls, hf: dict, state: Optional[Dict[str, Tensor]] = None) -> "LlamaConfig":
        """From a Hugging Face config.json dict (transformers 4.x ``rope_scaling``/``rope_theta`` or 5.x
        ``rope_parameters``). Unsupported variants raise instead of running with different numerics."""
        check_config(hf, HF_FIELDS, state)
        act = _get(hf, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json: hidden_act {act!r} is not supported by selfattn's Llama (expected 'silu')")
        if _get(hf, "pretraining_tp", 1) != 1:
            raise ValueError(f"config.json: pretraining_tp={hf['pretraining_tp']} is not supported (expected 1)")
        heads = _get(hf, "num_attention_heads", required=True)
        hidden = _get(hf, "hidden_size", required=True)
        if _get(hf, "head_dim") is None and hidden % heads:
            raise ValueError(f"config.json: 'hidden_size': {hidden} is not a multiple of num_attention_heads={heads} "
                             f"(and no head_dim is given)")
        rp = dict(_get(hf, "rope_parameters", None) or _get(hf, "rope_scaling", None) or {})
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported; expected one of {_ROPE_TYPES}")
        if rp.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"config.json: partial_rotary_factor={rp['partial_rotary_factor']} is not supported")
        eos = _get(hf, "eos_token_id")
        extra = {}
        if rope_type == "llama3":
            if not float(rp["high_freq_factor"]) > float(rp["low_freq_factor"]):
                raise ValueError(f"config.json: rope high_freq_factor={rp['high_freq_factor']} must exceed "
                                 f"low_freq_factor={rp['low_freq_factor']}")
            extra = dict(rope_factor=float(rp["factor"]), rope_low_freq_factor=float(rp["low_freq_factor"]),
                         rope_high_freq_factor=float(rp["high_freq_factor"]),
                         rope_original_max_position=int(rp.get("original_max_position_embeddings",
                                                               _get(hf, "max_position_embeddings", 8192))))
        return cls(vocab_size=_get(hf, "vocab_size", required=True), hidden_size=hidden,
                   intermediate_size=_get(hf, "intermediate_size", required=True),
                   num_layers=_get(hf, "num_hidden_layers", required=True), num_heads=heads,
                   num_kv_heads=_get(hf, "num_key_value_heads", heads),
                   head_dim=_get(hf, "head_dim", hidden // heads), rms_norm_eps=float(_get(hf, "rms_norm_eps", 1e-6)),
                   rope_theta=float(rp.get("rope_theta", _get(hf, "rope_theta", 10000.0))), rope_type=rope_type,
                   attention_bias=bool(_get(hf, "attention_bias", False)), mlp_bias=bool(_get(hf, "mlp_bias", False)),
                   tie_word_embeddings=bool(_get(hf, "tie_word_embeddings", False)),
                   bos_token_id=_get(hf, "bos_token_id"),
                   eos_token_id=eos[0] if isinstance(eos, list) and eos else eos, **extra)


def llama3_inv_freq(inv_freq: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position: int) -> Tensor:
    """Llama 3.1 RoPE scaling: wavelengths longer than the pretraining context / low_freq_factor are stretched by
    ``factor``, shorter than context / high_freq_factor kept, and the band between interpolated smoothly (the
    same float32 ops as transformers' ``_compute_llama3_parameters``, so the frequencies are bit-equal)."""
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight, statistics in float32 (no mean subtraction, no bias). Llama's RMSNorm
    and T5's LayerNorm are this same function, also in half precision: the normalized value is cast back to the
    input dtype before the weight multiplies it."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class LlamaBlock(nn.Module):
    """x + attn(norm(x)), then x + down(silu(gate(norm(x))) · up(norm(x)))."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        # fused q|k|v: one (E, (Hq + 2·Hkv)·D) matmul per layer instead of three
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, bias=c.attention_bias,
                              qkv_fused=True, rope_theta=c.rope_theta, causal=True)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.gate_up = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=c.mlp_bias)  # fused gate|up
        self.down = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: Tensor, mask=None, cache: Optional[KVCache] = None,
                positions: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), mask=mask, cache=cache, positions=positions)  # (B, N, E)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)  # (B, N, F) each
        return x + self.down(F.silu(gate) * up)


class Llama(GenerationMixin, nn.Module):
    """Llama causal language model. ``forward(input_ids)`` -> logits; takes part in ``generate``."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"config: expected a LlamaConfig, got {type(config).__name__}")
        self.config = c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.rope_type == "llama3":
            for layer in self.layers:
                a = layer.attn
                a.rope_inv_freq.copy_(llama3_inv_freq(a.rope_inv_freq, c.rope_factor, c.rope_low_freq_factor,
                                                      c.rope_high_freq_factor, c.rope_original_max_position))
        # decoding streams every weight once per token: fused q|k|v, gate|up and the head column-major (see
        # stream_layout_); a tied head reads the embedding as (E, V), so the embedding is column-major then
        stream_layout_(self)
        if self.lm_head is None:
            column_major_(self.embed)

    def hidden_states(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      caches: Optional[List[KVCache]] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, N) -> final-norm hidden states (B, N, E). attention_mask: optional (B, Nk) with 1/True
        for real tokens (padded keys are never attended). caches: one KVCache per layer; the new tokens take
        positions cache.length.. and attend to everything cached. position_ids: (B, N) or (N,) RoPE positions
        instead (left padding: each row counts from its first real token)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids: expected a (B, N) integer tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"caches: expected one KVCache per layer ({len(self.layers)}), got {len(caches)}")
        if position_ids is not None and (not isinstance(position_ids, Tensor) or position_ids.dim() not in (1, 2)
                                         or position_ids.shape[-1] != input_ids.shape[1]
                                         or position_ids.is_floating_point()):
            raise ValueError(f"position_ids: expected (B, N) or (N,) ints with N={input_ids.shape[1]}, got "
                             f"{tuple(getattr(position_ids, 'shape', ())) or type(position_ids).__name__}")
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            mask = _masks.key_padding(attention_mask.bool())  # (B, Nk): padded keys excluded
        x = self.embed(input_ids)  # (B, N, E)
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if caches is None else caches[i], position_ids)
        return self.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """(B, N, E) -> (B, N, V)."""
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                caches: Optional[List[KVCache]] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, N) -> logits (B, N, V); the other arguments as ``hidden_states``."""
        return self.logits(self.hidden_states(input_ids, attention_mask, caches, position_ids))

    # -- the Generative protocol (selfattn.models.generation) ----------------------------------------------------
    def start_generation(self, input_ids: Tensor, max_len: int, use_cache: bool,
                         attention_mask: Optional[Tensor] = None) -> Tuple[Tensor, DecoderState]:
        # static caches: max_len positions allocated once, the prefix never moves during decoding
        caches = KVCache.for_model(len(self.layers), max_len) if use_cache else None
        return input_ids, DecoderState(caches, attention_mask)

    def generation_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        keep, pos, last = state.inputs(tokens.shape[1])
        h = self.hidden_states(tokens, keep, state.caches, pos)  # (B, n, E)
        return self.logits(DecoderState.take(h, last))  # (B, 1, V): only the position sampled from


def convert_state_dict(hf_state: Dict[str, Tensor], config: LlamaConfig) -> Dict[str, Tensor]:
    """Hugging Face ``LlamaForCausalLM`` / ``LlamaModel`` names -> ours: q|k|v and gate|up concatenated for the
    fused projections; ``lm_head`` dropped when tied to the embedding. Unknown names are kept, so the strict
    check in ``load`` lists them as unexpected."""
    sd = dict(hf_state)
    prefix = "model." if any(k.startswith("model.") for k in sd) else ""
    out: Dict[str, Tensor] = {}
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" in sd:
        out["lm_head.weight"] = sd.pop("lm_head.weight")
    for src, dst in (("embed_tokens.weight", "embed.weight"), ("norm.weight", "norm.weight")):
        if prefix + src in sd:
            out[dst] = sd.pop(prefix + src)
    for i in range(config.num_layers):
        p, q = f"{prefix}layers.{i}.", f"layers.{i}."
        names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
                 "self_attn.o_proj.weight": "attn.out_proj.weight", "self_attn.o_proj.bias": "attn.out_proj.bias",
                 "mlp.down_proj.weight": "down.weight", "mlp.down_proj.bias": "down.bias"}
        for src, dst in names.items():
            if p + src in sd:
                out[q + dst] = sd.pop(p + src)
        for kind in ("weight", "bias"):
            qkv = [p + f"self_attn.{n}_proj.{kind}" for n in "qkv"]
            if all(k in sd for k in qkv):
                out[q + f"attn.qkv_proj.{kind}"] = torch.cat([sd.pop(k) for k in qkv])  # (Hq·D + 2·Hkv·D, ...)
            gu = [p + f"mlp.{n}_proj.{kind}" for n in ("gate", "up")]
            if all(k in sd for k in gu):
                out[q + f"gate_up.{kind}"] = torch.cat([sd.pop(k) for k in gu])  # (2F, ...)
    out.update(sd)  # leftovers: reported by the strict check
    return out


register("llama", config_from_hf=LlamaConfig.from_hf, model_cls=Llama, convert_state_dict=convert_state_dict)
