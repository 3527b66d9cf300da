"""The training loop: AdamW on a small GPT through selfattn's kernels, checkpoints that resume exactly.

    from selfattn.train import TrainConfig, train, resume
    run = train(TrainConfig(task="repeat", steps=600), out="run1")   # run1/checkpoint.safetensors, loss.png, ...
    run = resume("run1", steps=1000)                                  # continues where it stopped

Exact resume: a checkpoint holds the model, AdamW's moments and step, the data generator's state, the step and
every loss so far. The learning rate is a pure function of the step, evaluation and snapshots draw from their own
fixed generators, and the kernels are deterministic, so a run stopped at step s and resumed reproduces the
uninterrupted run's losses bit for bit (same machine, same thread count).

Checkpoints are written to a temporary file beside the target and renamed into place: an interrupted run never
leaves a half-written checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from ..extras import need
from ..inspect.files import atomic_write
from .model import GPT, GPTConfig
from .tasks import IGNORE, Task, make_task

__all__ = ["TrainConfig", "TrainResult", "train", "resume", "load_checkpoint", "CHECKPOINT", "FORMAT"]

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "selfattn-train/1"


@dataclass(frozen=True)
class TrainConfig:
    # data
    task: str = "repeat"  # copy | reverse | sort | recall | repeat, or a text file's path
    seq_len: int = 64
    n_symbols: int = 16  # generated tasks' alphabet
    period: Optional[int] = None  # repeat: longest repeated random sequence (default seq_len // 4)
    min_period: Optional[int] = None  # repeat: shortest (default period // 2; = period: one fixed offset solves it)
    tokenizer: Optional[str] = None  # text: a tokenizer.json (default: the file's bytes)
    val_fraction: float = 0.1  # text: the held-out tail
    # model
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: Optional[int] = None
    d_model: int = 64
    positions: str = "rope"
    mlp: bool = True
    window: Optional[int] = None
    init_std: float = 0.02  # linear layers' initial std (GPTConfig.init_std; 0.1 for the induction demo at d=64)
    # optimization
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50  # linear warm-up steps, then cosine decay to lr / 10 at the last step
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    procs: int = 1  # data parallel over this many processes (torch.distributed, gloo): each takes batch_size/procs
    # reporting
    eval_every: int = 100  # held-out loss every this many steps (0 = only at the end)
    eval_batches: int = 4
    checkpoint_every: int = 0  # 0 = only at the end (and at stop_at)
    snapshot_every: int = 0  # attention snapshots for the page and grid (0 = none)
    snapshot_heads: Optional[tuple] = None  # ((layer, head), ...) whose patterns are kept; None = every head

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_batches", "procs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("warmup", "eval_every", "checkpoint_every", "snapshot_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 \
                    or (name == "lr" and v == 0):
                raise ValueError(f"{name}: expected a {'positive' if name == 'lr' else 'non-negative'} number, "
                                 f"got {v!r}")
        if self.batch_size % self.procs:
            raise ValueError(f"procs: batch_size={self.batch_size} must split evenly over procs={self.procs}")
        if self.snapshot_heads is not None:
            object.__setattr__(self, "snapshot_heads", tuple(tuple(int(x) for x in lh)
                                                             for lh in self.snapshot_heads))

    def model_config(self, vocab_size: int, seq_len: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head, n_kv_head=self.n_kv_head,
                         d_model=self.d_model, max_seq_len=max(seq_len, 1), positions=self.positions, mlp=self.mlp,
                         window=self.window, init_std=self.init_std)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("config: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}")
        return cls(**d)


@dataclass
class TrainResult:
    model: GPT
    config: TrainConfig
    task: Task
    step: int  # steps done
    losses: List[float]  # training loss of every step
    evals: List[tuple]  # (step, held-out loss)
    snapshots: list  # selfattn.train.snapshots.Snapshot, in step order
    out: Optional[Path]
    seconds: float  # wall time of this call's training steps
    tokens_per_s: float


def lr_at(c: TrainConfig, step: int) -> float:
    """Warm-up then cosine decay to lr/10: a function of the step alone, so a resumed run gets the same rates."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    t = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _loss(model: GPT, x, y) -> torch.Tensor:
    logits = model(x)  # (B, N, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model: GPT, task: Task, c: TrainConfig) -> float:
    """Held-out loss over ``eval_batches`` batches from a fixed generator (the same batches every time)."""
    g = torch.Generator().manual_seed(c.seed + 1_000_003)
    was = model.training
    model.eval()
    tot = 0.0
    for _ in range(c.eval_batches):
        x, y = task.batch(c.batch_size, g, split="val")
        tot += float(_loss(model, x, y))
    model.train(was)
    return tot / c.eval_batches


