"""The profile contract: what the output topic carries, one JSON object per user, encoded column-wise.

The fields are defined once, in docs/contracts.md ("Profile"). The profile's clock is the event
time it was computed at: the largest event time the instance has seen. The horizons below are the
one definition of the learned fields' horizons: training targets (models/field_training.py), the
evaluation against the future (`profiles evaluate-fields`) and docs/contracts.md read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np
import orjson

CATEGORY_HORIZON_HOURS = 7 * 24.0
PURCHASE_HORIZON_HOURS = 7 * 24.0
CHURN_HORIZON_HOURS = 14 * 24.0
TOP_CATEGORIES = 3  # categories a profile's top_categories names


@dataclass
class ProfileColumns:
    """Everything needed to write the profiles of U users, as columns."""

    user_ids: list[str]
    last_event_ts: np.ndarray  # (U,) int64
    counts: np.ndarray  # (U, 4) int64
    spend_micros: np.ndarray  # (U,) int64
    top_category_names: list[list[str]]  # per user, best first
    top_category_scores: list[list[float]]  # per user, aligned with the names, rounded
    purchase_propensity: np.ndarray  # (U,) float
    churn_risk: np.ndarray  # (U,) float
    price_tier: list[str]
    interest_cluster: np.ndarray  # (U,) int
    embedding: np.ndarray | None  # (U, S) float32 (GRU hidden state + memory), or None when disabled
    next_items: list[list[str]] | None = None  # per user, most likely next items first; None when disabled
    expired: bool = False  # the users' last profiles before their state expires (--state-ttl)


def encode_profiles(cols: ProfileColumns, model_version: str, updated_at_ms: int) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) per user, ready to produce: byte for byte what `orjson.dumps` writes for each
    profile's dict (keys in the contract's order), made with a few calls per batch instead of one per profile.

    Each column's JSON comes from one orjson call over the whole column, split into one token per user
    (`tokens`, `string_contents`, `row_tokens`); the fixed text between them (keys, punctuation) is made
    once. A profile is then one join of its pieces, the tuples built by zip (`assemble`): no Python runs
    per profile, which matters when nearly every event of a batch is a different user's.
    """
    n = len(cols.user_ids)
    if n == 0:
        return []
    # Top categories: every user has as many slots (a (U, k) top-k). Zipped as columns before, a shorter
    # list cut every user's to its length: so here.
    lengths = set(map(len, cols.top_category_names)) | set(map(len, cols.top_category_scores))
    k = min(lengths)
    names, scores = cols.top_category_names, cols.top_category_scores
    if len(lengths) > 1:
        names, scores = [row[:k] for row in names], [row[:k] for row in scores]
    names, scores = list(chain.from_iterable(names)), list(chain.from_iterable(scores))  # user 0's slots, then 1's
    counts = tokens(cols.counts.ravel().tolist())  # search, click, add_to_cart, purchase of user 0, then user 1 ...
    flat_names, flat_scores = vocabulary_tokens(names), tokens(scores)

    template: list[bytes | list[bytes] | list[memoryview]] = [
        b'{"user_id":"', string_contents(cols.user_ids),
        b'","model_version":' + orjson.dumps(model_version) + b',"updated_at":' + orjson.dumps(updated_at_ms)
        + b',"last_event_ts":', tokens(cols.last_event_ts.tolist()),
        b',"counts":{"search":', counts[0::4], b',"click":', counts[1::4], b',"add_to_cart":', counts[2::4],
        b',"purchase":', counts[3::4],
        b'},"spend":', tokens((cols.spend_micros / 1e6).tolist()), b',"top_categories":[',
    ]
    for slot in range(k):
        template += [b',{"category":' if slot else b'{"category":', flat_names[slot::k],
                     b',"score":', flat_scores[slot::k], b"}"]
    template += [
        b'],"purchase_propensity":', tokens(np.round(cols.purchase_propensity.astype(np.float64), 6).tolist()),
        b',"churn_risk":', tokens(np.round(cols.churn_risk.astype(np.float64), 6).tolist()),
        b',"price_tier":', vocabulary_tokens(cols.price_tier),
        b',"interest_cluster":', tokens(cols.interest_cluster.tolist()),
    ]
    if cols.next_items is not None:  # lists of item ids: a "],[" may sit inside one, so one call per user
        template += [b',"next_items":', list(map(orjson.dumps, cols.next_items))]
    if cols.embedding is not None:
        template += [b',"embedding":[', row_tokens(cols.embedding), b"]"]
    if cols.expired:
        template.append(b',"expired":true')
    template.append(b"}")
    return list(zip(map(str.encode, cols.user_ids), assemble(template, n)))


def assemble(template: list[bytes | list[bytes] | list[memoryview]], n: int) -> list[bytes]:
    """The n profiles a template describes: its bytes items are the same in every profile, its lists hold
    one piece per profile. Each profile is one join over the tuple zip builds: no Python runs per profile."""
    merged: list[bytes | list[bytes]] = []
    for item in template:  # adjacent fixed pieces become one
        if isinstance(item, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += item
        else:
            merged.append(item)
    for item in merged:
        if not isinstance(item, bytes) and len(item) != n:
            raise ValueError(f"a profile column has {len(item)} values for {n} profiles")
    return list(map(b"".join, zip(*(repeat(item, n) if isinstance(item, bytes) else item for item in merged))))


def tokens(values: list) -> list[bytes]:
    """The JSON of each number (or null) in a flat list: one orjson call, split at the commas."""
    return orjson.dumps(values)[1:-1].split(b",") if values else []


def string_contents(values: list[str]) -> list[bytes]:
    """The JSON of each string without its quotes: one orjson call, split between the strings. '","'
    occurs only there: inside a JSON string every quote is escaped, so no ',' is followed by a bare one."""
    return orjson.dumps(values)[2:-2].split(b'","') if values else []


def vocabulary_tokens(values: list) -> list[bytes]:
    """The JSON of each value of a column with few distinct ones (category names, price tiers)."""
    known = {value: orjson.dumps(value) for value in set(values)}
    return list(map(known.__getitem__, values))


def row_tokens(matrix: np.ndarray) -> list[memoryview]:
    """Each row's numbers as orjson writes a numpy row, without its brackets: one call for the matrix, then
    views into its text between the brackets (numbers hold none), not copies: `b"".join` reads views."""
    text = orjson.dumps(np.ascontiguousarray(matrix), option=orjson.OPT_SERIALIZE_NUMPY)  # [[r0],[r1],...]
    ends = np.flatnonzero(np.frombuffer(text, dtype=np.uint8) == ord("]"))[:-1]  # each row's "]", not the last
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 2, ends[:-1] + 3  # past "[[" , then past "],["
    view = memoryview(text)
    return [view[a:b] for a, b in zip(starts.tolist(), ends.tolist())]
