"""Agreement across ranks before the first collective: every rank's local verdict, call description and random
seed in one ``all_gather``, so that misuse or disagreement fails *every* rank with the rank and the difference
named -- never a hang in a later transfer, never a silently mixed result.

What each rank contributes (one fixed-size int64 tensor, so that ranks whose calls differ still exchange the same
number of bytes):

* ``fields``: named integers that must be equal everywhere (shapes, dtype, layout, dropout, kernel, ...);
* the fingerprints of the mask and of the score modifiers: a digest of their lowering (atom kinds, integer
  parameters, the shapes, dtypes and bytes of every data tensor) with a short text to print when they differ;
* its verdict: None, or the text of the error its own validation raised (the rank raises that error itself after
  the exchange, its peers raise a ValueError that quotes it);
* its dropout seed (``validation.draw_seed``; rank 0's is taken everywhere).

Cost: one all_gather of 8·(len(fields) + 4) + TEXT_BYTES bytes per rank and a hash of the mask's data (the same
order as reading it once); no tensor data of q, k or v is read.
"""
from __future__ import annotations

import hashlib
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import masks as _masks

__all__ = ["agree", "as_mask", "call_fields", "Fingerprint", "mask_fingerprint", "mod_fingerprint",
           "TEXT_BYTES"]

# bytes of text each rank sends: its error, its mask's and its modifiers' descriptions (longer texts are cut)
_ERROR_BYTES, _DESC_BYTES = 512, 192
TEXT_BYTES = _ERROR_BYTES + 2 * _DESC_BYTES

class Fingerprint(NamedTuple):
    digest: int  # a signed int64 (0 for None)
    text: str  # a short description to print when ranks differ
    exact: bool  # True when the digest covers everything the mask reads (its lowering): a safe cache key


def _update(h, x) -> None:
    """Feed a value of a lowering (int, float, bool, str, None, tensor, tuple) into the hash, type-tagged."""
    if isinstance(x, Tensor):
        t = x.detach().contiguous().reshape(-1)
        h.update(f"T{tuple(x.shape)}{x.dtype}|".encode())
        h.update(t.view(torch.uint8).cpu().numpy().tobytes() if t.numel() else b"")
    elif isinstance(x, (tuple, list)):
        h.update(b"(")
        for y in x:
            _update(h, y)
        h.update(b")")
    else:
        h.update(f"{type(x).__name__}:{x!r}|".encode())


def _digest(h) -> int:
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def mask_fingerprint(mask, N: int) -> Fingerprint:
    """The digest of ``mask`` lowered for the whole N×N problem (kind, integer parameters and data of every atom,
    and the program combining them), and its repr. A mask without a lowering is described by its type and repr."""
    if mask is None:
        return Fingerprint(0, "None", True)
    h = hashlib.blake2b(digest_size=16)
    try:
        low = mask.lower(N, N, 0, 0)
        for a in low.atoms:
            _update(h, tuple(getattr(a, s) for s in type(a).__slots__))
        _update(h, tuple(low.program))
        exact = True
    except Exception:  # no lowering (a user's Mask subclass) or data that does not fit: its own check says why
        h = hashlib.blake2b(digest_size=16)
        _update(h, (type(mask).__qualname__, repr(mask)))
        exact = False
    return Fingerprint(_digest(h), _short(repr(mask)), exact)


def mod_fingerprint(mod) -> Fingerprint:
    """The digest of the (bound) score modifiers' lowering: kinds, parameters and tensors (ALiBi slopes, T5
    tables), and their repr. A modifier without a lowering is described by its type, repr and parameters."""
    if mod is None:
        return Fingerprint(0, "None", True)
    h = hashlib.blake2b(digest_size=16)
    try:
        ops = mod.lower()
    except Exception:
        ops = None
    if ops is None:
        _update(h, (type(mod).__qualname__, repr(mod), tuple(mod.parameters())))
    else:
        for op in ops:
            _update(h, (op.kind, tuple(sorted((k, v) for k, v in vars(op).items() if k != "kind"))))
    return Fingerprint(_digest(h), _short(repr(mod)), ops is not None)


def _pack(text: str, size: int) -> List[int]:
    b = text.encode("utf-8", "replace")[:size]
    b = b + bytes(size - len(b))
    return torch.frombuffer(bytearray(b), dtype=torch.int64).tolist()


def _unpack(words: Tensor) -> str:
    b = words.cpu().numpy().tobytes()
    return b.rstrip(b"\x00").decode("utf-8", "replace")


