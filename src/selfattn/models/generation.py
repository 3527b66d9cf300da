"""Token generation shared by every generative family (GPT-2, Llama, T5).

A model takes part by implementing two methods (the ``Generative`` protocol):

    start_generation(input_ids (B, N), max_len: int, use_cache: bool) -> (tokens (B, n0), state)
        Decoder-only: tokens = input_ids, state holds one KVCache per layer (static, max_len positions) or none.
        Encoder-decoder (T5): runs the encoder once; tokens = the decoder start token; state holds the encoder
        output and the self- and cross-attention caches.
    generation_step(tokens (B, n), state) -> logits (B, n, V)
        With a cache: ``tokens`` are only the tokens not yet seen; they are appended to the cache and attend to
        it (one new token per step after the prefill, the prefix is never recomputed).
        Without a cache (use_cache=False): ``tokens`` is the whole decoder sequence, recomputed every step.

Shape legend: B batch, N prompt length, V vocabulary.
"""
from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch
from torch import Tensor

__all__ = ["Generative", "generate", "sample_next"]


class Generative(Protocol):
    def start_generation(self, input_ids: Tensor, max_len: int, use_cache: bool) -> Tuple[Tensor, object]:
        ...

    def generation_step(self, tokens: Tensor, state: object) -> Tensor:
        ...


def _filter_top_k(logits: Tensor, k: int) -> Tensor:
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus: keep the smallest set of tokens whose probability reaches p (the most likely one always)."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # (B, V)
    cum = torch.softmax(sorted_logits, -1).cumsum(-1)
    drop_sorted = (cum - torch.softmax(sorted_logits, -1)) >= p  # mass before this token already reaches p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (B, V) of the last position -> next tokens (B,). temperature 0 = greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = _filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = _filter_top_p(logits, top_p)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id):
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"input_ids: expected a (B, N) int64 tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids: expected a (B, N) int64 tensor, got shape {tuple(input_ids.shape)}, "
                         f"dtype {input_ids.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(f"top_k, top_p: only meaningful when sampling (temperature > 0), got top_k={top_k}, "
                         f"top_p={top_p} with temperature=0")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)):
        raise ValueError(f"eos_token_id: expected None or an int, got {eos_token_id!r}")


@torch.inference_mode()
def generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Tensor:
    """Autoregressive decoding. Returns (B, n0 + T) int64: the decoder's starting tokens (the prompt for
    decoder-only models, the decoder start token for T5) followed by T <= max_new_tokens new tokens.
    A row that produced ``eos_token_id`` keeps emitting it; decoding stops early when every row has."""
    _check(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    for name in ("start_generation", "generation_step"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model: {type(model).__name__} does not implement {name} (see "
                            f"selfattn.models.generation.Generative)")
    input_ids = input_ids.long()
    tokens, state = model.start_generation(input_ids, input_ids.shape[1] + max_new_tokens, use_cache)
    seq = tokens  # (B, n0 + t)
    feed = tokens
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        logits = model.generation_step(feed if use_cache else seq, state)  # (B, n, V)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        feed = nxt[:, None]  # (B, 1): the only token the cache has not seen
        if eos_token_id is not None and bool(done.all()):
            break
    return seq