def _optimizer(model: GPT, c: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # matrices decay; norms and biases do not
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=c.lr, betas=(0.9, 0.95), foreach=False)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------
def save_checkpoint(out: Path, model: GPT, opt: torch.optim.Optimizer, gen: torch.Generator, c: TrainConfig,
                    step: int, losses: List[float], evals: List[tuple]) -> Path:
    save = need("safetensors.torch", "models", "saving a training checkpoint").save

    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    params = [p for grp in opt.param_groups for p in grp["params"]]
    for i, p in enumerate(params):
        st = opt.state.get(p, {})
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous().clone()
    tensors["rng.data"] = gen.get_state()
    meta = {"format": FORMAT, "config": c.to_json(), "step": str(step), "losses": json.dumps(losses),
            "evals": json.dumps(evals)}
    path = out / CHECKPOINT
    atomic_write(path, save(tensors, metadata=meta))
    return path


def load_checkpoint(path):
    """A checkpoint directory (or its checkpoint.safetensors) -> (config, tensors, step, losses, evals).
    Raises ValueError (one line) for anything that is not a selfattn training checkpoint."""
    safe_open = need("safetensors", "models", "reading a training checkpoint").safe_open

    p = Path(path)
    f = p / CHECKPOINT if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r}: no such file or directory")
    if not f.is_file():
        raise ValueError(f"{str(p)!r}: not a training checkpoint (no {CHECKPOINT} in this directory)")
    try:
        with safe_open(str(f), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{str(f)!r}: not a selfattn training checkpoint (format {meta.get('format')!r}, "
                                 f"expected {FORMAT!r})")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        config = TrainConfig.from_json(meta["config"])
        step = int(meta["step"])
        losses = [float(x) for x in json.loads(meta["losses"])]
        evals = [tuple(e) for e in json.loads(meta["evals"])]
    except ValueError:
        raise
    except Exception as e:  # safetensors' own errors, bad JSON, missing keys: all mean "not a checkpoint"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"{str(f)!r}: not a readable training checkpoint ({first})") from None
    if len(losses) != step:
        raise ValueError(f"{str(f)!r}: damaged checkpoint ({len(losses)} losses for step {step})")
    return config, tensors, step, losses, evals


def _restore(model: GPT, opt: torch.optim.Optimizer, gen: torch.Generator, tensors: dict, where: str) -> None:
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing = sorted(set(model.state_dict()) - set(sd))
    if missing:
        raise ValueError(f"{where}: damaged checkpoint (missing {missing[:3]})")
    model.load_state_dict(sd)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    state = {}
    for i in range(len(params)):
        st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{i}.")}
        if st:
            state[i] = st
    sd_opt = opt.state_dict()
    sd_opt["state"] = state
    opt.load_state_dict(sd_opt)
    gen.set_state(tensors["rng.data"])


# ---------------------------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------------------------
class Progress:
    """One line: step, loss, tokens/s, ETA. Rewritten in place on a terminal, a line every ``every`` steps else."""

    def __init__(self, total: int, start: int, stream=None, every: int = 50, enabled: bool = True):
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def update(self, step: int, loss: float, tokens: int, extra: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step - self.start
        if not (step == self.total or (self.tty and now - self.last > 0.2) or (not self.tty and step % self.every == 0)):
            return
        self.last = now
        el = now - self.t0
        tps = tokens / el if el > 0 else 0.0
        eta = el / done * (self.total - step) if done else 0.0
        line = (f"step {step}/{self.total}  loss {loss:.4f}  {tps:,.0f} tok/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}{extra}")
        if self.tty:
            self.stream.write("\r" + line.ljust(78) + ("\n" if step == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------
def _allreduce_grads(model: GPT, world: int) -> None:
    """Average the gradients over the data-parallel group: one flat buffer, one all-reduce."""
    import torch.distributed as dist
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    i = 0
    for g in grads:
        g.copy_(flat[i:i + g.numel()].view_as(g))
        i += g.numel()


def _run(c: TrainConfig, out: Optional[Path], start: Optional[tuple], stop_at: Optional[int], progress: bool,
         stream=None, rank: int = 0, world: int = 1) -> TrainResult:
    from .snapshots import Snapshotter, load_snapshots, write_outputs

    task = make_task(c.task, c.seq_len, n_symbols=c.n_symbols, period=c.period, min_period=c.min_period,
                     tokenizer=c.tokenizer,
                     val_fraction=c.val_fraction)
    with torch.random.fork_rng(devices=[]):  # model init from the seed without touching the caller's RNG
        torch.manual_seed(c.seed)
        model = GPT(c.model_config(task.vocab_size, task.seq_len))
    opt = _optimizer(model, c)
    gen = torch.Generator().manual_seed(c.seed)
    step, losses, evals, snaps = 0, [], [], []
    if start is not None:
        tensors, step, losses, evals = start
        _restore(model, opt, gen, tensors, str(out))
        snaps = [s for s in load_snapshots(out) if s.step <= step] if out is not None else []
    end = c.steps if stop_at is None else min(c.steps, stop_at)
    lead = rank == 0  # rank 0 alone evaluates, snapshots, reports and writes; the model is the same on every rank
    if not lead:
        out = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    shooter = Snapshotter(model, task, c) if c.snapshot_every and lead else None
    if shooter is not None and step == 0 and not snaps:
        snaps.append(shooter.take(0, None))
    bar = Progress(end, step, stream, enabled=progress and lead)
    b = c.batch_size // world
    model.train()
    t0, tok0 = time.perf_counter(), 0
    while step < end:
        x, y = task.batch(c.batch_size, gen)  # every rank draws the global batch (generators stay equal) ...
        if world > 1:
            x, y = x[rank * b:(rank + 1) * b], y[rank * b:(rank + 1) * b]  # ... and trains on its own slice
        for grp in opt.param_groups:
            grp["lr"] = lr_at(c, step)
        loss = _loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            import torch.distributed as dist
            _allreduce_grads(model, world)
            loss = loss.detach().clone()
            dist.all_reduce(loss)  # every task scores the same positions in every row: the mean of rank means
            loss /= world
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.detach().item())
        tok0 += x.numel() * world
        extra = ""
        if lead and ((c.eval_every and step % c.eval_every == 0) or step == c.steps):
            evals.append((step, evaluate(model, task, c)))
            extra = f"  held-out {evals[-1][1]:.4f}"
        if shooter is not None and (step % c.snapshot_every == 0 or step == c.steps):
            snaps.append(shooter.take(step, losses[-1]))
        bar.update(step, losses[-1], tok0, extra)
        if out is not None and c.checkpoint_every and step % c.checkpoint_every == 0 and step < end:
            save_checkpoint(out, model, opt, gen, c, step, losses, evals)
    seconds = time.perf_counter() - t0
    if out is not None:
        save_checkpoint(out, model, opt, gen, c, step, losses, evals)
        write_outputs(out, c, losses, evals, snaps, step)
    return TrainResult(model, c, task, step, losses, evals, snaps, out, seconds, tok0 / seconds if seconds else 0.0)


def train(config: TrainConfig, out=None, *, stop_at: Optional[int] = None, progress: bool = True,
          stream=None) -> TrainResult:
    """Train from scratch. out: a directory for checkpoint.safetensors, loss.png and (with snapshots)
    snapshots.json, attention.png and training.html; None keeps everything in memory. stop_at: stop (and
    checkpoint) after this many steps, as if interrupted there; ``resume`` continues."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a selfattn.train.TrainConfig, got {type(config).__name__}")
    o = None
    if out is not None:
        o = Path(out)
        if o.exists() and not o.is_dir():
            raise ValueError(f"out: {str(o)!r} exists and is not a directory")
        if (o / CHECKPOINT).exists():
            raise ValueError(f"out: {str(o)!r} already holds a checkpoint; resume it or choose another directory")
        if not o.parent.is_dir():
            raise FileNotFoundError(f"out: directory {str(o.parent)!r} does not exist")
    if stop_at is not None and (isinstance(stop_at, bool) or not isinstance(stop_at, int) or stop_at < 0):
        raise ValueError(f"stop_at: expected an int >= 0, got {stop_at!r}")
    if config.procs > 1:
        return _launch(config, o, False, stop_at, progress)
    return _run(config, o, None, stop_at, progress, stream)


def resume(path, *, steps: Optional[int] = None, stop_at: Optional[int] = None, progress: bool = True,
           stream=None) -> TrainResult:
    """Continue the run saved in directory ``path`` up to its configured steps (or ``steps``: a longer run; the
    learning-rate schedule then stretches, so the losses differ from a run configured that long from the start)."""
    config, tensors, step, losses, evals = load_checkpoint(path)
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{str(p)!r}: resume a checkpoint directory, not a file")
    if steps is not None:
        config = dataclasses.replace(config, steps=steps)
    if step > config.steps:
        raise ValueError(f"steps: the checkpoint is at step {step}, past steps={config.steps}")
    if config.procs > 1:
        return _launch(config, p, True, stop_at, progress)
    return _run(config, p, (tensors, step, losses, evals), stop_at, progress, stream)


# ---------------------------------------------------------------------------------------------------------------
# Data parallel: one process per rank (gloo on this machine); rank 0 writes the run directory, the caller reads it
# ---------------------------------------------------------------------------------------------------------------
def _worker(rank: int, world: int, port: int, c: TrainConfig, out: Path, resumed: bool, stop_at, progress: bool,
            threads: int, q) -> None:
    import torch.distributed as dist
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        start = None
        if resumed:
            _, tensors, step, losses, evals = load_checkpoint(out)
            start = (tensors, step, losses, evals)
        res = _run(c, out, start, stop_at, progress, rank=rank, world=world)
        if rank == 0:
            q.put((res.seconds, res.tokens_per_s))
    finally:
        dist.destroy_process_group()


def _launch(c: TrainConfig, out: Optional[Path], resumed: bool, stop_at, progress: bool) -> TrainResult:
    import socket
    import torch.multiprocessing as mp
    from .snapshots import load_snapshots
    if out is None:
        raise ValueError(f"out: a run over procs={c.procs} processes needs a directory (rank 0 writes the run there)")
    task = make_task(c.task, c.seq_len, n_symbols=c.n_symbols, period=c.period, min_period=c.min_period,
                     tokenizer=c.tokenizer,
                     val_fraction=c.val_fraction)  # bad data or model settings fail here, once, not in every rank
    c.model_config(task.vocab_size, task.seq_len)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    q = mp.get_context(method).SimpleQueue()
    threads = max(1, torch.get_num_threads() // c.procs)  # the ranks share the cores instead of each taking all
    mp.start_processes(_worker, args=(c.procs, port, c, out, resumed, stop_at, progress, threads, q),
                       nprocs=c.procs, start_method=method)
    seconds, tps = q.get()
    model, _ = from_checkpoint(out)
    _, _, step, losses, evals = load_checkpoint(out)
    return TrainResult(model, c, task, step, losses, evals, load_snapshots(out), out, seconds, tps)


def from_checkpoint(path):
    """The trained model (eval mode) and its TrainConfig from a checkpoint directory."""
    config, tensors, step, losses, evals = load_checkpoint(path)
    task = None
    if config.task in ("copy", "reverse", "sort", "recall", "repeat"):  # a text file need not be read again
        task = make_task(config.task, config.seq_len, n_symbols=config.n_symbols, period=config.period,
                         min_period=config.min_period)
    vocab = task.vocab_size if task is not None else int(tensors["model.tok_emb.weight"].shape[0])
    seq = task.seq_len if task is not None else config.seq_len
    model = GPT(config.model_config(vocab, seq))
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(sd)
    return model.eval(), config
