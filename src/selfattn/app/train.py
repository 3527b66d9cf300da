"""``selfattn train``: train a small GPT on selfattn's kernels (a generated task or a text file), with progress,
exact-resume checkpoints, the loss curve, and attention snapshots (grid PNG, HTML page with a step slider).

    selfattn train repeat --out run --no-mlp --symbols 64 --period 32 --min-period 4 --lr 3e-3 --warmup 100 \
        --init-std 0.1 --steps 1200 --snapshot-every 50 --threads 1     # the induction-head demo (~40 s)
    selfattn train notes.txt --out run2 --seq-len 128 --steps 2000       # bytes of a text, 10% held out
    selfattn train --resume run --steps 600                              # continue a run
    selfattn train repeat --out run3 --procs 2                           # data parallel over 2 processes

Errors (bad arguments, an unreadable file, a directory that is not a checkpoint) are one line on stderr and exit
status 2, raised before anything is written; checkpoints and pictures are written to a temporary file and renamed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> argparse.ArgumentParser:
    from ..train.tasks import TASKS
    p = sub.add_parser("train", help="train a small transformer on selfattn's kernels and watch its heads form",
                       description="Train a small GPT (selfattn.nn.Attention, native kernel forward and backward) on "
                                   f"a generated task ({', '.join(TASKS)}) or a text file, print progress, write "
                                   "checkpoint.safetensors (resumable exactly), loss.png and, with --snapshot-every, "
                                   "attention.png and training.html (attention across training).")
    p.add_argument("task", nargs="?", help=f"{' | '.join(TASKS)} | a text file (bytes, or --tokenizer)")
    p.add_argument("--out", metavar="DIR", help="run directory (created; must not hold a checkpoint yet)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its settings; --steps may extend it)")
    g = p.add_argument_group("data")
    g.add_argument("--seq-len", type=int, default=64, metavar="N")
    g.add_argument("--symbols", type=int, default=16, metavar="S", help="alphabet of generated tasks (default 16)")
    g.add_argument("--period", type=int, metavar="P", help="repeat: longest repeated sequence (default N/4)")
    g.add_argument("--min-period", type=int, metavar="P0", help="repeat: shortest (default P/2; P0 = P makes one "
                                                               "fixed look-back offset solve the task)")
    g.add_argument("--tokenizer", metavar="tokenizer.json", help="text: token ids instead of bytes")
    g.add_argument("--val-fraction", type=float, default=0.1, metavar="F", help="text: held-out tail (default 0.1)")
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, help="GQA: fewer key/value heads (default: --heads)")
    g.add_argument("--d-model", type=int, default=64)
    g.add_argument("--positions", choices=["rope", "learned"], default="rope")
    g.add_argument("--no-mlp", action="store_true", help="attention-only (where induction heads are clearest)")
    g.add_argument("--window", type=int, metavar="W", help="sliding-window causal attention of W keys")
    g.add_argument("--init-std", type=float, default=0.02, metavar="S",
                   help="std of the linear layers' initial weights (default 0.02, GPT-2's; ~1/sqrt(d-model) makes "
                        "a tiny model leave its initial plateau sooner)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, help="training steps (default 1000; with --resume: the run's own)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--warmup", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, metavar="T", help="torch CPU threads (default: torch's)")
    g.add_argument("--procs", type=int, default=1, metavar="P",
                   help="data parallel over P processes (torch.distributed, gloo); each takes batch/P rows and "
                        "threads/P threads")
    g = p.add_argument_group("reporting")
    g.add_argument("--eval-every", type=int, default=100, metavar="K")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="(default: at the end only)")
    g.add_argument("--snapshot-every", type=int, default=0, metavar="K",
                   help="detector scores and head patterns every K steps (grid PNG + HTML page)")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)
    return p


def _config(args):
    from ..train import TrainConfig
    if args.task is None:
        raise ValueError("task: give a task (copy, reverse, sort, recall, repeat) or a text file, or --resume DIR")
    if args.out is None:
        raise ValueError("--out: give a run directory for the checkpoint and pictures")
    steps = 1000 if args.steps is None else args.steps
    return TrainConfig(task=args.task, seq_len=args.seq_len, n_symbols=args.symbols, period=args.period,
                       min_period=args.min_period,
                       tokenizer=args.tokenizer, val_fraction=args.val_fraction, n_layer=args.layers,
                       n_head=args.heads, n_kv_head=args.kv_heads, d_model=args.d_model, positions=args.positions,
                       mlp=not args.no_mlp, window=args.window, init_std=args.init_std, steps=steps,
                       batch_size=args.batch_size, lr=args.lr,
                       warmup=args.warmup, seed=args.seed, procs=args.procs, eval_every=args.eval_every,
                       checkpoint_every=args.checkpoint_every, snapshot_every=args.snapshot_every)


def run(args) -> int:
    import torch
    from ..train import resume, train
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.resume is not None:
        if args.task is not None or args.out is not None:
            raise ValueError("--resume: continues a run with its own task and directory; drop the task and --out")
        res = resume(args.resume, steps=args.steps, progress=not args.quiet)
    else:
        c = _config(args)
        from ..train.tasks import make_task
        task = make_task(c.task, c.seq_len, n_symbols=c.n_symbols, period=c.period, min_period=c.min_period,
                         tokenizer=c.tokenizer,
                         val_fraction=c.val_fraction)  # file and model errors before the directory is made
        c.model_config(task.vocab_size, task.seq_len)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {args.out}: exists and is not a directory")
        if not out.parent.is_dir() and str(out.parent):
            raise ValueError(f"--out {args.out}: directory {str(out.parent)!r} does not exist")
        res = train(c, out, progress=not args.quiet)
    _report(res)
    return 0


def _report(res) -> None:
    from ..inspect.heads import DETECTORS
    c = res.config
    held = f", held-out {res.evals[-1][1]:.4f}" if res.evals else ""
    print(f"{c.task}: {res.step} steps, loss {res.losses[-1]:.4f}{held}; {res.tokens_per_s:,.0f} tokens/s "
          f"({res.seconds:.1f} s this run)")
    if res.snapshots:
        last = res.snapshots[-1]
        found = []
        for d_i, d in enumerate(DETECTORS[:3]):  # the mechanisms training creates: previous-token, induction, dup
            hs = [(l, h, s[d_i]) for l, layer in enumerate(last.scores) for h, s in enumerate(layer)
                  if s[d_i] is not None and s[d_i] > 0.4]
            found.append(f"{d}: " + (", ".join(f"{l}.{h} ({v:.2f})" for l, h, v in hs) if hs else "none"))
        print(f"heads at step {last.step} (score > 0.4): " + "; ".join(found))
    for name in ("checkpoint.safetensors", "loss.png", "attention.png", "training.html"):
        f = res.out / name
        if f.exists():
            print(f"wrote {f}")
    sys.stdout.flush()
