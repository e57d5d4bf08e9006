"""How many of this shop's users hold each category, learned from the users in state.

A user's own counts say which of its categories it prefers; they say nothing about a category it has
touched once, which in one shop is the one everybody comes back to and in another a curiosity. Which
is the shop's own, so a model trained elsewhere cannot know it. `HolderCounts` counts, for each
category key, the users of the table that hold it in one of their category slots (stream/statistics.py),
kept exactly as rows change, as `FollowCounts` (stream/follow.py) keeps what follows a purchase: a pure
function of the table, rebuilt after a restore, nothing written anywhere.

A profile reads each slot's category's holders among the other users, relative to the most held
category (1 for it): scale-free, so a shop with more users or more categories reads the same ranking.
"""

from __future__ import annotations

import numpy as np


class HolderCounts:
    """Users holding each category key in a slot, over the table's users."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}  # category key -> users holding it
        self._sorted: tuple[np.ndarray, np.ndarray, float] | None = None  # keys, counts, the largest count

    def rebuild(self, columns: dict[str, np.ndarray], n: int) -> None:
        self.counts = {}
        self.change(columns["cat_key"][:n], 1)

    def change(self, keys: np.ndarray, sign: int) -> None:
        """Add (sign 1) or remove (sign -1) the users whose slots hold `keys` ((n, K); 0: empty slot)."""
        keys = keys[keys > 0]
        if not len(keys):
            return
        distinct, n = np.unique(keys, return_counts=True)
        counts = self.counts
        for key, count in zip(distinct.tolist(), (sign * n).tolist()):
            left = counts.get(key, 0) + count
            if left:
                counts[key] = left
            else:
                del counts[key]
        self._sorted = None

    def replace(self, old: np.ndarray, new: np.ndarray) -> None:
        """Users whose slot keys went from `old` to `new` ((n, K) each; slots reorder as masses move,
        so only the users whose set of keys changed count again)."""
        changed = (np.sort(old, axis=1) != np.sort(new, axis=1)).any(axis=1)
        if changed.any():
            self.change(old[changed], -1)
            self.change(new[changed], 1)

    def popularity(self, keys: np.ndarray, held: np.ndarray) -> np.ndarray:
        """(U, C) float: each key's holders among the other users, relative to the most held category
        (0 for key 0). held: (U, C) whether the user itself holds the key (its own count is left out)."""
        if not self.counts:
            return np.zeros(keys.shape)
        if self._sorted is None:
            k = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            c = np.fromiter(self.counts.values(), dtype=np.float64, count=len(self.counts))
            order = np.argsort(k)
            self._sorted = (k[order], c[order], float(c.max()))
        sorted_keys, counts, most = self._sorted
        at = np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)
        found = (sorted_keys[at] == keys) & (keys > 0)
        return np.where(found, np.maximum(counts[at] - held, 0.0), 0.0) / most
