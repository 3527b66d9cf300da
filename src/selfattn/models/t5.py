"""T5 (Raffel et al. 2020): encoder-decoder with a learned relative position bias, on ``selfattn.nn.Attention``.

What differs from BERT / GPT-2, and where it lives here:

* no position embeddings: each stack owns one (num_buckets, H) table, looked up by ``selfattn.scores.t5_relative``
  as a score modifier and shared by all its layers (HF keeps it in layer 0 and passes the bias along);
  bidirectional buckets in the encoder, causal buckets in the decoder;
* no score scaling (``scale=1.0``): T5 folds 1/√d into its initialization;
* RMS layer norm without mean subtraction or bias (``llama.RMSNorm`` is the same function);
* FFN ``relu`` (T5 v1.0) or gated (``gated-gelu``: v1.1 / Flan), from ``feed_forward_proj``;
* decoder: causal self-attention (KV cache while generating) + cross-attention whose K/V come from the encoder
  output once (a cross KVCache filled on the first step, reused afterwards);
* logits = lm_head(h), times d_model**-0.5 first when the checkpoint ties lm_head to the embedding (v1.0).

Precision: float32, bfloat16 or float16. In float16 the residual stream of T5 (v1.1 / Flan above all) grows past
the format's range; as HF's T5 layers do, every block clamps its float16 hidden states to +-finfo.max after
each sublayer (to max - 1000 once an inf has appeared), so outputs stay finite. What this cannot rescue is an FFN
whose own intermediate product overflows (HF also keeps ``wo`` in float32 when loading in float16; this module
keeps every weight in the model's dtype).

    model = selfattn.models.load("path/to/t5")
    logits = model(input_ids, decoder_input_ids)                   # (B, Nd, V)
    ids = model.generate(input_ids, max_new_tokens=32, attention_mask=am)  # (B, 1 + T): decoder start token first

Shape legend: B batch, N encoder tokens, Nd decoder tokens, E d_model, H heads, D d_kv, F d_ff, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks as _masks
from .. import scores as _scores
from ..nn import Attention, KVCache
from .activations import activation
from .generation import GenerationMixin
from .llama import RMSNorm
from .loading import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Field, check_config, register

__all__ = ["T5Config", "T5", "T5State", "convert_state_dict"]


# config.json fields from_hf reads, checked (type, range, layer counts against the weights) before use
HF_FIELDS = {
    "vocab_size": Field("int", 1, MAX_VOCAB, required=True),
    "d_model": Field("int", 1, MAX_WIDTH, required=True), "d_kv": Field("int", 1, MAX_WIDTH, required=True),
    "d_ff": Field("int", 1, MAX_WIDTH, required=True), "num_heads": Field("int", 1, MAX_HEADS, required=True),
    "num_layers": Field("int", 1, MAX_LAYERS, required=True, layers=r"encoder\.block\.(\d{1,9})\."),
    # an encoder-only checkpoint (T5EncoderModel) holds no decoder layers whatever this says
    "num_decoder_layers": Field("int", 1, MAX_LAYERS, null_ok=True, layers=r"decoder\.block\.(\d{1,9})\.",
                                layers_optional=True),
    "relative_attention_num_buckets": Field("int", 1, 1 << 16),
    "relative_attention_max_distance": Field("int", 1, MAX_POSITIONS),
    "layer_norm_epsilon": Field("float", 0, 1), "feed_forward_proj": Field("str"),
    "tie_word_embeddings": Field("bool"), "scale_decoder_outputs": Field("bool"),
    "eos_token_id": Field("ints", 0, MAX_VOCAB, null_ok=True),
    "decoder_start_token_id": Field("int", 0, MAX_VOCAB, null_ok=True),
    "pad_token_id": Field("int", 0, MAX_VOCAB, null_ok=True),
}


@dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int                  # head dim; T5 does not tie it to d_model / num_heads
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128  # distances beyond share the last (log-spaced) bucket
    layer_norm_epsilon: float = 1e-6
    gated: bool = False        # FFN act(wi_0 x) · wi_1 x (v1.1, Flan) instead of act(wi x)
    act: str = "relu"
    scale_decoder_outputs: bool = True  # h · d_model**-0.5 before lm_head (v1.0's tied embedding)
    separate_lm_head: bool = False      # False: lm_head is the shared embedding matrix
    has_decoder: bool = True   # False for T5EncoderModel checkpoints
    pad_token_id: int = 0
    eos_token_id: Optional[int] = 1
    decoder_start_token_id: int = 0

    @classmethod
    def from_hf(cls, hf: dict, state: Optional[Dict[str, Tensor]] = None) -> "T5Config":
        """From config.json (transformers 4.x or 5.x) and, when given, the checkpoint's tensors (which tell
        whether an untied lm_head and a decoder are there)."""
        check_config(hf, HF_FIELDS, state)
        ffp = hf.get("feed_forward_proj", "relu")
        parts = ffp.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"config.json: feed_forward_proj {ffp!r} is not 'ACT' or 'gated-ACT'")
        act = "gelu_new" if ffp == "gated-gelu" else parts[-1]  # HF's rule: gated-gelu means the tanh GELU
        activation(act)  # raises for an activation selfattn does not have
        tied = hf.get("tie_word_embeddings", True) is not False
        if state is not None:
            separate = "lm_head.weight" in state
            has_decoder = any(k.startswith("decoder.") for k in state)
        else:
            separate, has_decoder = not tied, True
        eos = hf.get("eos_token_id", 1)
        n = hf["num_layers"]
        dec_start = hf.get("decoder_start_token_id")
        pad = hf.get("pad_token_id")
        pad = 0 if pad is None else pad
        return cls(vocab_size=hf["vocab_size"], d_model=hf["d_model"], d_kv=hf["d_kv"], d_ff=hf["d_ff"],
                   num_layers=n, num_decoder_layers=hf.get("num_decoder_layers") or n, num_heads=hf["num_heads"],
                   relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
                   relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), gated=len(parts) == 2, act=act,
                   scale_decoder_outputs=bool(hf.get("scale_decoder_outputs", tied)), separate_lm_head=separate,
                   has_decoder=has_decoder, pad_token_id=pad,
                   eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
                   decoder_start_token_id=pad if dec_start is None else dec_start)


class T5FF(nn.Module):
    """wo(act(wi x)) or, gated, wo(act(wi_0 x) · wi_1 x) with wi_0|wi_1 fused into one matmul."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.gated, self.act = c.gated, activation(c.act)
        self.wi = nn.Linear(c.d_model, (2 if c.gated else 1) * c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.wi(x)  # (B, N, F) or (B, N, 2F)
        if self.gated:
            g, lin = h.chunk(2, dim=-1)  # (B, N, F) each
            h = self.act(g) * lin
        else:
            h = self.act(h)
        return self.wo(h)


class T5Block(nn.Module):
    """Pre-norm residual block: self-attention (+ cross-attention in the decoder) + FFN."""

    def __init__(self, c: T5Config, decoder: bool):
        super().__init__()
        E, H, D = c.d_model, c.num_heads, c.d_kv
        self.self_norm = RMSNorm(E, c.layer_norm_epsilon)
        self.self_attn = Attention(E, H, head_dim=D, bias=False, qkv_fused=True, scale=1.0, causal=decoder)
        if decoder:
            self.cross_norm = RMSNorm(E, c.layer_norm_epsilon)
            self.cross_attn = Attention(E, H, head_dim=D, bias=False, scale=1.0)
        self.ff_norm = RMSNorm(E, c.layer_norm_epsilon)
        self.ff = T5FF(c)

    def forward(self, x: Tensor, bias, mask=None, context: Optional[Tensor] = None, context_mask=None,
                self_cache: Optional[KVCache] = None, cross_cache: Optional[KVCache] = None) -> Tensor:
        x = _clamp_fp16(x + self.self_attn(self.self_norm(x), mask=mask, bias=bias, cache=self_cache))  # (B, N, E)
        if hasattr(self, "cross_attn"):
            x = _clamp_fp16(x + self.cross_attn(self.cross_norm(x), context=context, mask=context_mask,
                                                cache=cross_cache))
        return _clamp_fp16(x + self.ff(self.ff_norm(x)))


def _clamp_fp16(x: Tensor) -> Tensor:
    """HF T5's guard: float16 hidden states clamped to +-finfo.max (max - 1000 once an inf is there, so the next
    sublayer's sum does not overflow straight away); other dtypes pass through untouched (costs nothing)."""
    if x.dtype != torch.float16:
        return x
    fmax = torch.finfo(torch.float16).max
    c = torch.where(torch.isinf(x).any(), fmax - 1000, fmax)  # a 0-dim tensor: no host sync
    return torch.clamp(x, min=-c, max=c)


class T5Stack(nn.Module):
    """Encoder or decoder: blocks sharing one relative-bias table, then a final RMS norm."""

    def __init__(self, c: T5Config, decoder: bool):
        super().__init__()
        self.c, self.decoder = c, decoder
        n = c.num_decoder_layers if decoder else c.num_layers
        self.layers = nn.ModuleList(T5Block(c, decoder) for _ in range(n))
        self.relative_bias = nn.Parameter(torch.zeros(c.relative_attention_num_buckets, c.num_heads))  # (nb, H)
        self.final_norm = RMSNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x: Tensor, mask=None, context: Optional[Tensor] = None, context_mask=None,
                caches: Optional[List[Tuple[KVCache, KVCache]]] = None) -> Tensor:
        # decoding with a cache: the new queries sit after the cached ones, which shifts every bucket
        past = caches[0][0].length if caches is not None else 0
        bias = _scores.t5_relative(self.relative_bias, bidirectional=not self.decoder,
                                   num_buckets=self.c.relative_attention_num_buckets,
                                   max_distance=self.c.relative_attention_max_distance, q_offset=past)
        for i, layer in enumerate(self.layers):
            sc, cc = caches[i] if caches is not None else (None, None)
            x = layer(x, bias, mask, context, context_mask, sc, cc)
        return self.final_norm(x)


