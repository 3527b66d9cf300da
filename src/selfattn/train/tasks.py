"""What ``selfattn train`` trains on: tasks the package generates, and a user's text.

Every task hands out batches ``(x, y)``: x (B, N) int64 inputs, y (B, N) int64 next-token targets with -100
where the position is not scored (``F.cross_entropy(ignore_index=-100)``). Batches come from a
``torch.Generator`` the training loop owns and checkpoints, so a resumed run draws exactly the batches the
uninterrupted run would have drawn.

Generated tasks (symbols 0..n_symbols-1, then a separator token SEP = n_symbols):
* copy       a SEP a          scored: the second a
* reverse    a SEP reversed(a)
* sort       a SEP sorted(a)
* recall     k1 v1 … kP vP, then the keys again in random order, each followed by its value; scored: those values
             (associative recall: keys 0..n-1, values n..2n-1, distinct keys per sequence)
* repeat     r r r … (a random r repeated to fill the sequence; its length p is drawn per sequence from
             [min_period, period], default [period/2, period], so no fixed offset finds the copy); scored: every token after the first p, which
             only an induction head (find the earlier copy of this token, read what came next) predicts
Text: the file's bytes (vocabulary 256) or a ``tokenizer.json``'s ids; the last ``val_fraction`` is held out.

Shape legend: B batch, N sequence length.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Task", "TASKS", "make_task", "GeneratedTask", "TextTask", "IGNORE"]

IGNORE = -100
TASKS = ("copy", "reverse", "sort", "recall", "repeat")
TEXT_MAX_BYTES = 1 << 30  # a training text is read whole; beyond 1 GiB use a proper data pipeline


def _pos(name: str, v, least: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise ValueError(f"{name}: expected an int >= {least}, got {v!r}")
    return v


class Task:
    """A source of (x, y) batches. ``vocab_size``, ``seq_len`` (N of every batch), ``name``."""
    name: str
    vocab_size: int
    seq_len: int

    def batch(self, batch_size: int, generator: torch.Generator, split: str = "train") -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"task": self.name}


class GeneratedTask(Task):
    def __init__(self, name: str, seq_len: int, n_symbols: int = 16, period: Optional[int] = None,
                 min_period: Optional[int] = None):
        if name not in TASKS:
            raise ValueError(f"task: expected one of {TASKS} or a text file, got {name!r}")
        self.name = name
        self.n = _pos("n_symbols", n_symbols, 2)
        _pos("seq_len", seq_len, 4)
        if name in ("copy", "reverse", "sort"):
            self.L = seq_len // 2  # a (L) SEP f(a) (L): 2L + 1 tokens, 2L inputs
            self.seq_len = 2 * self.L
            self.vocab_size = self.n + 1
        elif name == "recall":
            self.P = (seq_len + 1) // 4  # 4P tokens, 4P - 1 inputs
            if self.P > self.n:
                raise ValueError(f"n_symbols: recall needs at least seq_len/4 = {self.P} distinct keys, got {self.n}")
            self.seq_len = 4 * self.P - 1
            self.vocab_size = 2 * self.n
        else:  # repeat
            self.period = _pos("period", period if period is not None else max(2, seq_len // 4), 2)
            if self.period >= seq_len:
                raise ValueError(f"period: expected fewer than seq_len={seq_len} tokens, got {self.period}")
            self.min_period = max(2, self.period // 2) if min_period is None else _pos("min_period", min_period, 2)
            if self.min_period > self.period:
                raise ValueError(f"min_period: expected at most period={self.period}, got {self.min_period}")
            self.seq_len = seq_len
            self.vocab_size = self.n

    def describe(self) -> dict:
        d = {"task": self.name, "seq_len": self.seq_len, "n_symbols": self.n}
        if self.name == "repeat":
            d["period"], d["min_period"] = self.period, self.min_period
        return d

    def batch(self, batch_size: int, generator: torch.Generator, split: str = "train") -> Tuple[Tensor, Tensor]:
        """(x, y), each (B, N). ``split`` is ignored: fresh random sequences are held out by construction."""
        B, g = _pos("batch_size", batch_size), generator
        if self.name in ("copy", "reverse", "sort"):
            a = torch.randint(0, self.n, (B, self.L), generator=g)  # (B, L)
            f = {"copy": lambda t: t, "reverse": lambda t: t.flip(1),
                 "sort": lambda t: t.sort(1).values}[self.name](a)
            s = torch.cat([a, torch.full((B, 1), self.n), f], 1)  # (B, 2L + 1)
            y = s[:, 1:].clone()
            y[:, :self.L] = IGNORE  # the first half is random: nothing to learn
        elif self.name == "recall":
            P = self.P
            keys = torch.argsort(torch.rand(B, self.n, generator=g), 1)[:, :P]  # (B, P) distinct keys
            vals = torch.randint(self.n, 2 * self.n, (B, P), generator=g)  # (B, P)
            order = torch.argsort(torch.rand(B, P, generator=g), 1)  # (B, P) the query order
            qk, qv = keys.gather(1, order), vals.gather(1, order)
            s = torch.cat([torch.stack([keys, vals], 2).reshape(B, 2 * P),
                           torch.stack([qk, qv], 2).reshape(B, 2 * P)], 1)  # (B, 4P)
            y = s[:, 1:].clone()
            scored = torch.zeros_like(y, dtype=torch.bool)
            scored[:, 2 * P::2] = True  # targets at inputs 2P, 2P+2, …: the value after each queried key
            y[~scored] = IGNORE
        else:
            r = torch.randint(0, self.n, (B, self.period), generator=g)  # (B, period)
            p = torch.randint(self.min_period, self.period + 1, (B, 1), generator=g)  # (B, 1) this row's period
            pos = torch.arange(self.seq_len + 1)[None, :]  # (1, N + 1)
            s = r.gather(1, (pos % p).expand(B, -1))  # (B, N + 1): r[:p] r[:p] r[:p] …
            y = s[:, 1:].clone()
            y[pos[:, 1:].expand(B, -1) < p] = IGNORE  # targets s[1..p-1]: still the first, random copy
        return s[:, :-1].contiguous(), y


class TextTask(Task):
    """Windows of a text, as bytes or as a tokenizer's ids; the last ``val_fraction`` of the ids is held out."""

    def __init__(self, path, seq_len: int, tokenizer=None, val_fraction: float = 0.1):
        _pos("seq_len", seq_len, 1)
        if not (0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{str(p)!r}: no such file" if not p.exists() else f"{str(p)!r}: not a file")
        size = os.path.getsize(p)
        if size > TEXT_MAX_BYTES:
            raise ValueError(f"{str(p)!r}: {size} bytes, above the {TEXT_MAX_BYTES}-byte limit for a training text")
        raw = p.read_bytes()
        self.name, self.path, self.seq_len = "text", str(p), seq_len
        self.tokenizer = None if tokenizer is None else str(tokenizer)
        if tokenizer is None:
            ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
            self.vocab_size = 256
        else:
            from tokenizers import Tokenizer
            try:
                tok = Tokenizer.from_file(str(tokenizer))
            except Exception as e:  # the tokenizers library raises its own exception type for a bad file
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ValueError(f"tokenizer: {str(tokenizer)!r} cannot be read ({first})") from None
            tok.no_truncation()  # tokenizer.json files often pin a model's input length: we want the whole text
            tok.no_padding()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{str(p)!r}: not UTF-8 text (byte {e.start}); a tokenizer needs text, drop "
                                 f"--tokenizer to train on the bytes") from None
            ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.int64)
            self.vocab_size = tok.get_vocab_size()
        n_val = int(len(ids) * val_fraction)
        self.train_ids, self.val_ids = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
        for split, t in (("training", self.train_ids), ("held-out", self.val_ids)):
            if len(t) < seq_len + 1:
                raise ValueError(f"{str(p)!r}: the {split} part has {len(t)} tokens, fewer than seq_len + 1 = "
                                 f"{seq_len + 1}; use a longer text or a shorter --seq-len")

    def describe(self) -> dict:
        return {"task": "text", "path": self.path, "tokenizer": self.tokenizer, "seq_len": self.seq_len,
                "train_tokens": len(self.train_ids), "val_tokens": len(self.val_ids)}

    def batch(self, batch_size: int, generator: torch.Generator, split: str = "train") -> Tuple[Tensor, Tensor]:
        ids = self.train_ids if split == "train" else self.val_ids
        start = torch.randint(0, len(ids) - self.seq_len, (_pos("batch_size", batch_size),), generator=generator)
        idx = start[:, None] + torch.arange(self.seq_len + 1)  # (B, N + 1)
        s = ids[idx]
        return s[:, :-1].contiguous(), s[:, 1:].contiguous()


def make_task(task: str, seq_len: int, *, n_symbols: int = 16, period: Optional[int] = None,
              min_period: Optional[int] = None, tokenizer=None, val_fraction: float = 0.1) -> Task:
    """A generated task by name (see TASKS) or, for any other string, a text file's path."""
    if not isinstance(task, (str, os.PathLike)):
        raise TypeError(f"task: expected a task name {TASKS} or a text file path, got {type(task).__name__}")
    if str(task) in TASKS:
        if tokenizer is not None:
            raise ValueError(f"tokenizer: only for a text file, not for the generated task {task!r}")
        return GeneratedTask(str(task), seq_len, n_symbols, period, min_period)
    return TextTask(task, seq_len, tokenizer, val_fraction)
