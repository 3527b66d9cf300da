"""``selfattn heads MODEL``: score every layer × head of a model with the head detectors (previous-token,
induction, duplicate-token, first-token, local, uniform) on repeated random tokens, from exact weights streamed
per head and row block (any length: no dense N×N for all heads).

    selfattn heads minilm                     # all-MiniLM-L6-v2
    selfattn heads path/to/hf_model --length 2048
    selfattn heads run                        # a `selfattn train` checkpoint directory
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("heads", help="find previous-token, induction, duplicate-token, sink, local and uniform heads",
                       description="Run MODEL on repeated random tokens ([BOS] r r …) and score every head of every "
                                   "layer with the head detectors; print the table and the heads found.")
    p.add_argument("model", help="'minilm', a Hugging Face model directory (config.json, weights, tokenizer.json), "
                                 "or a `selfattn train` run directory")
    p.add_argument("--length", type=int, default=64, metavar="L", help="random tokens per repeat (default 64)")
    p.add_argument("--reps", type=int, default=2, metavar="R", help="repeats of the random tokens (default 2)")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="probe sequences (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=4, metavar="W", help="local: keys within W positions (default 4)")
    p.add_argument("--threshold", type=float, metavar="T", help="one threshold for every detector (default: per "
                                                                  "detector, see selfattn.inspect.heads)")
    p.set_defaults(func=run)
    return p


def _hf(path: Path, args):
    """A model directory selfattn.models loads -> (model, probe inputs dict, token ids)."""
    import torch
    from .. import models
    from ..inspect.heads import repeated_tokens
    try:
        model = models.load(path).eval()
        tok = models.load_tokenizer(path).tok
    except (KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: not a loadable model ({e})") from None
    V = tok.get_vocab_size()
    words = [i for i in range(V) if (tok.id_to_token(i) or "").isalpha()]  # ordinary words, no specials
    if not words:
        raise ValueError(f"{path}: the tokenizer has no plain word tokens to build a probe from")
    tok.no_truncation()
    tok.no_padding()
    specials = tok.encode("", add_special_tokens=True).ids  # BERT: [CLS] [SEP]; GPT-2: none
    prefix, suffix = specials[:1], specials[1:]
    ids = repeated_tokens(args.batch, args.length, args.reps, choices=words, prefix=prefix, suffix=suffix,
                          seed=args.seed)
    inputs = {"input_ids": ids}
    import inspect as _inspect
    if "attention_mask" in _inspect.signature(model.forward).parameters:
        inputs["attention_mask"] = torch.ones_like(ids)
    return model, inputs, ids


def run(args) -> int:
    from ..inspect.heads import detect_heads, repeated_tokens
    for name in ("length", "reps", "batch", "window"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}: expected a positive int, got {getattr(args, name)}")
    spec = args.model
    if spec == "minilm":
        from .. import models
        path, name = models.minilm_path(), "all-MiniLM-L6-v2"
    else:
        path, name = Path(spec), Path(spec).name or spec
        if not path.exists():
            raise ValueError(f"{spec}: no such file or directory")
        if not path.is_dir():
            raise ValueError(f"{spec}: not a model (expected a model or `selfattn train` run directory, got a file)")
    from ..train.loop import CHECKPOINT
    if (path / CHECKPOINT).is_file():
        from ..train import from_checkpoint
        model, cfg = from_checkpoint(path)
        high = cfg.n_symbols if cfg.task in ("copy", "reverse", "sort", "recall", "repeat") else \
            model.config.vocab_size
        ids = repeated_tokens(args.batch, args.length, args.reps, high=high, seed=args.seed)
        if ids.shape[1] > model.config.max_seq_len:
            raise ValueError(f"--length {args.length}: the probe has {ids.shape[1]} tokens, above the model's "
                             f"max_seq_len={model.config.max_seq_len}")
        inputs = ids
    elif (path / "config.json").is_file():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{spec}: no tokenizer.json (the probe is made of the model's own word tokens)")
        model, inputs, ids = _hf(path, args)
    else:
        raise ValueError(f"{spec}: not a model (no config.json or {CHECKPOINT} in this directory)")
    res = detect_heads(model, inputs, ids, window=args.window, threshold=args.threshold)
    print(f"{name}: {len(res.names)} attention layers; probe: {args.batch} × ({args.reps} × {args.length} random "
          f"tokens{', with special tokens' if ids.shape[1] > args.reps * args.length else ''}) = {ids.shape[1]} "
          f"tokens each")
    print(res.format())
    return 0
