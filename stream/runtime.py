"""Process-wide tuning for the long-running hot loops (daemon, replay, bench)."""

from __future__ import annotations

import gc


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
