"""Memoised mapping over whole columns: ids, queries and user names repeat heavily in event streams."""

from __future__ import annotations

from itertools import compress, repeat
from operator import is_
from typing import Callable, Iterable, Sequence


def map_memoised(memo: dict, values: Sequence, compute: Callable) -> list:
    """[memo[v] for v in values], computing each missing value once and remembering it.
    The lookups run in C (map); only distinct misses reach Python. `memo` must not hold None values."""
    return map_memoised_all(memo, values, lambda missing: map(compute, missing))


def map_memoised_all(memo: dict, values: Sequence, compute_all: Callable[[list], Iterable]) -> list:
    """map_memoised, where one call computes every distinct missing value: compute_all(misses) gives their
    results in order. For work with a fixed cost per call (numpy), paid once per batch instead of per value."""
    found = list(map(memo.get, values))
    if None in found:
        # The misses, found in C too: a batch with one new id must not pay a Python loop over all of it.
        missing = list(dict.fromkeys(compress(values, map(is_, found, repeat(None)))))
        memo.update(zip(missing, compute_all(missing)))
        found = list(map(memo.__getitem__, values))
    return found
