"""Event features: deterministic hashing of ids and query words, price and time scalars.

Hashing is crc32 (stable across processes and machines, unlike Python's salted
`hash`) followed by a 64-bit multiplicative mix so that neighbouring ids
("i0001", "i0002") spread over the buckets. Bucket 0 is reserved for "absent",
so an unseen or missing id never fails: it just lands in some bucket.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from models.catalogue import ItemCatalogue
from stream.memo import map_memoised_all
from stream.statistics import float32_columns

_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier (Fibonacci hashing)
_WORD = re.compile(r"\w+")
MAX_QUERY_WORDS = 8  # longer queries are cut: the first words carry the intent

# Price buckets: log-spaced edges from 1 to ~100k currency units.
PRICE_EDGES = np.array([0.5, 1, 2, 5, 10, 20, 35, 50, 75, 100, 200, 500, 1000, 5000, 20000], dtype=np.float64)


# Memo of ids' raw hashes per salt: ids repeat heavily in event streams, so after warm-up a lookup
# replaces the encode + crc32 (queries have their own table, _QueryTable). Pure memoisation (same answers),
# bounded by clearing.
_MEMO_MAX = 2_000_000
_id_memos: dict[int, dict] = {}


def _id_memo(salt: int) -> dict:
    memo = _id_memos.get(salt)
    if memo is None or len(memo) > _MEMO_MAX:
        memo = _id_memos[salt] = {None: 0}  # no id: raw hash 0
    return memo


def _crc(value: str, salt: int) -> int:
    return zlib.crc32(value.encode("utf-8", "surrogatepass"), salt) + 1


def _raw_hashes(values: np.ndarray | list, salt: int) -> np.ndarray:
    """(N,) uint64 raw hash of each id (crc32 + 1; None: 0), each distinct new id hashed once, in C."""
    raw = map_memoised_all(_id_memo(salt), values, lambda missing: map(_crc, missing, itertools.repeat(salt)))
    return np.fromiter(raw, dtype=np.uint64, count=len(raw))


def hash_buckets(values: np.ndarray | list, buckets: int, salt: int) -> np.ndarray:
    """Map strings (None = absent) to buckets 1..buckets-1, deterministically; None -> 0."""
    return _mix_to_buckets(_raw_hashes(values, salt), buckets)


def item_hashes(item_id: np.ndarray | list, salt: int) -> np.ndarray:
    """(N,) uint64 raw hash of each item id (0: none): what an item catalogue (models/catalogue.py) holds."""
    return _raw_hashes(item_id, salt)


def item_inputs(item_id: np.ndarray, category_key: np.ndarray, buckets: int, salt: int, rows: np.ndarray,
                catalogue: ItemCatalogue | None) -> tuple[np.ndarray, np.ndarray]:
    """(N,) item bucket and (N,) vocabulary row (-1: none) of each event as the model reads it, from its rows in the
    vocabulary (vocab_rows): the item read as unknown (bucket 0, row -1) where the model's catalogue does not know
    it in the event's category. Every path that feeds the model an item (training, serving, evaluation) reads it
    here; `rows` is left as it is (training's next-item targets are the items themselves)."""
    raw = _raw_hashes(item_id, salt)
    bucket = _mix_to_buckets(raw, buckets)
    if catalogue is None:
        return bucket, rows
    unknown = ~catalogue.known(raw, category_key)
    bucket[unknown] = 0
    return bucket, np.where(unknown, -1, rows)


# A category's key: its raw hash (crc32 + 1, 1..2**32; 0: no category) in 32 bits. The state names and
# ranks a user's categories by key, exactly where two categories share one of the model's buckets (40
# categories in 1,024 buckets collide with even odds); the model reads the key's bucket.
CATEGORY_KEY_MAX = 0xFFFFFFFF


def category_keys(values: np.ndarray | list, salt: int) -> np.ndarray:
    """(N,) uint32 key of each category string (None: 0). Its bucket is buckets_of_keys(key): the same as
    hash_buckets(value) but for the one crc32 value in 2**32 whose raw hash does not fit (it shares a key)."""
    return np.minimum(_raw_hashes(values, salt), CATEGORY_KEY_MAX).astype(np.uint32)


def category_keys_and_buckets(values: np.ndarray | list, buckets: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, buckets) of each category string: its key (category_keys) and the model's bucket of that key.
    Every path that feeds the model a category (training, serving, evaluation) buckets it this way, from
    one hash per value."""
    keys = category_keys(values, salt)
    return keys, buckets_of_keys(keys, buckets)


def buckets_of_keys(keys: np.ndarray, buckets: int) -> np.ndarray:
    """The model's category bucket (1..buckets-1; 0 for key 0) of each category key."""
    return _mix_to_buckets(np.asarray(keys, dtype=np.uint64), buckets)


def _mix_to_buckets(raw: np.ndarray, buckets: int) -> np.ndarray:
    absent = raw == 0
    with np.errstate(over="ignore"):
        mixed = (raw * _MIX) >> np.uint64(32)
    out = (mixed % np.uint64(buckets - 1)).astype(np.int64) + 1
    out[absent] = 0
    return out


def query_terms(query: str) -> list[str]:
    """Lower-cased words, plus character trigrams of each word framed by '#' (so "shoes" and
    "shoe" share most of their terms: typos and inflections land near each other)."""
    words = _WORD.findall(query.lower())[:MAX_QUERY_WORDS]
    grams = [f"#{w}#"[i:i + 3] for w in words for i in range(len(w))]
    return words + ["\x00" + g for g in grams]  # prefix: a trigram never hashes like a 3-letter word


def ragged_take(flat: np.ndarray, begin: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs flat[begin[i]:begin[i] + lengths[i]] laid end to end, in one gather, and where each starts in the
    result (offsets): position j of run i comes from begin[i] + (j - offsets[i])."""
    offsets = np.zeros(len(begin), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    return flat[np.repeat(begin - offsets, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)], offsets


class _QueryTable:
    """Each distinct query's bucketed terms, stored once in one flat array: a batch's tokens are then one
    gather over it (numpy), not a Python pass over every term of every search in the batch."""

    def __init__(self, buckets: int, salt: int) -> None:
        self.buckets, self.salt = buckets, salt
        self.ids: dict = {None: 0}  # query -> row; row 0: no query, no terms
        self.flat = np.zeros(1024, dtype=np.int64)
        self.start = np.zeros(1024, dtype=np.int64)
        self.length = np.zeros(1024, dtype=np.int64)
        self.rows, self.used = 1, 0

    def add_all(self, queries: list[str]) -> range:
        """Store the terms of new distinct queries; returns their rows. One pass of C-level hashing and one
        numpy step for all of them: per query, numpy's fixed cost per call was most of the work."""
        terms = [query_terms(query) for query in queries]
        lengths = np.fromiter(map(len, terms), dtype=np.int64, count=len(terms))
        flat_terms = list(itertools.chain.from_iterable(terms))
        raw = np.fromiter(map(_crc, flat_terms, itertools.repeat(self.salt)), dtype=np.uint64, count=len(flat_terms))
        first, n = self.rows, len(queries)
        if first + n > len(self.start):
            size = 2 * (first + n)
            self.start, self.length = np.resize(self.start, size), np.resize(self.length, size)
        if self.used + len(raw) > len(self.flat):
            self.flat = np.resize(self.flat, 2 * (self.used + len(raw)))
        self.flat[self.used:self.used + len(raw)] = _mix_to_buckets(raw, self.buckets)
        self.length[first:first + n] = lengths
        self.start[first:first + n] = self.used + np.cumsum(lengths) - lengths
        self.rows, self.used = first + n, self.used + len(raw)
        return range(first, first + n)

    def tokens(self, queries: np.ndarray | list) -> tuple[np.ndarray, np.ndarray]:
        rows = np.fromiter(map_memoised_all(self.ids, queries, self.add_all), dtype=np.int64, count=len(queries))
        return ragged_take(self.flat, self.start[rows], self.length[rows])


_query_tables: dict[tuple[int, int], _QueryTable] = {}


def query_tokens(queries: np.ndarray | list, buckets: int, salt: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashed query terms of each event (see query_terms), flattened for an EmbeddingBag.

    Returns (tokens, offsets): event i's tokens are tokens[offsets[i]:offsets[i+1]].
    """
    table = _query_tables.get((buckets, salt))
    if table is None or table.rows > _MEMO_MAX:  # bounded as the other memos: start afresh
        table = _query_tables[buckets, salt] = _QueryTable(buckets, salt)
    return table.tokens(queries)


def price_bucket(price: np.ndarray) -> np.ndarray:
    """0 for no price, 1.. for log-spaced price ranges."""
    bucket = np.searchsorted(PRICE_EDGES, np.nan_to_num(price, nan=0.0), side="right") + 1
    bucket[np.isnan(price)] = 0
    return bucket.astype(np.int64)


@dataclass
class EventFeatures:
    """Model inputs for N events, already on the model's device."""

    type_idx: torch.Tensor  # (N,) long
    item: torch.Tensor  # (N,) long, hashed item id
    category: torch.Tensor  # (N,) long, hashed category
    price_bucket: torch.Tensor  # (N,) long
    query_tokens: torch.Tensor  # (M,) long, hashed query words of all events
    query_offsets: torch.Tensor  # (N,) long, where each event's words start
    dense: torch.Tensor  # (N, DENSE_FEATURES) float: log price, has price, log gap, first event
    item_vocab: torch.Tensor  # (N,) long, row of the item in the model's item vocabulary, -1 if absent
    # (N,) uint32 category keys (category_keys; 0: none), on the host: the state's, where buckets may collide.
    category_key: np.ndarray | None = None  # (training batches leave it out)


DENSE_FEATURES = 4


def dense_features(price: np.ndarray, gap_seconds: np.ndarray, first_event: np.ndarray) -> np.ndarray:
    """(N, 4) float32 the events' dense inputs: log1p of the price (0 without one), whether it has one, log1p of the
    seconds since the user's previous event / 10, whether it is the user's first. Serving (build_features) and
    training (models/sequence_data.py) both read them here."""
    has_price = ~np.isnan(price)
    return float32_columns([np.log1p(np.where(has_price, price, 0.0)), has_price,
                            np.log1p(np.maximum(gap_seconds, 0.0)) / 10.0, first_event])


def build_features(
    type_idx: np.ndarray,
    item_id: np.ndarray,
    category: np.ndarray,
    price: np.ndarray,
    query: np.ndarray,
    gap_seconds: np.ndarray,
    first_event: np.ndarray,
    *,
    item_buckets: int,
    category_buckets: int,
    query_buckets: int,
    hash_seed: int,
    device: torch.device,
    item_index: dict[str, int] | None = None,
    catalogue: ItemCatalogue | None = None,
) -> EventFeatures:
    """Featurise N events given as numpy columns. `gap_seconds` is the time since the user's previous event."""
    tokens, offsets = query_tokens(query, query_buckets, hash_seed + 2)
    dense = dense_features(price, gap_seconds, first_event)

    def long(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device, non_blocking=True)

    keys, buckets = category_keys_and_buckets(category, category_buckets, hash_seed + 1)
    items, item_rows = item_inputs(item_id, keys, item_buckets, hash_seed, vocab_rows(item_id, item_index), catalogue)
    return EventFeatures(
        type_idx=long(type_idx),
        item=long(items),
        category=long(buckets),
        price_bucket=long(price_bucket(price)),
        query_tokens=long(tokens),
        query_offsets=long(offsets),
        dense=torch.from_numpy(dense).to(device, non_blocking=True),
        item_vocab=long(item_rows),
        category_key=keys,
    )


def vocab_rows(item_id: np.ndarray, item_index: dict[str, int] | None) -> np.ndarray:
    """Row of each item in a vocabulary (-1 where absent or without a vocabulary)."""
    if not item_index:
        return np.full(len(item_id), -1, dtype=np.int64)
    return np.fromiter(map(item_index.get, item_id, itertools.repeat(-1)), dtype=np.int64, count=len(item_id))