@dataclass
class T5State:
    """Generation state: the encoder output (computed once) and per decoder layer (self cache, cross cache);
    caches is None when generating without a cache."""
    encoder_out: Tensor
    encoder_mask: Optional[_masks.Mask]
    caches: Optional[List[Tuple[KVCache, KVCache]]]


def _ids(name: str, t) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 2 or t.is_floating_point():
        raise ValueError(f"{name}: expected a (B, N) integer tensor, got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    return t


class T5(GenerationMixin, nn.Module):
    """T5ForConditionalGeneration (or the encoder alone, T5EncoderModel, when the checkpoint has no decoder)."""

    def __init__(self, config: T5Config):
        super().__init__()
        if not isinstance(config, T5Config):
            raise TypeError(f"config: expected a T5Config, got {type(config).__name__}")
        self.config = c = config
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = T5Stack(c, decoder=False)
        self.decoder = T5Stack(c, decoder=True) if c.has_decoder else None
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False) if c.separate_lm_head and c.has_decoder \
            else None

    @staticmethod
    def _padding(attention_mask: Optional[Tensor]):
        # (B, N) 1/True = real token -> padded encoder keys are masked in encoder and cross attention; an
        # unpadded batch gets no mask at all (every tile stays FULL, no classification)
        if attention_mask is None or bool(attention_mask.bool().all()):
            return None
        return _masks.key_padding(attention_mask.bool())

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, N) -> encoder last hidden state (B, N, E)."""
        return self.encoder(self.shared(_ids("input_ids", input_ids)), self._padding(attention_mask))

    def decode(self, decoder_input_ids: Tensor, encoder_out: Tensor, encoder_mask=None,
               caches: Optional[List[Tuple[KVCache, KVCache]]] = None) -> Tensor:
        """decoder_input_ids (B, Nd), encoder_out (B, N, E) -> logits (B, Nd, V). With caches, the ids are the
        tokens not yet cached; cross-attention K/V are computed on the first call and reused."""
        if self.decoder is None:
            raise ValueError("decode: this checkpoint has no decoder (T5EncoderModel); use encode()")
        if caches is not None and len(caches) != len(self.decoder.layers):
            raise ValueError(f"caches: expected {len(self.decoder.layers)} (self, cross) pairs, got {len(caches)}")
        x = self.shared(_ids("decoder_input_ids", decoder_input_ids))  # (B, Nd, E)
        h = self.decoder(x, None, encoder_out, encoder_mask, caches)
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5
        return F.linear(h, self.shared.weight) if self.lm_head is None else self.lm_head(h)  # (B, Nd, V)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, N), decoder_input_ids (B, Nd), attention_mask (B, N) -> logits (B, Nd, V)."""
        mask = self._padding(attention_mask)
        enc = self.encoder(self.shared(_ids("input_ids", input_ids)), mask)
        return self.decode(decoder_input_ids, enc, mask)

    # -- the Generative protocol (selfattn.models.generation) ----------------------------------------------------
    def start_generation(self, input_ids: Tensor, max_len: int, use_cache: bool,
                         attention_mask: Optional[Tensor] = None) -> Tuple[Tensor, T5State]:
        if self.decoder is None:
            raise ValueError("generate: this checkpoint has no decoder (T5EncoderModel); use encode()")
        # attention_mask (B, N): the encoder's padding, masked in the encoder and in every step's cross-attention
        mask = self._padding(attention_mask)
        enc = self.encoder(self.shared(_ids("input_ids", input_ids)), mask)  # once: every decoder step reads it
        start = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long,
                           device=input_ids.device)
        caches = None
        if use_cache:
            n = len(self.decoder.layers)
            # self: static, max_len covers the start token + every new one (generate passes N + T >= 1 + T);
            # cross: filled once from the encoder output on the first step
            caches = list(zip(KVCache.for_model(n, max_len), KVCache.for_model(n)))
        return start, T5State(enc, mask, caches)

    def generation_step(self, tokens: Tensor, state: T5State) -> Tensor:
        return self.decode(tokens, state.encoder_out, state.encoder_mask, state.caches)


