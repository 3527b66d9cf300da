"""Train a tiny Llama on one long sequence split across processes (context parallelism on CPU, gloo).

    torchrun --nproc-per-node 4 examples/context_parallel.py          # torchrun starts the 4 ranks
    python examples/context_parallel.py --procs 4                     # or this script spawns them (loopback gloo)
    python examples/context_parallel.py --procs 4 --seq 1024 --steps 2 --dtype float64   # a few seconds

Every rank holds 1/P of the 16k-token sequence (zigzag layout: rank r holds chunks r and 2P−1−r of 2P, so the
causal work is balanced), runs the whole model on its shard, and attention crosses the ranks by the ring
(``selfattn.distributed.ring_attention``). The loss is summed over tokens on each rank and all-reduced; the
gradients are all-reduced (``all_reduce_grads``), so every rank takes the step one process would. Rank 0 then
trains the same model (same seed) on the whole sequence in one process and prints both losses side by side
(``--no-reference`` skips that), and every rank's peak resident memory during training.

Peak memory is the kernel's RSS high-water mark (VmHWM), reset to the current RSS just before training by writing
5 to /proc/self/clear_refs (as selfattn.app.measure does): it counts the model, optimizer, activations and ring
buffers of this rank, plus the interpreter and torch (the "base" column, the RSS before training).

Shape legend: B batch (1), N global tokens, n = N/P tokens per rank, V vocabulary.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfattn import distributed as cp
from selfattn.models.llama import Llama, LlamaConfig

# small enough that 16k tokens x 3 steps, four ranks and the single-process reference take ~1-2 min on 2 cores;
# attention dominates (N² work), so heads x head_dim is what sets the time
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, rope_theta=100000.0)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------------------------
# memory: RSS high-water mark of this process, reset-able
# ---------------------------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM); 0 where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (False where the kernel does not allow it: the peak then includes
    whatever this process held before)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# data and training
# ---------------------------------------------------------------------------------------------------------------
def make_tokens(N: int, V: int, seed: int) -> torch.Tensor:
    """(1, N) ids of a noisy linear-congruential chain (next = 5·prev + 3 mod V, 10% replaced at random): a
    pattern the model learns within a few steps, so the loss visibly falls."""
    g = torch.Generator().manual_seed(seed)
    chain = [1]
    for _ in range(N - 1):  # plain ints: ~0.1 s per million tokens
        chain.append((5 * chain[-1] + 3) % V)
    ids = torch.tensor(chain, dtype=torch.int64)  # (N,)
    noise = torch.rand(N, generator=g) < 0.1
    ids[noise] = torch.randint(0, V, (int(noise.sum()),), generator=g)
    return ids[None]  # (1, N)


def build_model(seed: int, dtype) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**CONFIG)).to(dtype)


def warm_up(model, ids) -> None:
    """One forward+backward on a short prefix of this rank's ids, gradients dropped: thread pools, the native
    kernel's arena and lazily imported modules are then in the base RSS, not in the training peak. The training
    that follows is unchanged (no optimizer step)."""
    model(ids[:, :256]).float().sum().backward()  # every rank the same length: a valid (shorter) ring call
    model.zero_grad(set_to_none=True)


def train(model, ids, labels, steps: int, lr: float, group=None, layout: str = "zigzag"):
    """AdamW steps on the loss summed over tokens / token count; returns (losses, seconds per step, RSS before
    training). With a group, ids/labels are the full sequence and each rank trains on its shard. The RSS
    high-water mark is reset just before the first step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = int((labels != -100).sum())
    if group is not None:
        ids, labels = cp.shard_batch(ids, labels, group=group, layout=layout)  # (1, n) each
    warm_up(model, ids)
    base = _status("VmRSS")
    reset_peak()
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(ids)  # (1, n, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="sum") / total  # this rank's share of the global mean
        loss.backward()
        loss = loss.detach().clone()
        if group is not None:
            cp.all_reduce_grads(model, group)  # every rank: the gradient of the whole sequence's loss
            dist.all_reduce(loss, group=group)
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return losses, times, base


