"""A small GPT on ``selfattn.nn.Attention``: what ``selfattn train`` trains and the head detectors look into.

    x = tok_emb(ids) (+ pos_emb)                 (B, N, E)
    for each layer: x = x + attn(ln(x)); x = x + mlp(ln(x))     (pre-norm, causal; MLP optional)
    logits = head(ln(x))                          (B, N, V)

Positions are RoPE inside every attention layer or a learned table added to the embeddings. GQA: num_kv_heads
< num_heads shares K/V heads (never copied). ``attn_kernel`` swaps the attention for torch's SDPA (the benchmark's
baseline) without touching anything else, so the two models have identical parameters.

Shape legend: B batch, N tokens, E width, H query heads, Hkv key/value heads, D head dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Attention

__all__ = ["GPTConfig", "GPT"]


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # bytes by default; a task or tokenizer sets its own
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: Optional[int] = None  # None = n_head; fewer is GQA (1 = MQA): less K/V memory, a little less capacity
    d_model: int = 128
    max_seq_len: int = 256  # learned positions need a table this long; RoPE has no limit but we check anyway
    positions: str = "rope"  # "rope" (relative, extrapolates) or "learned" (GPT-2's absolute table)
    mlp: bool = True  # False = attention-only, the setting where induction heads are easiest to see (Olsson et al.)
    mlp_ratio: int = 4
    window: Optional[int] = None  # sliding-window causal attention of this many keys (None = full causal)
    rope_theta: float = 10000.0
    tie_embeddings: bool = True  # lm head shares the token embedding: fewer parameters for tiny models
    init_std: float = 0.02  # std of the linear layers' initial weights (GPT-2's 0.02). Tiny models start in a long
    # plateau with it (attention logits ~0, every head uniform); ~1/sqrt(d_model) (0.1 at d=64) lets the induction
    # circuit of the README demo form in a few hundred steps instead of losing the race to a bag-of-recent-tokens fit

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        kv = self.n_head if self.n_kv_head is None else self.n_kv_head
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.n_head % kv:
            raise ValueError(f"n_kv_head: expected a positive divisor of n_head={self.n_head}, got {self.n_kv_head!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model: expected a multiple of n_head={self.n_head}, got {self.d_model}")
        if self.positions not in ("rope", "learned"):
            raise ValueError(f"positions: expected 'rope' or 'learned', got {self.positions!r}")
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError(f"d_model: RoPE needs an even head dim, got d_model/n_head = {self.d_model // self.n_head}")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) \
                or not math.isfinite(self.init_std) or self.init_std <= 0:
            raise ValueError(f"init_std: expected a positive number, got {self.init_std!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"window: expected None or a positive int, got {self.window!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.attn = Attention(c.d_model, c.n_head, c.n_kv_head, bias=False, qkv_fused=True, causal=True,
                              rope_theta=c.rope_theta if c.positions == "rope" else None)
        self.mlp = None
        if c.mlp:
            self.ln2 = nn.LayerNorm(c.d_model)
            self.mlp = nn.Sequential(nn.Linear(c.d_model, c.mlp_ratio * c.d_model), nn.GELU(),
                                     nn.Linear(c.mlp_ratio * c.d_model, c.d_model))

    def forward(self, x: Tensor, mask) -> Tensor:
        x = x + self.attn(self.ln1(x), mask=mask)  # (B, N, E)
        if self.mlp is not None:
            x = x + self.mlp(self.ln2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config: expected a selfattn.train.GPTConfig, got {type(config).__name__}")
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_seq_len, c.d_model) if c.positions == "learned" else None
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(lambda m: self._init(m, c.init_std))
        for b in self.blocks:  # GPT-2's scaled init of the residual projections: the residual stream stays O(1)
            nn.init.normal_(b.attn.out_proj.weight, std=0.02 / math.sqrt(2 * c.n_layer))
        self.attn_kernel = "selfattn"

    @staticmethod
    def _init(m: nn.Module, std: float = 0.02) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def set_attention(self, kind: str) -> "GPT":
        """'selfattn' (the kernels, default) or 'sdpa' (torch's F.scaled_dot_product_attention with a dense mask
        where a window needs one): same parameters, same math, the benchmark's baseline."""
        if kind not in ("selfattn", "sdpa"):
            raise ValueError(f"kind: expected 'selfattn' or 'sdpa', got {kind!r}")
        self.attn_kernel = kind
        return self

    def _mask(self):
        if self.config.window is None:
            return None  # Attention(causal=True) adds the causal mask itself
        from .. import masks
        return masks.sliding_window(self.config.window - 1)  # W keys: itself and W - 1 before it

    def forward(self, ids: Tensor) -> Tensor:
        """ids: (B, N) int64 -> logits (B, N, V) float32."""
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype != torch.int64:
            raise ValueError(f"ids: expected a (B, N) int64 tensor, got "
                             f"{(tuple(ids.shape), ids.dtype) if isinstance(ids, Tensor) else type(ids).__name__}")
        B, N = ids.shape
        if N > self.config.max_seq_len:
            raise ValueError(f"ids: {N} tokens, above max_seq_len={self.config.max_seq_len}")
        x = self.tok_emb(ids)  # (B, N, E)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(N, device=ids.device))
        if self.attn_kernel == "sdpa":
            return self._forward_sdpa(x)
        mask = self._mask()
        for b in self.blocks:
            x = b(x, mask)
        x = self.ln_f(x)
        return x @ self.tok_emb.weight.t() if self.head is None else self.head(x)  # (B, N, V)

    def _forward_sdpa(self, x: Tensor) -> Tensor:
        from ..nn import apply_rope
        B, N, E = x.shape
        c = self.config
        dense = None
        if c.window is not None:  # SDPA has no sliding window: a dense (N, N) bool mask
            i = torch.arange(N, device=x.device)
            dense = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < c.window)
        for b in self.blocks:
            a = b.attn
            h = b.ln1(x)
            H, Hkv, Dh = a.num_heads, a.num_kv_heads, a.head_dim
            q, k, v = a.qkv_proj(h).split([H * Dh, Hkv * Dh, Hkv * Dh], -1)  # (B, N, H·D), (B, N, Hkv·D) x2
            q = q.view(B, N, H, Dh).transpose(1, 2)  # (B, H, N, D)
            k = k.view(B, N, Hkv, Dh).transpose(1, 2)  # (B, Hkv, N, D)
            v = v.view(B, N, Hkv, Dh).transpose(1, 2)
            if a.rope_inv_freq is not None:
                pos = torch.arange(N, device=x.device)
                q, k = apply_rope(q, pos, a.rope_inv_freq), apply_rope(k, pos, a.rope_inv_freq)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=dense is None, scale=a.scale,
                                               enable_gqa=a.num_kv_heads != a.num_heads)  # (B, H, N, D)
            x = x + a.out_proj(o.transpose(1, 2).reshape(B, N, a.num_heads * a.head_dim))
            if b.mlp is not None:
                x = x + b.mlp(b.ln2(x))
        x = self.ln_f(x)
        return x @ self.tok_emb.weight.t() if self.head is None else self.head(x)
