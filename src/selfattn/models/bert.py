"""BERT (and MiniLM, which is a small BERT): a bidirectional post-LayerNorm encoder on ``selfattn.nn.Attention``.

Padding is a key-padding mask (``selfattn.masks.key_padding``): padded keys are masked for every query, padded
query rows still compute (their outputs are ignored by mean pooling).

Sentence embeddings from text in one call (sentence-transformers' ``encode`` for mean-pooled models such as
all-MiniLM-L6-v2):

    vecs = embed(selfattn.models.minilm_path(), ["A man is eating food.", "Hi"])   # (2, 384), unit norm

Shape legend: B batch, N tokens, E hidden size, V vocabulary, n texts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks
from ..nn import Attention
from .activations import activation
from .loading import (MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, SIDE_JSON_MAX_BYTES, Field, Tokenizer,
                      _read_json, check_config, load, load_tokenizer, register)

__all__ = ["BertConfig", "Bert", "convert_bert", "mean_pool", "sentence_embeddings", "embed"]


# config.json fields from_hf reads, checked (type, range, layer count against the weights) before use
HF_FIELDS = {
    "vocab_size": Field("int", 1, MAX_VOCAB, required=True),
    "hidden_size": Field("int", 1, MAX_WIDTH, required=True, multiple_of="num_attention_heads"),
    "num_hidden_layers": Field("int", 1, MAX_LAYERS, required=True,
                               layers=r"(?:bert\.)?encoder\.layer\.(\d{1,9})\."),
    "num_attention_heads": Field("int", 1, MAX_HEADS, required=True),
    "intermediate_size": Field("int", 1, MAX_WIDTH, required=True),
    "max_position_embeddings": Field("int", 1, MAX_POSITIONS),
    "type_vocab_size": Field("int", 0, MAX_VOCAB),
    "layer_norm_eps": Field("float", 0, 1),
    "hidden_act": Field("str"), "position_embedding_type": Field("str"),
    "hidden_dropout_prob": Field("float", 0, 1), "attention_probs_dropout_prob": Field("float", 0, 1),
    "pad_token_id": Field("int", 0, MAX_VOCAB, null_ok=True),
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768  # E; MiniLM-L6: 384 (12 heads of 32: many narrow heads, cheap per token)
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072  # the MLP holds ~2/3 of the parameters and FLOPs at short lengths
    max_position: int = 512  # learned absolute positions: inputs longer than this cannot be encoded
    type_vocab_size: int = 2  # segment A/B embeddings (next-sentence pairs); 0 = none
    layer_norm_eps: float = 1e-12  # BERT's tiny eps: matters for parity with the checkpoint, not for quality
    hidden_act: str = "gelu"  # exact erf GELU (the tanh approximation drifts ~1e-4 from the checkpoint's training)
    dropout: float = 0.1  # residual / embedding dropout (training only)
    attention_dropout: float = 0.1  # dropout on attention weights, done inside selfattn's kernels
    pad_token_id: int = 0
    add_pooler: bool = True  # tanh(dense(h[CLS])); sentence-transformers models ignore it but ship it

    @classmethod
    def from_hf(cls, hf: dict, state: Optional[Dict[str, Tensor]] = None) -> "BertConfig":
        check_config(hf, HF_FIELDS, state)
        pet = hf.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise ValueError(f"config: position_embedding_type {pet!r} is not supported (only 'absolute')")
        has_pooler = True if state is None else any(k.endswith("pooler.dense.weight") for k in state)
        return cls(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
                   num_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
                   max_position=hf.get("max_position_embeddings", 512), type_vocab_size=hf.get("type_vocab_size", 2),
                   layer_norm_eps=hf.get("layer_norm_eps", 1e-12), hidden_act=hf.get("hidden_act", "gelu"),
                   dropout=hf.get("hidden_dropout_prob", 0.1),
                   attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
                   pad_token_id=hf.get("pad_token_id", 0) or 0, add_pooler=has_pooler)


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        E = c.hidden_size
        self.attn = Attention(E, c.num_heads, bias=True, dropout=c.attention_dropout)
        self.attn_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.ff_in = nn.Linear(E, c.intermediate_size)
        self.ff_out = nn.Linear(c.intermediate_size, E)
        self.ff_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.act = activation(c.hidden_act)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, mask) -> Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, mask=mask)))  # post-LN: normalize after the residual
        return self.ff_norm(x + self.drop(self.ff_out(self.act(self.ff_in(x)))))


class Bert(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"config: expected a BertConfig, got {type(config).__name__}")
        c = self.config = config
        E = c.hidden_size
        self.word_emb = nn.Embedding(c.vocab_size, E)
        self.pos_emb = nn.Embedding(c.max_position, E)
        self.type_emb = nn.Embedding(c.type_vocab_size, E) if c.type_vocab_size > 0 else None
        self.emb_norm = nn.LayerNorm(E, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(BertLayer(c) for _ in range(c.num_layers))
        self.pooler = nn.Linear(E, E) if c.add_pooler else None

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None, skip_padding: bool = False) -> Tensor:
        """input_ids (B, N); attention_mask (B, N), 1/True = real token, 0 = padding -> hidden states (B, N, E).

        skip_padding: compute the real tokens only and return zeros at padded positions (what mean pooling
        reads is unchanged). The real tokens of every row are packed into one sequence with a document mask, so
        the projections, MLPs and LayerNorms do no work for padding (all-MiniLM-L6-v2 on 64 typical sentences:
        856 real of 64 x 25 padded tokens, 54% of the work); without it padded rows are computed as Hugging
        Face computes them."""
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected a (B, N) int tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        B, N = input_ids.shape
        if N > self.config.max_position:
            raise ValueError(f"input_ids: {N} tokens exceed max_position={self.config.max_position}")
        mask, keep = None, None
        if attention_mask is not None:
            if attention_mask.shape != (B, N):
                raise ValueError(f"attention_mask: expected (B, N) = {(B, N)}, got {tuple(attention_mask.shape)}")
            keep = attention_mask.bool()
            if not bool(keep.all()):  # an all-real batch needs no mask: every tile stays FULL
                mask = masks.key_padding(keep)
        pos = torch.arange(N, device=input_ids.device).expand(B, N)  # (B, N): padding-independent, as HF
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        real = None
        if skip_padding and mask is not None:
            real = keep.flatten().nonzero().squeeze(1)  # (T,) flat indices of the real tokens, row by row
            # (1, T) packed ids; one document per row, so a token attends to the real keys of its own row only
            input_ids, pos, tt = (t.flatten()[real][None] for t in (input_ids, pos, tt))
            mask = masks.document(torch.repeat_interleave(torch.arange(B, device=real.device), keep.sum(1)))
        h = self.word_emb(input_ids) + self.pos_emb(pos)  # (B, N, E); packed: (1, T, E)
        if self.type_emb is not None:
            h = h + self.type_emb(tt)
        h = self.drop(self.emb_norm(h))
        for layer in self.layers:
            h = layer(h, mask)
        if real is None:
            return h
        out = h.new_zeros(B * N, h.shape[-1])  # (B·N, E)
        out[real] = h[0]
        return out.view(B, N, -1)  # (B, N, E), zeros at padding

    def pool(self, hidden: Tensor) -> Tensor:
        """BERT's pooled output tanh(W h[CLS] + b): (B, E)."""
        if self.pooler is None:
            raise ValueError("pool: this checkpoint has no pooler weights (config.add_pooler=False)")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> Tensor:
        return self.encode(input_ids, attention_mask, token_type_ids)


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the real tokens' hidden states: (B, N, E), (B, N) -> (B, E)."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, N, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embeddings(model: Bert, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Sentence-transformers' recipe for all-MiniLM-L6-v2: mean pooling over the attention mask, then L2
    normalization. (B, N) ids and mask -> (B, E) unit vectors."""
    pooled = mean_pool(model.encode(input_ids, attention_mask, skip_padding=True), attention_mask)
    return F.normalize(pooled, p=2, dim=-1)


def _check_mean_pooling(path: Path) -> None:
    """A sentence-transformers directory names its pooling in 1_Pooling/config.json: embed() does mean pooling,
    so any other recipe is refused rather than answered with different vectors."""
    f = path / "1_Pooling" / "config.json"
    if not f.is_file():
        return
    doc = _read_json(f, SIDE_JSON_MAX_BYTES)
    if not isinstance(doc, dict):
        raise ValueError(f"1_Pooling/config.json: {str(f)!r} must hold a JSON object")
    others = [k for k, v in doc.items() if k.startswith("pooling_mode_") and k != "pooling_mode_mean_tokens" and v]
    if doc.get("pooling_mode_mean_tokens") is not True or others:
        raise ValueError(f"1_Pooling/config.json: {str(f)!r} asks for {others or 'no mean pooling'}; embed() does "
                         f"mean pooling only (pool model.encode(...) yourself for other recipes)")


@torch.inference_mode()
def embed(model_or_path: Union[Bert, str, os.PathLike], texts: Union[str, Sequence[str]],
          tokenizer: Optional[Tokenizer] = None, batch_size: int = 32) -> Tensor:
    """Sentence embeddings of ``texts``: (n, E) float32 unit vectors (a single str gives (E,), as
    sentence-transformers' ``encode`` does). Mean pooling over the real tokens, then L2 normalization.

    model_or_path: a ``Bert`` or a model directory (the model and, when ``tokenizer`` is None, its tokenizer.json
    are read from it, with sentence_bert_config.json's max_seq_length as the truncation length). Texts are
    encoded ``batch_size`` at a time, sorted by length so each batch pads little; the result keeps the input
    order. The model runs in eval mode (dropout off) and is put back in its mode afterwards."""
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        model = load(path)
        if not isinstance(model, Bert):
            raise ValueError(f"model_or_path: {str(path)!r} holds a {type(model).__name__}, not a BERT encoder")
        _check_mean_pooling(path)
        tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
    elif isinstance(model_or_path, Bert):
        model = model_or_path
        if tokenizer is None:
            raise ValueError("tokenizer: required when a model object is given (selfattn.models.load_tokenizer"
                             "(path)); or pass the model directory instead")
    else:
        raise TypeError(f"model_or_path: expected a selfattn Bert or a model directory, got "
                        f"{type(model_or_path).__name__}")
    single = isinstance(texts, str)
    texts = [texts] if single else texts
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts: expected a str or a list of str")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    dev = model.word_emb.weight.device
    E = model.config.hidden_size
    out = torch.empty(len(texts), E, dtype=torch.float32, device=dev)  # (n, E)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first: similar lengths together
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = tokenizer([texts[i] for i in idx])
            ids, am = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)  # (B, N)
            if ids.numel() and int(ids.max()) >= model.config.vocab_size:
                raise ValueError(f"tokenizer: token id {int(ids.max())} is beyond the model's vocabulary of "
                                 f"{model.config.vocab_size}; the tokenizer does not belong to this model")
            out[torch.tensor(idx, device=dev)] = sentence_embeddings(model, ids, am).float()
    finally:
        model.train(was_training)
    return out[0] if single else out


def convert_bert(hf: Dict[str, Tensor], config: BertConfig) -> Dict[str, Tensor]:
    """Hugging Face BERT names -> this module's. Accepts BertModel and BertFor* checkpoints (prefix "bert.");
    drops the position_ids buffer and the pre-training heads ("cls.*"), which this encoder does not have."""
    src = {}
    for k, v in hf.items():
        k = k[len("bert."):] if k.startswith("bert.") else k
        if k.startswith("cls.") or k == "embeddings.position_ids" or k == "embeddings.token_type_ids":
            continue
        src[k] = v
    out, used = {}, set()

    def take(ours: str, theirs: str):
        if theirs in src:
            out[ours] = src[theirs]
            used.add(theirs)

    for ours, theirs in (("word_emb", "word_embeddings"), ("pos_emb", "position_embeddings"),
                         ("type_emb", "token_type_embeddings")):
        take(f"{ours}.weight", f"embeddings.{theirs}.weight")
    for p in ("weight", "bias"):
        take(f"emb_norm.{p}", f"embeddings.LayerNorm.{p}")
        take(f"pooler.{p}", f"pooler.dense.{p}")
        for i in range(config.num_layers):
            a, o = f"layers.{i}.", f"encoder.layer.{i}."
            for ours, theirs in (("attn.q_proj", "attention.self.query"), ("attn.k_proj", "attention.self.key"),
                                 ("attn.v_proj", "attention.self.value"), ("attn.out_proj", "attention.output.dense"),
                                 ("attn_norm", "attention.output.LayerNorm"), ("ff_in", "intermediate.dense"),
                                 ("ff_out", "output.dense"), ("ff_norm", "output.LayerNorm")):
                take(f"{a}{ours}.{p}", f"{o}{theirs}.{p}")
    # names nothing mapped stay under their own name, so the strict check reports them as unexpected
    out.update({k: v for k, v in src.items() if k not in used})
    return out


register("bert", BertConfig.from_hf, Bert, convert_bert)
