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

import math
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
    # float64: a tiny temperature (1e-45) scales logits by up to 1e45, which float32 turns into inf and NaN
    logits = logits.double() / temperature
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
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected at least one prompt token per row, got shape {tuple(input_ids.shape)} "
                         f"(start decoder-only prompts with the model's BOS token)")
    if input_ids.numel() and int(input_ids.min()) < 0:
        raise ValueError(f"input_ids: expected token ids >= 0, got {int(input_ids.min())}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: expected None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(f"top_k, top_p: only meaningful when sampling (temperature > 0), got top_k={top_k}, "
                         f"top_p={top_p} with temperature=0")
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < 2 ** 63):
        raise ValueError(f"eos_token_id: expected None or a token id (an int >= 0), got {eos_token_id!r}")


def _position_limit(model) -> Optional[int]:
    """Positions a model can encode at all (learned absolute embeddings: GPT-2's n_positions), else None."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "n_positions", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


@torch.inference_mode()
def generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             attention_mask: Optional[Tensor] = None) -> Tensor:
    """Autoregressive decoding. Returns (B, n0 + T) int64: the decoder's starting tokens (the prompt for
    decoder-only models, the decoder start token for T5) followed by T <= max_new_tokens new tokens.
    A row that produced ``eos_token_id`` keeps emitting it; decoding stops early when every row has.

    Every row of ``input_ids`` is a whole prompt: a batch of prompts of different lengths would attend to the
    padding, so ``attention_mask`` (B, N), when given, must be all ones (padded batched generation is not
    supported yet: generate such prompts one at a time). A prompt plus max_new_tokens beyond what the model can
    encode (GPT-2's learned positions) is refused before any work is done."""
    _check(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask: expected a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask!r}")
        if not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: padded prompts are not supported by generate (every position would "
                             "be attended, padding included); generate prompts of different lengths one at a time")
    limit = _position_limit(model)
    if limit is not None and getattr(model, "start_generation", None) is not None and \
            not hasattr(model, "encode") and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(f"max_new_tokens: the prompt ({input_ids.shape[1]} tokens) plus {max_new_tokens} new tokens "
                         f"exceed the model's {limit} positions (n_positions); ask for at most {max(0, limit - input_ids.shape[1])}")
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
        if eos_token_id is not None and eos_token_id >= logits.shape[-1]:
            raise ValueError(f"eos_token_id: {eos_token_id} is beyond the model's vocabulary of {logits.shape[-1]}")
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        feed = nxt[:, None]  # (B, 1): the only token the cache has not seen
        if eos_token_id is not None and bool(done.all()):
            break
    return seq
