"""Feature hashing of ids and queries: memoised per distinct value, and the same tokens however values arrive."""

from __future__ import annotations

import numpy as np

from models.features import _crc, _mix_to_buckets, query_terms, query_tokens
from stream.memo import map_memoised_all


def test_each_distinct_miss_is_computed_once_in_first_seen_order():
    memo: dict = {}
    calls: list[list[str]] = []

    def compute_all(missing: list[str]) -> list[int]:
        calls.append(missing)
        return [len(v) for v in missing]

    assert map_memoised_all(memo, ["bb", "a", "bb", "ccc", "a"], compute_all) == [2, 1, 2, 3, 1]
    assert map_memoised_all(memo, ["a", "dddd", "ccc"], compute_all) == [1, 4, 3]
    assert map_memoised_all(memo, ["dddd", "bb"], compute_all) == [4, 2]
    assert calls == [["bb", "a", "ccc"], ["dddd"]]  # one call per batch with misses, none without


def test_query_tokens_are_each_querys_own_terms_however_the_queries_arrive():
    """A query's tokens are its terms hashed alone, whether it is new in a batch with other new ones,
    repeated within it, seen in an earlier batch, or absent (None, or no words)."""
    buckets, salt = 512, 9_001  # a table of its own
    queries = ["Red shoes", None, "red shoes", "tent", "Red shoes", "", "!!", "sleeping bag ü", "tent", "x" * 40]

    def own(query: str | None) -> list[int]:
        terms = query_terms(query) if query else []
        raw = np.array([_crc(t, salt) for t in terms], dtype=np.uint64)
        return _mix_to_buckets(raw, buckets).tolist()

    first, later = queries[:6], queries[6:] + queries[:3]
    for batch in (first, later):
        tokens, offsets = query_tokens(np.array(batch, dtype=object), buckets, salt)
        ends = [*offsets[1:].tolist(), len(tokens)]
        assert [tokens[a:b].tolist() for a, b in zip(offsets.tolist(), ends)] == [own(q) for q in batch]
