"""Token generation shared by every generative family (GPT-2, Llama, T5).

A model takes part by implementing two methods (the ``Generative`` protocol):

    start_generation(input_ids (B, N), max_len: int, use_cache: bool, attention_mask=None) -> (tokens (B, n0), state)
        Decoder-only: tokens = input_ids, state holds one KVCache per layer (static, max_len positions) or none.
        Encoder-decoder (T5): runs the encoder once; tokens = the decoder start token; state holds the encoder
        output and the self- and cross-attention caches.
        attention_mask: (B, N) bool keep-mask (True = real token) of a padded batch; ``generate`` passes it only
        when some position is padding, so a model without padding support keeps the three-argument form.
    generation_step(tokens (B, n), state) -> logits (B, n', V)
        With a cache: ``tokens`` are only the tokens not yet seen; they are appended to the cache and attend to
        it (one new token per step after the prefill, the prefix is never recomputed).
        Without a cache (use_cache=False): ``tokens`` is the whole decoder sequence, recomputed every step.
        The last position of the logits is each row's next-token distribution (a right-padded prompt's first
        step: the row's last real token, not the padding after it); models may return only that position.

Decoder-only models share ``DecoderState``: it turns the prompt's keep-mask into what each call needs (the
keep-mask over cache + new tokens, per-row positions counted from each row's first real token, and which new
token to sample from), so a padded batch generates exactly what each prompt generates alone.

Shape legend: B batch, N prompt length, n tokens fed in one call, Nk keys (cache + new), V vocabulary.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Optional, Protocol, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Generative", "GenerationMixin", "DecoderState", "generate", "sample_next", "stream_layout_"]


class Generative(Protocol):
    def start_generation(self, input_ids: Tensor, max_len: int, use_cache: bool) -> Tuple[Tensor, object]:
        ...

    def generation_step(self, tokens: Tensor, state: object) -> Tensor:
        ...


@dataclass
class DecoderState:
    """Generation state of a decoder-only model: its caches (None: every step recomputes the whole sequence)
    and the prompt's keep-mask (None: no padding, the models' own defaults serve)."""
    caches: Optional[list]  # one selfattn.nn.KVCache per layer
    keep: Optional[Tensor]  # (B, N) bool, True = real prompt token

    def inputs(self, n: int) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """For a call feeding n tokens: (attention_mask (B, Nk) bool over cache + new tokens, position_ids (B, n),
        last (B,) index among the n tokens of each row's last real one) -- all None when nothing is padded.
        Tokens after the prompt are real (the cache grows with keep=True); positions count real tokens only, so
        a row's first real token is position 0 wherever the padding sits (left, right or both)."""
        if self.keep is None:
            return None, None, None
        B, N = self.keep.shape
        total = n + (self.caches[0].length if self.caches else 0)  # keys after this call
        grown = torch.ones(B, total - N, dtype=torch.bool, device=self.keep.device)
        keep = torch.cat([self.keep, grown], dim=1)  # (B, Nk)
        pos = (keep.cumsum(-1) - 1).clamp(min=0)[:, -n:]  # (B, n); padding takes its neighbour's position
        new = keep[:, -n:]  # (B, n)
        last = n - 1 - new.flip(-1).int().argmax(-1)  # (B,); a row with no real new token is never sampled here
        return keep, pos, last

    @staticmethod
    def take(hidden: Tensor, last: Optional[Tensor]) -> Tensor:
        """(B, n, E) -> (B, 1, E): the position each row samples from (the last one when ``last`` is None)."""
        if last is None:
            return hidden[:, -1:]
        idx = last.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])  # (B, 1, E)
        return hidden.gather(1, idx)


def column_major_(module: nn.Module, name: str = "weight") -> None:
    """Store the 2-d parameter ``module.<name>`` (R, C) column-major: same shape and values, strides (1, R).
    In place; requires_grad is kept. A loaded checkpoint's ``copy_`` keeps the layout."""
    p = getattr(module, name)
    setattr(module, name, nn.Parameter(p.detach().t().contiguous().t(), requires_grad=p.requires_grad))


