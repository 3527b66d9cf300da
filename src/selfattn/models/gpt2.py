"""GPT-2: a causal pre-LayerNorm decoder on ``selfattn.nn.Attention`` (fused QKV), learned absolute positions,
LM head tied to the token embedding, KV-cached generation (padded batches too: ``model.generate(ids,
max_new_tokens=..., attention_mask=...)``).

Hugging Face stores GPT-2's projections as ``Conv1D`` with weight (in, out): the converter transposes them to
``nn.Linear``'s (out, in) once at load time, so the forward pass has no transposes.

Shape legend: B batch, N new tokens, T tokens in the cache after this call, E n_embd, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import masks as _masks
from ..nn import Attention, KVCache
from .activations import activation
from .generation import DecoderState, GenerationMixin, column_major_, stream_layout_
from .loading import MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, Field, check_config, register

__all__ = ["GPT2Config", "GPT2", "convert_gpt2"]


# config.json fields from_hf reads, checked (type, range, layer count against the weights) before use
HF_FIELDS = {
    "vocab_size": Field("int", 1, MAX_VOCAB, required=True),
    "n_positions": Field("int", 1, MAX_POSITIONS),
    "n_embd": Field("int", 1, MAX_WIDTH, required=True, multiple_of="n_head"),
    "n_layer": Field("int", 1, MAX_LAYERS, required=True, layers=r"(?:transformer\.)?h\.(\d{1,9})\."),
    "n_head": Field("int", 1, MAX_HEADS, required=True),
    "n_inner": Field("int", 1, MAX_WIDTH, null_ok=True),
    "activation_function": Field("str"),
    "layer_norm_epsilon": Field("float", 0, 1),
    "resid_pdrop": Field("float", 0, 1), "attn_pdrop": Field("float", 0, 1),
    "scale_attn_weights": Field("bool"), "scale_attn_by_inverse_layer_idx": Field("bool"),
    "tie_word_embeddings": Field("bool"), "add_cross_attention": Field("bool"),
    "bos_token_id": Field("int", 0, MAX_VOCAB, null_ok=True), "eos_token_id": Field("int", 0, MAX_VOCAB, null_ok=True),
}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024  # learned positions: the context can never exceed this (no extrapolation)
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12  # head dim = n_embd / n_head = 64: wide enough for the tiled kernel's matmuls to pay
    n_inner: Optional[int] = None  # MLP width; None = 4 * n_embd
    activation_function: str = "gelu_new"  # tanh-approximate GELU, as GPT-2 was trained
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.1  # embedding / residual dropout (training only)
    attn_dropout: float = 0.1  # attention-weight dropout inside selfattn's kernels
    scale_attn_weights: bool = True  # False: scores are not divided by sqrt(head dim)
    scale_attn_by_inverse_layer_idx: bool = False  # extra 1/(layer+1) on the scores (a stability trick)
    tie_word_embeddings: bool = True  # lm_head shares wte: saves V*E parameters (38M for GPT-2 small)
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @classmethod
    def from_hf(cls, hf: dict, state: Optional[Dict[str, Tensor]] = None) -> "GPT2Config":
        check_config(hf, HF_FIELDS, state)
        if hf.get("add_cross_attention", False):
            raise ValueError("config: add_cross_attention=True (GPT-2 as a decoder of an encoder-decoder) is not "
                             "supported")
        tie = hf.get("tie_word_embeddings", True)
        if state is not None and "lm_head.weight" in state and "transformer.wte.weight" in state and tie \
                and not state["lm_head.weight"].is_meta:  # meta tensors (load's shape check) have no values
            tie = bool(torch.equal(state["lm_head.weight"], state["transformer.wte.weight"]))
        return cls(vocab_size=hf["vocab_size"], n_positions=hf.get("n_positions", 1024), n_embd=hf["n_embd"],
                   n_layer=hf["n_layer"], n_head=hf["n_head"], n_inner=hf.get("n_inner"),
                   activation_function=hf.get("activation_function", "gelu_new"),
                   layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5), dropout=hf.get("resid_pdrop", 0.1),
                   attn_dropout=hf.get("attn_pdrop", 0.1), scale_attn_weights=hf.get("scale_attn_weights", True),
                   scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
                   tie_word_embeddings=tie, bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"))


class GPT2Block(nn.Module):
    def __init__(self, c: GPT2Config, layer_idx: int):
        super().__init__()
        E = c.n_embd
        scale = 1.0 / math.sqrt(E // c.n_head) if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.ln1 = nn.LayerNorm(E, eps=c.layer_norm_epsilon)
        self.attn = Attention(E, c.n_head, qkv_fused=True, causal=True, scale=scale, dropout=c.attn_dropout)
        self.ln2 = nn.LayerNorm(E, eps=c.layer_norm_epsilon)
        self.mlp_in = nn.Linear(E, c.n_inner or 4 * E)
        self.mlp_out = nn.Linear(c.n_inner or 4 * E, E)
        self.act = activation(c.activation_function)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, cache: Optional[KVCache], mask=None) -> Tensor:
        # pre-LN: the residual stream is never normalized; dropout only while training (a decode step spends
        # ~10 us a call on the identity otherwise)
        a = self.attn(self.ln1(x), mask=mask, cache=cache)
        x = x + (self.drop(a) if self.training else a)
        m = self.mlp_out(self.act(self.mlp_in(self.ln2(x))))
        return x + (self.drop(m) if self.training else m)


class GPT2(GenerationMixin, nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config: expected a GPT2Config, got {type(config).__name__}")
        c = self.config = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.n_positions, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(GPT2Block(c, i) for i in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.apply(self._init)
        # decoding streams every weight once per token: lay them out for matrix-vector products (see
        # stream_layout_); the tied head reads wte as (E, V), so wte is column-major too (a lookup then gathers
        # E strided floats per token: microseconds, against 154 MB read by the head each step)
        stream_layout_(self)
        if self.lm_head is None:
            column_major_(self.wte)

    @staticmethod
    def _init(m: nn.Module):
        # GPT-2's initialization N(0, 0.02): what training from scratch expects (a loaded checkpoint overwrites it)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def hidden_states(self, input_ids: Tensor, cache: Optional[List[KVCache]] = None,
                      attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, N) -> final hidden states (B, N, E). With ``cache`` (one KVCache per layer) the tokens
        continue the cached sequence: positions start at the cache length. attention_mask: (B, Nk) 1/True = real
        token over cache + new tokens (padded keys are never attended); position_ids: (B, N) or (N,) learned
        positions instead of the running count (a padded row's positions start at its first real token)."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a (B, N) int tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        if cache is not None and len(cache) != self.config.n_layer:
            raise ValueError(f"cache: expected {self.config.n_layer} KVCache objects (one per layer), got {len(cache)}")
        B, N = input_ids.shape
        start = cache[0].length if cache is not None else 0
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, start + N):
                raise ValueError(f"attention_mask: expected (B, cache + N) = {(B, start + N)}, got "
                                 f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
            if not bool(attention_mask.bool().all()):  # an unpadded batch needs no mask: tiles stay FULL
                mask = _masks.key_padding(attention_mask.bool())  # (B, Nk)
        if position_ids is not None:
            if not isinstance(position_ids, Tensor) or position_ids.shape[-1] != N or position_ids.dim() not in (1, 2) \
                    or position_ids.is_floating_point():
                raise ValueError(f"position_ids: expected (B, N) or (N,) ints with N={N}, got "
                                 f"{tuple(getattr(position_ids, 'shape', ())) or type(position_ids).__name__}")
            if N and (int(position_ids.min()) < 0 or int(position_ids.max()) >= self.config.n_positions):
                raise ValueError(f"position_ids: positions {int(position_ids.min())}..{int(position_ids.max())} are "
                                 f"outside 0..{self.config.n_positions - 1} (n_positions)")
            pos = position_ids
        else:
            if start + N > self.config.n_positions:
                raise ValueError(f"input_ids: positions {start}..{start + N - 1} exceed n_positions="
                                 f"{self.config.n_positions} (GPT-2's learned positions end there)")
            pos = torch.arange(start, start + N, device=input_ids.device)
        # under context parallelism (selfattn.distributed.context_parallel) the tokens are a shard of the sequence
        cp_pos = self.blocks[0].attn.cp_positions(N, input_ids.device) if self.blocks else None
        if cp_pos is not None:
            if N and int(cp_pos.max()) >= self.config.n_positions:
                raise ValueError(f"input_ids: global positions up to {int(cp_pos.max())} exceed n_positions="
                                 f"{self.config.n_positions} (GPT-2's learned positions end there)")
            pos = cp_pos
        h = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, N, E)
        for i, block in enumerate(self.blocks):
            h = block(h, cache[i] if cache is not None else None, mask)
        return self.ln_f(h)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, N, E) -> (B, N, V)."""
        w = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ w.t()

    def forward(self, input_ids: Tensor, cache: Optional[List[KVCache]] = None,
                attention_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B, N) -> logits (B, N, V); the other arguments as ``hidden_states``."""
        return self.logits(self.hidden_states(input_ids, cache, attention_mask, position_ids))

    def new_cache(self, max_len: Optional[int] = None) -> List[KVCache]:
        """One KVCache per layer (static when max_len is given)."""
        return KVCache.for_model(self.config.n_layer, max_len)

    # -- the selfattn.models.generation protocol ------------------------------------------------------------
    def start_generation(self, input_ids: Tensor, max_len: int, use_cache: bool,
                         attention_mask: Optional[Tensor] = None) -> Tuple[Tensor, DecoderState]:
        return input_ids, DecoderState(self.new_cache(max_len) if use_cache else None, attention_mask)

    def generation_step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        keep, pos, last = state.inputs(tokens.shape[1])
        h = self.hidden_states(tokens, state.caches, keep, pos)  # (B, n, E)
        return self.logits(DecoderState.take(h, last))  # (B, 1, V): only the position sampled from


def convert_gpt2(hf: Dict[str, Tensor], config: GPT2Config) -> Dict[str, Tensor]:
    """Hugging Face GPT-2 names -> this module's. Conv1D weights (in, out) are transposed to Linear (out, in).
    Accepts GPT2Model and GPT2LMHeadModel checkpoints; drops the causal-mask buffers old checkpoints saved
    ("attn.bias", "attn.masked_bias") and a lm_head equal to wte when tied."""
    src = {}
    for k, v in hf.items():
        k = k[len("transformer."):] if k.startswith("transformer.") else k
        if k.endswith(".attn.bias") or k.endswith(".attn.masked_bias"):
            continue
        if k == "lm_head.weight" and config.tie_word_embeddings:
            continue
        src[k] = v
    out, used = {}, set()

    def take(ours: str, theirs: str, transpose: bool = False):
        if theirs in src:
            v = src[theirs]
            out[ours] = v.t().contiguous() if transpose and v.dim() == 2 else v
            used.add(theirs)

    take("wte.weight", "wte.weight")
    take("wpe.weight", "wpe.weight")
    take("lm_head.weight", "lm_head.weight")
    for p in ("weight", "bias"):
        take(f"ln_f.{p}", f"ln_f.{p}")
        for i in range(config.n_layer):
            a, h = f"blocks.{i}.", f"h.{i}."
            take(f"{a}ln1.{p}", f"{h}ln_1.{p}")
            take(f"{a}ln2.{p}", f"{h}ln_2.{p}")
            for ours, theirs in (("attn.qkv_proj", "attn.c_attn"), ("attn.out_proj", "attn.c_proj"),
                                 ("mlp_in", "mlp.c_fc"), ("mlp_out", "mlp.c_proj")):
                take(f"{a}{ours}.{p}", f"{h}{theirs}.{p}", transpose=p == "weight")
    out.update({k: v for k, v in src.items() if k not in used})  # reported as unexpected by the strict check
    return out


# old checkpoints saved the causal-mask buffers (bool/uint8 or a float scalar): not weights
register("gpt2", GPT2Config.from_hf, GPT2, convert_gpt2, buffers=(r"\.attn\.(bias|masked_bias)$",))