def agree(group, who: str, rank: int, P: int, fields: Sequence[Tuple[str, int]], mask_fp: Fingerprint,
          mod_fp: Fingerprint, error: Optional[BaseException], seed: int, device=None) -> int:
    """Exchange this rank's ``fields``, fingerprints, verdict and seed with every rank of ``group`` and raise on
    every rank when any rank failed or any two differ; else return rank 0's seed.

    Raises (the same decision on every rank, since every rank sees the same gathered table): a rank whose own
    validation failed re-raises its ``error``; every other rank raises ValueError "rank(s) [...] refused the call
    before any transfer" quoting the errors. Otherwise ValueError naming the ranks that differ from rank 0, the
    field (or "mask" / "score modifiers") and each rank's value."""
    nf = len(fields)
    head = [int(v) for _, v in fields] + [mask_fp[0], mod_fp[0], int(error is not None), int(seed)]
    text = _pack(f"{type(error).__name__}: {error}" if error is not None else "", _ERROR_BYTES)
    text += _pack(mask_fp[1], _DESC_BYTES) + _pack(mod_fp[1], _DESC_BYTES)
    mine = torch.tensor(head + text, dtype=torch.int64, device=device)  # NCCL: on the GPU
    allv = [torch.empty_like(mine) for _ in range(P)]
    try:
        dist.all_gather(allv, mine, group=group)
    except Exception as e:
        raise RuntimeError(f"{who}: rank {rank} of {P}: the agreement exchange before any transfer failed (did "
                           f"another rank raise, exit or skip this call?): {e}") from e
    rows = [t.cpu() for t in allv]
    heads = [r[:nf + 4].tolist() for r in rows]
    ew, dw = _ERROR_BYTES // 8, _DESC_BYTES // 8

    def txt(r: int, slot: int) -> str:
        start = nf + 4 + (0 if slot == 0 else ew + (slot - 1) * dw)
        return _unpack(rows[r][start:start + (ew if slot == 0 else dw)])

    failed = [r for r in range(P) if heads[r][nf + 2]]
    if failed:
        if error is not None:
            raise error
        quoted = "; ".join(f"rank {r}: {txt(r, 0)}" for r in failed)
        raise ValueError(f"{who}: rank(s) {failed} refused the call before any transfer ({quoted}); this is rank "
                         f"{rank}, which raises too so that no rank waits for the others")
    for i, (name, _) in enumerate(fields):
        bad = [r for r in range(P) if heads[r][i] != heads[0][i]]
        if bad:
            show = ", ".join(f"rank {r}: {heads[r][i]}" for r in range(P))
            raise ValueError(f"{who}: the ranks disagree: rank(s) {bad} differ from rank 0 in {name} ({show}); "
                             f"this is rank {rank}")
    for j, what in ((nf, "the mask"), (nf + 1, "the score modifiers")):
        bad = [r for r in range(P) if heads[r][j] != heads[0][j]]
        if bad:
            slot = 1 if j == nf else 2
            shown = [txt(r, slot) for r in [0] + bad]
            show = "; ".join(f"rank {r}: {t}" for r, t in zip([0] + bad, shown))
            if len(set(shown)) == 1:
                show += " -- the same kinds and parameters, different data (lengths, ids, values)"
            raise ValueError(f"{who}: the ranks disagree: rank(s) {bad} differ from rank 0 in {what} ({show}); "
                             f"every rank must pass the same {what[4:]} of the whole N×N problem (same kinds, "
                             f"parameters and data); this is rank {rank}")
    return int(heads[0][nf + 3])


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_CODES = {None: 0, "native": 1, "tiled": 2, "reference": 3, "decode": 4, "triton": 5}


def call_fields(q, k, v, *, layout: str, layouts: Sequence[str], dropout_p, scale, kernel, grad: bool,
                return_lse: bool = False) -> List[Tuple[str, int]]:
    """The named integers every rank of a sharded call must agree on (always the same list, so that every
    caller's exchange -- ring, Ulysses, a layer's refusal -- sends the same number of bytes). Never raises: what
    cannot be read (not a 4-dim tensor, an unknown kernel name) reads as -1, and that rank's own validation says
    why."""
    def dims(t, n):
        return list(t.shape) if isinstance(t, Tensor) and t.dim() == 4 else [-1] * n
    qs, ks, vs = dims(q, 4), dims(k, 4), dims(v, 4)
    dt = q.dtype if isinstance(q, Tensor) else None
    dp = -1
    if isinstance(dropout_p, (int, float)) and not isinstance(dropout_p, bool):
        dp = int(round(float(dropout_p) * 2 ** 30)) if abs(dropout_p) < 2 ** 32 else -2
    sc = -1
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        sc = int(torch.tensor(float(scale), dtype=torch.float64).view(torch.int64))  # the float's bits
    return [("B", qs[0]), ("Hq", qs[1]), ("Hkv", ks[1]), ("n (local length)", qs[2]), ("k's length", ks[2]),
            ("v's length", vs[2]), ("D", qs[3]), ("Dv", vs[3]),
            ("dtype (" + ", ".join(f"{i} {str(d)[6:]}" for i, d in enumerate(_DTYPES)) + ")",
             _DTYPES.index(dt) if dt in _DTYPES else -1),
            ("layout (" + ", ".join(f"{i} {n}" for i, n in enumerate(layouts)) + ")",
             list(layouts).index(layout) if layout in layouts else -1),
            ("dropout_p·2^30", dp), ("scale (float64 bits; -1 None)", sc),
            ("kernel (" + ", ".join(f"{c} {n}" for n, c in _KERNEL_CODES.items()) + ")",
             _KERNEL_CODES.get(kernel, -1) if isinstance(kernel, (str, type(None))) else -1),
            ("gradients (1: this call records a backward, which every rank must run)", int(bool(grad))),
            ("return_lse (Ulysses sends the LSE back by one more all-to-all)",
             int(return_lse) if isinstance(return_lse, bool) else -1)]


as_mask = _masks.as_mask  # None, a mask object or a bool tensor of the whole N×N problem -> a mask or None