def convert_state_dict(hf_state: Dict[str, Tensor], config: T5Config) -> Dict[str, Tensor]:
    """Hugging Face ``T5ForConditionalGeneration`` / ``T5EncoderModel`` names -> ours. The layer-0 relative bias
    becomes the stack's table; self-attention q|k|v and gated wi_0|wi_1 are concatenated for fused matmuls;
    the copies of ``shared`` (embed_tokens) and, when tied, lm_head are dropped. Unknown names are kept for the
    strict check in ``load`` to report."""
    sd = dict(hf_state)
    out: Dict[str, Tensor] = {"shared.weight": sd.pop("shared.weight")} if "shared.weight" in sd else {}
    for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              # HF ignores it too: cross-attention has no position bias
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"):
        sd.pop(k, None)
    if not config.separate_lm_head:
        sd.pop("lm_head.weight", None)
    elif "lm_head.weight" in sd:
        out["lm_head.weight"] = sd.pop("lm_head.weight")
    stacks = [("encoder", config.num_layers, False)]
    if config.has_decoder:
        stacks.append(("decoder", config.num_decoder_layers, True))

    def move(src: str, dst: str):
        if src in sd:
            out[dst] = sd.pop(src)

    for stack, n, dec in stacks:
        move(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", f"{stack}.relative_bias")
        move(f"{stack}.final_layer_norm.weight", f"{stack}.final_norm.weight")
        for i in range(n):
            p, q = f"{stack}.block.{i}.layer.", f"{stack}.layers.{i}."
            qkv = [f"{p}0.SelfAttention.{x}.weight" for x in "qkv"]
            if all(k in sd for k in qkv):
                out[q + "self_attn.qkv_proj.weight"] = torch.cat([sd.pop(k) for k in qkv])  # (3·H·D, E)
            move(f"{p}0.SelfAttention.o.weight", q + "self_attn.out_proj.weight")
            move(f"{p}0.layer_norm.weight", q + "self_norm.weight")
            if dec:
                for x, y in zip("qkvo", ("q_proj", "k_proj", "v_proj", "out_proj")):
                    move(f"{p}1.EncDecAttention.{x}.weight", q + f"cross_attn.{y}.weight")
                move(f"{p}1.layer_norm.weight", q + "cross_norm.weight")
            f = f"{p}{2 if dec else 1}."
            gated = [f + "DenseReluDense.wi_0.weight", f + "DenseReluDense.wi_1.weight"]
            if config.gated and all(k in sd for k in gated):
                out[q + "ff.wi.weight"] = torch.cat([sd.pop(k) for k in gated])  # (2F, E)
            elif not config.gated:
                move(f + "DenseReluDense.wi.weight", q + "ff.wi.weight")
            move(f + "DenseReluDense.wo.weight", q + "ff.wo.weight")
            move(f + "layer_norm.weight", q + "ff_norm.weight")
    out.update(sd)  # leftovers: reported by the strict check
    return out


register("t5", config_from_hf=T5Config.from_hf, model_cls=T5, convert_state_dict=convert_state_dict)
