"""Process-wide tuning for the long-running hot loops (daemon, replay, bench)."""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch


def tune_garbage_collector() -> None:
    """Keep Python's cyclic garbage collector out of the hot loop.

    Importing torch and loading the model leaves ~10^5 long-lived container objects, and every
    full collection walks all of them, while a batch allocates enough short-lived ones to
    trigger several collections. So: collect once, freeze what exists (start-up objects are never
    garbage), and let the young generation grow larger before it is collected. Measured in-process
    (300k generated events, 5000 per batch, 2-core CPU): 58k -> 87k events/s.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers' cpusets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block's torch kernels on `n` threads, then go back (switching costs well under 1 us)."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
