"""Memoised mapping over whole columns: ids, queries and user names repeat heavily in event streams."""

from __future__ import annotations

from itertools import compress, repeat
from operator import is_
from typing import Callable, Sequence


def map_memoised(memo: dict, values: Sequence, compute: Callable) -> list:
    """[memo[v] for v in values], computing each missing value once and remembering it.
    The lookups run in C (map); only distinct misses reach Python. `memo` must not hold None values."""
    found = list(map(memo.get, values))
    if None in found:
        # The misses, found in C too: a batch with one new id must not pay a Python loop over all of it.
        for value in set(compress(values, map(is_, found, repeat(None)))):
            memo[value] = compute(value)
        found = list(map(memo.__getitem__, values))
    return found
