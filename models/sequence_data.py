"""The training log as the sequence model reads it: per-event model inputs and targets (Prepared), and
every user's sequence cut into chunks that carry their state from one to the next (Chunks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.dataset import EventLog
from models.catalogue import ItemCatalogue
from models.features import (EventFeatures, category_keys_and_buckets, dense_features, item_inputs, price_bucket,
                             query_tokens, ragged_take, vocab_rows)
from models.profile_model import ModelConfig

NO_TARGET = -1


@dataclass
class Prepared:
    """Everything per event, as numpy arrays aligned with the log (N events)."""

    ts: np.ndarray  # event time, epoch ms
    type_idx: np.ndarray
    item_bucket: np.ndarray
    category_bucket: np.ndarray
    previous_category: np.ndarray  # bucket of the user's latest category before the event's own that differs from it (0: none)
    price_bucket: np.ndarray
    query_tokens: np.ndarray  # (M,) hashed query terms of all events, flat
    query_offsets: np.ndarray  # (N + 1,) event i's terms are query_tokens[off[i]:off[i + 1]]
    dense: np.ndarray  # (N, 4) float32
    item_vocab: np.ndarray  # vocabulary index of the event's own item, or NO_TARGET
    item_target: np.ndarray  # vocabulary index of the next event's item, or NO_TARGET
    user: np.ndarray  # user index of each event
    position: np.ndarray  # index of the event within its user's sequence
    item_seen_before_split: np.ndarray  # (n_items,) bool, set by train() once the split is known
    purchase_label: np.ndarray  # 1 if the user purchases within the horizon
    gap_to_next_ms: np.ndarray  # float, inf for a user's last event
    next_ts: np.ndarray  # ts of the next event, or a large sentinel
    next_visits: np.ndarray  # (N, S) first events of the user's next S sessions after the event's own, or -1
    category_columns: np.ndarray  # the category buckets the log holds: the columns category losses are taken over


def item_vocabulary(log_: EventLog, cutoff_ts: int, max_items: int) -> list[str]:
    """Items of the training period, most frequent first (ties by id, so it is deterministic)."""
    ev = log_.events
    mask = (ev.ts <= cutoff_ts) & np.array([i is not None for i in ev.item_id])
    items, counts = np.unique(ev.item_id[mask].astype(str), return_counts=True)
    order = np.lexsort((items, -counts))[:max_items]
    return items[order].tolist()


def price_tier_edges(log_: EventLog, cutoff_ts: int) -> tuple[float, ...]:
    """Quartiles of users' mean engaged price in the training period: four equal-sized tiers."""
    ev = log_.events
    priced = (ev.ts <= cutoff_ts) & ~np.isnan(ev.price)
    if priced.sum() < 10:
        return ModelConfig().price_tier_edges
    users = log_.user_of_event[priced]
    sums = np.bincount(users, ev.price[priced], minlength=len(log_.users))
    n = np.bincount(users, minlength=len(log_.users))
    means = sums[n > 0] / n[n > 0]
    return tuple(float(q) for q in np.quantile(means, [0.25, 0.5, 0.75]))


def next_visits(log_: EventLog, session_gap_ms: float, sessions: int) -> np.ndarray:
    """(N, sessions): index of the first event of each of the user's next `sessions` sessions after
    the one the event belongs to (-1 where the user has no more). Sessions break at gaps > session_gap_ms."""
    ts, n = log_.events.ts, len(log_)
    if sessions == 0 or n == 0:
        return np.full((n, sessions), -1, dtype=np.int64)
    gap_ms = np.diff(ts, prepend=ts[:1])
    opens = np.flatnonzero((log_.position == 0) | (gap_ms > session_gap_ms))  # sorted session openings
    user_of_open = log_.user_of_event[opens]
    # k-th opening after event i: opens[searchsorted(opens, i, right) + k - 1], if it is the same user's.
    first = np.searchsorted(opens, np.arange(n), side="right")
    k = first[:, None] + np.arange(sessions)[None, :]  # (N, S)
    ok = k < len(opens)
    k_safe = np.minimum(k, len(opens) - 1)
    ok &= user_of_open[k_safe] == log_.user_of_event[:, None]
    return np.where(ok, opens[k_safe], -1)


def previous_category(bucket: np.ndarray, user: np.ndarray) -> np.ndarray:
    """Per event (sorted by user, then time): the bucket of the user's latest category before the event's
    own that differs from it; 0 where there is none or the event has no category."""
    out = np.zeros_like(bucket)
    k = np.flatnonzero(bucket > 0)  # the events with a category
    if len(k) == 0:
        return out
    c, u = bucket[k], user[k]
    opens = np.ones(len(k), dtype=bool)  # a run of one category opens here
    opens[1:] = (c[1:] != c[:-1]) | (u[1:] != u[:-1])
    before = np.maximum.accumulate(np.where(opens, np.arange(len(k)), 0)) - 1  # the event before the run
    ok = (before >= 0) & (u[np.maximum(before, 0)] == u)
    out[k] = np.where(ok, c[np.maximum(before, 0)], 0)
    return out


