"""The runtime the torch-op kernels run on: work items on parallel Python threads, one intra-op thread each.

torch releases the GIL inside its ops, so on a 2-core machine shared with other processes one barrier-free stream
of ops per core beats two-thread ops that wait for each other at every call (kernels/tiled.py's docstring gives
the numbers). Workers pull items from a shared list, so which thread runs what varies; kernels make every item's
result independent of that (bit-identical run to run). Each thread keeps its scratch buffers (``Workspace``)
between calls up to ``_KEEP_WORKSPACE`` bytes: fresh pages cost page faults. The pool is rebuilt when the thread
count changes, and dropped in a forked child (its threads do not exist there).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["Workspace", "run"]


class Workspace:
    """Per-thread scratch buffers, grown on demand, so that the tile loop allocates almost nothing."""

    def __init__(self, dtype, device):
        self.dtype, self.device, self.bufs = dtype, device, {}

    def get(self, name: str, n: int) -> Tensor:
        b = self.bufs.get(name)
        if b is None or b.numel() < n:
            b = torch.empty(max(n, 1), dtype=self.dtype, device=self.device)
            self.bufs[name] = b
        return b[:n]


_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()
_local = threading.local()


def _worker_init():
    torch.get_num_threads()  # first call initializes this thread's OpenMP/MKL settings from the global value...
    torch.set_num_threads(1)  # ...which is then overridden for this thread only (MKL: thread-local setting)
    _local.is_worker = True


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=True)
            main = torch.get_num_threads()
            _pool = ThreadPoolExecutor(n, initializer=_worker_init, thread_name_prefix="selfattn")
            barrier = threading.Barrier(n)
            list(_pool.map(lambda _: barrier.wait(), range(n)))  # start (and initialize) every worker now
            torch.set_num_threads(main)  # set_num_threads(1) above also wrote the process default: restore it
            _pool_size = n
        return _pool


def _reset_pool_after_fork():
    global _pool, _pool_size
    _pool, _pool_size = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool_after_fork)


_KEEP_WORKSPACE = 16 << 20  # bytes of scratch a thread keeps between calls (fresh pages cost page faults)


def _workspace(dtype, device, inference: bool) -> Workspace:
    cache = _local.__dict__.setdefault("ws", {})
    key = (dtype, str(device), inference)  # buffers made under inference_mode cannot be written outside it
    ws = cache.get(key)
    if ws is None:
        ws = cache[key] = Workspace(dtype, device)
    return ws


def _release_workspace(ws: Workspace):
    if sum(b.numel() * b.element_size() for b in ws.bufs.values()) > _KEEP_WORKSPACE:
        ws.bufs.clear()


def run(items: list, fn: Callable[[object, Workspace], None], dtype, device):
    """fn(item, workspace) for every item, on torch.get_num_threads() threads (inline when that is 1, on a
    worker thread already, or off the CPU)."""
    n = min(torch.get_num_threads(), len(items))
    inference = torch.is_inference_mode_enabled()
    if n <= 1 or getattr(_local, "is_worker", False) or device.type != "cpu":
        ws = Workspace(dtype, device)  # the caller's thread keeps nothing
        with torch.no_grad():
            for it in items:
                fn(it, ws)
        return
    it_iter = iter(items)
    lock = threading.Lock()

    def work(_):
        ws = _workspace(dtype, device, inference)
        try:
            _work(ws)
        finally:
            _release_workspace(ws)

    def _work(ws):
        with torch.inference_mode(inference), torch.no_grad():
            while True:
                with lock:
                    it = next(it_iter, None)
                if it is None:
                    return
                fn(it, ws)

    list(_get_pool(n).map(work, range(n)))