def stream_layout_(model: nn.Module) -> nn.Module:
    """Lay out the weights of ``model``'s ``nn.Linear`` layers for one-token decoding, in place: a weight whose
    output is at least as wide as its input (out >= in: fused QKV, MLP up-projections, a vocabulary head) is
    stored column-major (strides (1, out)), the others stay row-major. Shapes, values, state_dict keys and every
    result are unchanged, only strides move.

    Why: a decode step is matrix-vector products that read every weight once, so it runs at the speed weights
    stream from memory. ``F.linear(x, W)`` hands BLAS ``W.t()``; when that is a contiguous (in, out) matrix MKL's
    vector-times-matrix path streams at the read bandwidth of a plain sum, when it is a transposed view (the
    row-major (out, in) default) it reaches 65-70% of it. Measured for one token on the 2-core AMD EPYC, one
    thread, each weight read from memory (not cache): (2304, 768) 1.26x, (3072, 768) 1.54x, (50257, 768) 1.55x,
    (768, 768) 1.02-1.15x faster column-major; (768, 3072) is 0.84-0.90x, so out < in stays row-major. The
    price: 4-16 rows at a time (batched decoding) run the (3072, 768) product 0.83-0.93x; from 64 rows (prefill,
    encoding, training) both layouts are equal within noise, as BLAS packs either. Hugging Face's GPT-2 stores
    its Conv1D weights this way too. safetensors' ``save_file`` needs ``.contiguous()`` tensors (``torch.save``
    takes these as they are)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features >= m.in_features:
            column_major_(m)
    return model


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


def _keep_mask(attention_mask, input_ids: Tensor) -> Optional[Tensor]:
    """(B, N) 1/0 (ints, floats or bools) -> (B, N) bool keep-mask, None when nothing is padded."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask: expected a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else attention_mask!r}")
    if attention_mask.is_complex():
        raise ValueError(f"attention_mask: expected 1/0 integers, floats or bools (1 = real token), got "
                         f"{attention_mask.dtype}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"attention_mask: expected it on input_ids' device {input_ids.device}, got "
                         f"{attention_mask.device}")
    if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)][0].item()
        raise ValueError(f"attention_mask: expected 1 (real token) or 0 (padding) everywhere, got {bad!r}")
    keep = attention_mask.bool()
    empty = (~keep.any(-1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"attention_mask: row {int(empty[0])} has no real token (every position is 0); "
                         f"a prompt needs at least one")
    return None if bool(keep.all()) else keep


def _position_limit(model) -> Optional[int]:
    """Positions a model can encode at all (learned absolute embeddings: GPT-2's n_positions), else None."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "n_positions", None)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _takes_attention_mask(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "attention_mask" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@torch.inference_mode()
def generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             attention_mask: Optional[Tensor] = None) -> Tensor:
    """Autoregressive decoding. Returns (B, n0 + T) int64: the decoder's starting tokens (the prompt for
    decoder-only models, as given, padding included; the decoder start token for T5) followed by
    T <= max_new_tokens new tokens. A row that produced ``eos_token_id`` keeps emitting it; decoding stops early
    when every row has.

    attention_mask (B, N), 1 = real token, 0 = padding: a batch of prompts of different lengths. Padding is never
    attended, each row's positions start at 0 at its first real token, and a row's first new token follows its
    last real one, so every row generates what its prompt generates alone. Left padding (Hugging Face's
    convention for decoder-only models) and right padding both work; for T5 it is the encoder's padding mask,
    applied to the cross-attention at every step. A prompt plus max_new_tokens beyond what the model can
    encode (GPT-2's learned positions) is refused before any work is done."""
    _check(input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    keep = _keep_mask(attention_mask, input_ids)
    limit = _position_limit(model)
    if limit is not None and getattr(model, "start_generation", None) is not None and not hasattr(model, "encode"):
        longest = input_ids.shape[1] if keep is None else int(keep.sum(-1).max())  # real tokens take positions
        if longest + max_new_tokens > limit:
            raise ValueError(f"max_new_tokens: the prompt ({longest} tokens) plus {max_new_tokens} new tokens "
                             f"exceed the model's {limit} positions (n_positions); ask for at most "
                             f"{max(0, limit - longest)}")
    for name in ("start_generation", "generation_step"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"model: {type(model).__name__} does not implement {name} (see "
                            f"selfattn.models.generation.Generative)")
    input_ids = input_ids.long()
    max_len = input_ids.shape[1] + max_new_tokens
    if keep is None:
        tokens, state = model.start_generation(input_ids, max_len, use_cache)
    elif _takes_attention_mask(model.start_generation):
        tokens, state = model.start_generation(input_ids, max_len, use_cache, attention_mask=keep)
    else:
        raise ValueError(f"attention_mask: {type(model).__name__}.start_generation takes no attention_mask, so "
                         f"padded prompts would attend to their padding; generate them one at a time")
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


class GenerationMixin:
    """``model.generate(...)`` as a method, the Hugging Face habit; it delegates to ``generate`` above."""

    def generate(self, input_ids: Tensor, max_new_tokens: int, *, attention_mask: Optional[Tensor] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 use_cache: bool = True) -> Tensor:
        """input_ids (B, N) -> (B, n0 + T) int64, as ``selfattn.models.generate(self, ...)`` (greedy by default;
        no eos stop unless ``eos_token_id`` is given)."""
        return generate(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, generator=generator, use_cache=use_cache,
                        attention_mask=attention_mask)