def prepare(log_: EventLog, config: ModelConfig, vocab: list[str], horizon_ms: int,
            session_gap_ms: float = 30 * 60_000, visit_sessions: int = 0,
            catalogue: ItemCatalogue | None = None) -> Prepared:
    """The log's events as the model reads them; items outside `catalogue` read as unknown (features.item_inputs)."""
    ev = log_.events
    gap, first = log_.gap_seconds()
    dense = dense_features(ev.price, gap, first)
    tokens, offsets = query_tokens(ev.query, config.query_buckets, config.hash_seed + 2)

    category_key, category_bucket = category_keys_and_buckets(ev.category, config.category_buckets,
                                                              config.hash_seed + 1)
    vocab_idx = vocab_rows(ev.item_id, {item: i for i, item in enumerate(vocab)})
    item_bucket, item_idx = item_inputs(ev.item_id, category_key, config.item_buckets, config.hash_seed, vocab_idx,
                                        catalogue)
    nxt = log_.next_index()
    has_next = nxt >= 0
    nxt_safe = np.where(has_next, nxt, 0)
    # The next item is a target whatever the catalogue says of it as an input.
    item_target = np.where(has_next, vocab_idx[nxt_safe], NO_TARGET)
    next_ts = np.where(has_next, ev.ts[nxt_safe], np.iinfo(np.int64).max)
    gap_to_next = np.where(has_next, (ev.ts[nxt_safe] - ev.ts).astype(np.float64), np.inf)
    return Prepared(
        ts=ev.ts, type_idx=ev.type_idx, item_bucket=item_bucket,
        category_bucket=category_bucket, previous_category=previous_category(category_bucket, log_.user_of_event),
        price_bucket=price_bucket(ev.price), query_tokens=tokens,
        query_offsets=np.append(offsets, len(tokens)), dense=dense,
        item_vocab=item_idx, item_target=item_target, user=log_.user_of_event, position=log_.position,
        item_seen_before_split=np.ones(max(len(vocab), 1), dtype=bool),
        purchase_label=log_.purchase_within(horizon_ms), gap_to_next_ms=gap_to_next, next_ts=next_ts,
        next_visits=next_visits(log_, session_gap_ms, visit_sessions),
        category_columns=np.unique(category_bucket[category_bucket > 0]),
    )


def features_at(p: Prepared, idx: np.ndarray, device: torch.device) -> EventFeatures:
    """Model inputs for the events `idx` (flat)."""
    begin = p.query_offsets[idx]
    tokens, offsets = ragged_take(p.query_tokens, begin, p.query_offsets[idx + 1] - begin)  # each event's terms

    def long(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)

    return EventFeatures(long(p.type_idx[idx]), long(p.item_bucket[idx]), long(p.category_bucket[idx]),
                         long(p.price_bucket[idx]), long(tokens), long(offsets),
                         torch.from_numpy(p.dense[idx]).to(device), long(p.item_vocab[idx]))


@dataclass
class Chunks:
    """Every user's sequence cut every max_len events; chunk c is events start[c] .. start[c] + length[c] - 1,
    the k[c]-th chunk of user[c]. A user's later chunks start from the state its earlier ones end in."""

    start: np.ndarray
    length: np.ndarray
    user: np.ndarray
    k: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    def rounds(self, user_order: np.ndarray, batch_size: int, chosen: np.ndarray | None = None):
        """Mini-batches of chunk indices, every user's chunk 0 first, then every chunk 1, and so on, so a
        chunk's initial state is ready when it comes; within a round users go in `user_order`."""
        rank = np.empty(len(user_order), dtype=np.int64)
        rank[user_order] = np.arange(len(user_order))
        pool = np.arange(len(self)) if chosen is None else chosen
        for k in range(int(self.k[pool].max()) + 1 if len(pool) else 0):
            sel = pool[self.k[pool] == k]
            sel = sel[np.argsort(rank[self.user[sel]], kind="stable")]
            for b in range(0, len(sel), batch_size):
                yield sel[b:b + batch_size]


def chunks(log_: EventLog, max_len: int) -> Chunks:
    n_chunks = (log_.length + max_len - 1) // max_len
    user = np.repeat(np.arange(len(log_.users)), n_chunks)
    k = np.arange(n_chunks.sum()) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    start = log_.start[user] + k * max_len
    length = np.minimum(max_len, log_.start[user] + log_.length[user] - start)
    return Chunks(start, length, user, k)