# ---------------------------------------------------------------------------------------------------------------
# one rank
# ---------------------------------------------------------------------------------------------------------------
def run_rank(args) -> None:
    rank, P = dist.get_rank(), dist.get_world_size()
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // P))  # P ranks share the cores; more threads only contend
    dtype = DTYPES[args.dtype]
    ids = make_tokens(args.seq, CONFIG["vocab_size"], args.seed)  # (1, N), the same on every rank
    labels = cp.next_token_labels(ids)  # shifted on the full sequence: a shard's last label lives on another rank
    model = cp.context_parallel(build_model(args.seed, dtype), layout=args.layout)
    exact = reset_peak()  # whether the kernel lets train() reset the peak
    losses, times, base = train(model, ids, labels, args.steps, args.lr, dist.group.WORLD, args.layout)
    mine = torch.tensor([_status("VmHWM"), base, sum(times)], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(P)]
    dist.all_gather(every, mine)
    ref = None
    if rank == 0 and not args.no_reference:
        torch.set_num_threads(cores)  # the other ranks wait in the barrier below
        ref_model = build_model(args.seed, dtype)
        ref_losses, ref_times, ref_base = train(ref_model, ids, labels, args.steps, args.lr)
        ref = dict(losses=ref_losses, peak=_status("VmHWM"), base=ref_base, seconds=sum(ref_times))
    dist.barrier()
    if rank == 0:
        report(args, P, losses, every, exact, ref, cores)


def report(args, P, losses, every, exact, ref, cores) -> None:
    mib = 2 ** 20
    n = args.seq // P
    print(f"tiny Llama {CONFIG}, {args.dtype}, AdamW lr {args.lr}, seed {args.seed}")
    print(f"N = {args.seq} tokens, P = {P} ranks ({args.layout}, causal): n = {n} tokens per rank; "
          f"{cores} CPU cores{' (oversubscribed)' if P > cores else ''}")
    print()
    print("step  loss (P ranks)      loss (1 process)    |diff|")
    for i, l in enumerate(losses):
        if ref is None:
            print(f"{i:4d}  {l:.12f}      (skipped)")
        else:
            r = ref["losses"][i]
            print(f"{i:4d}  {l:.12f}      {r:.12f}      {abs(l - r):.2e}")
    print()
    note = "" if exact else " (clear_refs refused: peaks include earlier use)"
    print(f"peak RSS during training{note}:")
    print("rank  peak MiB  base MiB  training MiB  seconds")
    for r, t in enumerate(every):
        peak, base, secs = t.tolist()
        print(f"{r:4d}  {peak / mib:8.1f}  {base / mib:8.1f}  {(peak - base) / mib:12.1f}  {secs:7.1f}")
    if ref is not None:
        print(f"   1 process: {ref['peak'] / mib:8.1f}  {ref['base'] / mib:8.1f}  "
              f"{(ref['peak'] - ref['base']) / mib:12.1f}  {ref['seconds']:7.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(P=P, seq=args.seq, dtype=args.dtype, losses=losses,
                           ref_losses=None if ref is None else ref["losses"],
                           peaks=[t[0].item() for t in every], bases=[t[1].item() for t in every],
                           ref_peak=None if ref is None else ref["peak"],
                           ref_base=None if ref is None else ref["base"]), f)


# ---------------------------------------------------------------------------------------------------------------
# start: under torchrun (env://), or spawn --procs processes on loopback
# ---------------------------------------------------------------------------------------------------------------
def _spawned(rank: int, P: int, port: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        run_rank(args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=4, help="processes to spawn when not under torchrun (default 4)")
    p.add_argument("--seq", type=int, default=16384, help="global sequence length N (a multiple of 2P)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=cp.LAYOUTS, default="zigzag")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--no-reference", action="store_true", help="skip the single-process run on rank 0")
    p.add_argument("--timeout", type=float, default=1800.0, help="process-group timeout, seconds")
    p.add_argument("--json", help="also write the losses and peaks to this file (rank 0)")
    args = p.parse_args(argv)
    if args.procs < 1:
        p.error(f"--procs: expected a positive number of processes, got {args.procs}")
    if args.steps < 1:
        p.error(f"--steps: expected at least 1, got {args.steps}")
    return p, args


def main(argv=None) -> int:
    p, args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun (or any env:// launcher)
        P = int(os.environ["WORLD_SIZE"])
    else:
        P = args.procs
    parts = 2 * P if args.layout == "zigzag" else P
    if args.seq % parts:
        p.error(f"--seq: {args.seq} is not a multiple of {parts} ({'2P' if args.layout == 'zigzag' else 'P'}, "
                f"P={P}, layout {args.layout})")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
        try:
            run_rank(args)
        finally:
            dist.destroy_process_group()
        return 0
    import torch.multiprocessing as mp
    mp.start_processes(_spawned, args=(P, _free_port(), args), nprocs=P, join=True, start_method="spawn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
