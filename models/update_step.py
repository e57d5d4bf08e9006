"""One batch through the profile pipeline: decode -> update state with the GRU -> profiles.

Source- and sink-agnostic, so the Kafka daemon and file replays share it. The
hot path works on whole batches: numpy for grouping and counters, one GRU call
for every touched user's new events, heads for the touched users only.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from models.features import build_features
from models.profile_model import FieldInputs, LoadedModel, idle_hours, price_tier_index
from stream import statistics
from stream.events import PURCHASE, WRONG_PARTITION, Control, DeadLetter, EventColumns, RecordBatch, decode_batch
from stream.profiles import ProfileColumns, encode_profiles
from stream.pseudonyms import Pseudonymizer
from stream.runtime import torch_threads, usable_cores
from stream.settings import Settings
from stream.sources import TimeRange
from stream.state import StateTable

log = logging.getLogger(__name__)

TOP_CATEGORIES = 3
# Batches at least this large run the GRU on `gru_threads` threads (smaller ones: thread start-up
# would cost more than it saves, and the daemon's small batches leave the cores to decoding and Kafka).
WIDE_BATCH_EVENTS = 4096
# The partitioning warning (records dead-lettered as wrong_partition) at most this often.
PARTITION_WARNING_EVERY_S = 30.0
_utf8 = functools.partial(str.encode, encoding="utf-8", errors="surrogatepass")


@dataclass
class BatchResult:
    profiles: list[tuple[bytes, bytes]]  # (key, value) per touched user
    dead_letters: list[DeadLetter]
    events: EventColumns  # the valid events that were applied
    out_of_range: int = 0  # valid events outside the requested event-time range (replays), not applied
    stage_seconds: dict[str, float] = field(default_factory=dict)
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # state rows published
    replayed: int = 0  # events at or below their user's watermark: applied before (re-consumed), skipped
    duplicates: int = 0  # events whose event_id the user's recent events already had: skipped
    # Users erased by forget records: (user id, input partition or -1). Their state is gone; the
    # daemon writes tombstones for them (changelog, output) before this batch's other records.
    erased: list[tuple[str, int]] = field(default_factory=list)
    forgotten: int = 0  # of the erased, users that had state or earlier events in this batch (not unknown ones)
    # Replays with an end bound: per input partition, the first offset of an event at or after it
    # (not applied; where a daemon started from the replay's snapshot must begin reading).
    first_after_range: dict[int, int] = field(default_factory=dict)


class ProfileUpdater:
    """Owns the model and the state table; turns record batches into profiles."""

    def __init__(self, loaded: LoadedModel, device: torch.device, *, max_event_bytes: int, emit_embedding: bool,
                 idle_rescore_ms: int = 0, next_items: int = 0, pseudonymize_key: str = "",
                 input_topics: tuple[str, ...] = (), dedupe_window: int = 0, gru_threads: int = 0) -> None:
        self.model = loaded.model.to(device).eval()
        self.model_version = loaded.version
        self.config = loaded.model.config
        self.device = device
        self.max_event_bytes = max_event_bytes
        self.emit_embedding = emit_embedding
        self.item_vocab = np.asarray(loaded.item_vocab, dtype=object)
        self.item_index = {item: i for i, item in enumerate(loaded.item_vocab)}
        # Threads for the GRU over a large batch (0: as many as the other kernels); CPU only.
        self.gru_threads = gru_threads if device.type == "cpu" else 0
        # Top-k next items per profile: only a trained model has an item vocabulary to rank.
        self.next_items = min(next_items, len(self.item_vocab))
        if next_items and not self.next_items:
            log.warning("--next-items needs a trained model with a next-item head: next_items left out")
        # Exactly-once bookkeeping: a watermark per user and input topic (records at or below it were
        # applied already: skipped when re-consumed), and the user's last `dedupe_window` event ids.
        self.topic_slot = {topic: i for i, topic in enumerate(input_topics)}
        self.state = StateTable(self.config.state_size, device, watermark_slots=len(input_topics),
                                dedupe_window=dedupe_window)
        # With a key, user ids are replaced by their HMAC right after decoding: state, profiles and
        # their keys only ever see pseudonyms. (Dead letters keep the original bytes: that is their job.)
        self.pseudonymize = Pseudonymizer(pseudonymize_key) if pseudonymize_key else None
        # Users who go quiet send no event that would refresh their churn risk: re-publish them
        # after this much event time without an update (0 disables). The scan runs once per tick.
        self.idle_rescore_ms = idle_rescore_ms
        self._idle_tick_ms = max(idle_rescore_ms // 24, 1)
        self._next_idle_scan = -1
        self._partition_warning = PartitionWarning()

    def process(self, records: RecordBatch, time_range: TimeRange | None = None, *, profiles: bool = True,
                ) -> BatchResult:
        """decode -> update -> profiles; with `time_range`, only events whose event time lies in it are applied.
        `profiles=False` skips encoding the touched users' profiles (a replay that writes only final ones)."""
        t0 = time.perf_counter()
        controls: list[Control] = []
        events, dead = decode_batch(records, self.max_event_bytes, controls)
        slots = self._record_slots(records)
        misrouted: list[DeadLetter] = []
        if (slots >= 0).any():  # records of input topics: the key must be the user id (files have no keys)
            events = self._check_keys(records, events, slots, misrouted)
        if self.pseudonymize is not None:
            events.user_id = self.pseudonymize(events.user_id)
        erased: list[tuple[str, int]] = []
        forgotten = 0
        if controls:  # rare: forget records (right to erasure), applied before the batch's events
            events, erased, forgotten = self._forget(records, events, controls)
        out_of_range, first_after_range = 0, {}
        if time_range is not None:
            keep = time_range.mask(events.ts)
            out_of_range = int(len(keep) - keep.sum())
            if time_range.end_ms is not None:
                first_after_range = _first_offsets(records, events.record_index[events.ts >= time_range.end_ms])
            events = events.take(keep)
        t1 = time.perf_counter()
        event_rows = self.state.rows_for(events.user_id)
        positions = self._positions(records, events, slots)
        if (positions[0] >= 0).any():
            keep = self._check_owner(records, events, event_rows, positions, misrouted)
            if keep is not None:
                events, event_rows, positions = events.take(keep), event_rows[keep], positions[:, keep]
        if misrouted:
            dead = sorted(dead + misrouted, key=lambda d: (d.topic, d.partition, d.offset))
            self._partition_warning.add(misrouted)
        id_hashes = event_id_hashes(events.event_id) if self.state.dedupe_window else None
        fresh, replayed, duplicates = self._not_yet_applied(events, event_rows, positions, id_hashes)
        # Users with re-consumed events get their profile again: the crash that made us re-read them
        # may have come after the state reached the changelog but before the profile reached its topic.
        again = np.unique(event_rows[~fresh]) if replayed else np.empty(0, dtype=np.int64)
        if not fresh.all():
            events, event_rows, positions = events.take(fresh), event_rows[fresh], positions[:, fresh]
            id_hashes = id_hashes[fresh] if id_hashes is not None else None
        rows = self.apply(events, event_rows)
        self._remember(events, event_rows, positions, id_hashes)
        if len(again):
            rows = np.union1d(rows, again)
        if self.idle_rescore_ms:  # idle users not already touched by this batch: one profile per user
            rows = np.concatenate([rows, np.setdiff1d(self.idle_users(), rows, assume_unique=True)])
        self.state.scored_at[rows] = self.state.max_event_ts
        t2 = time.perf_counter()
        encoded = self.profiles_for(rows) if profiles else []
        t3 = time.perf_counter()
        return BatchResult(encoded, dead, events, out_of_range, {"decode": t1 - t0, "model": t2 - t1, "encode": t3 - t2},
                           rows, replayed, duplicates, erased, forgotten, first_after_range)

    def _forget(self, records: RecordBatch, events: EventColumns, controls: list[Control],
                ) -> tuple[EventColumns, list[tuple[str, int]], int]:
        """Erase the users that forget records name: their state, and their events earlier in this batch
        (events after the forget start a new profile). Returns the remaining events, the erased users
        (tombstones are written for each) and how many of them had anything to erase.

        A forget acts once and in order with the user's events: it is skipped at or below the user's
        watermark (re-read after a crash; the user may have new events since), and when it arrives on
        another input partition than the user's state came from (`profiles forget` writes to every
        partition when it cannot tell which one holds the user)."""
        state = self.state
        users = [c.user_id for c in controls]
        if self.pseudonymize is not None:
            users = self.pseudonymize(np.asarray(users, dtype=object)).tolist()
            self.pseudonymize.forget([c.user_id for c in controls])  # no raw id -> pseudonym left in memory
        forget_at: dict[str, int] = {}  # user -> record index of the last forget that applies
        partition_of: dict[str, int] = {}
        for user, control in zip(users, controls):
            i = control.record_index
            slot, partition = self.topic_slot.get(records.topics[i], -1), records.partitions[i]
            row = state.row(user)
            if row is not None and slot >= 0:
                if records.offsets[i] <= state.watermark[row, slot]:
                    continue
                if 0 <= state.partition[row] != partition:
                    continue
            forget_at[user] = i
            partition_of[user] = partition if slot >= 0 else -1
        if not forget_at:
            return events, [], 0
        cut = np.fromiter(map(forget_at.get, events.user_id, itertools.repeat(-1)), dtype=np.int64,
                          count=len(events))
        dropped = events.record_index < cut  # the user's events before the forget, never applied
        found = state.forget(forget_at) | set(events.user_id[dropped].tolist())
        log.info("erased %d user(s) on forget records (%d named had nothing here)", len(found),
                 len(forget_at) - len(found))
        return events.take(~dropped), list(partition_of.items()), len(found)

    def _record_slots(self, records: RecordBatch) -> np.ndarray:
        """Each record's input topic slot (-1: not an input topic, e.g. a file)."""
        if not self.topic_slot:
            return np.full(len(records), -1, dtype=np.int64)
        return np.fromiter(map(self.topic_slot.get, records.topics, itertools.repeat(-1)), dtype=np.int64,
                           count=len(records))

    def _check_keys(self, records: RecordBatch, events: EventColumns, slots: np.ndarray,
                    misrouted: list[DeadLetter]) -> EventColumns:
        """The partitioning policy, part 1: an input topic's record must be keyed by its user id (the id
        as decoded: UTF-8, integers as their decimal string), or the partition it is on says nothing
        about its user. Events whose key is missing or another are dead-lettered as wrong_partition."""
        index = events.record_index
        from_topic = slots[index] >= 0
        keys = np.empty(len(records), dtype=object)
        keys[:] = records.keys
        try:
            users = np.fromiter(map(str.encode, events.user_id), dtype=object, count=len(events))
        except UnicodeEncodeError:  # a lone surrogate (keys are written with surrogatepass): 5x slower, rare
            users = np.fromiter(map(_utf8, events.user_id), dtype=object, count=len(events))
        wrong = from_topic & (keys[index] != users)  # elementwise in C; None never equals bytes
        if not wrong.any():
            return events
        for i, user in zip(index[wrong].tolist(), events.user_id[wrong].tolist()):
            key = records.keys[i]
            detail = ("no key: records must be keyed by user id" if key is None else
                      f"key {key[:64]!r} is not the user id {user[:64]!r}: records must be keyed by user id")
            misrouted.append(_misrouted(records, i, detail))
        return events.take(~wrong)

    def _check_owner(self, records: RecordBatch, events: EventColumns, rows: np.ndarray, positions: np.ndarray,
                     misrouted: list[DeadLetter]) -> np.ndarray | None:
        """The partitioning policy, part 2: a user's events are read from one input partition (the
        watermarks that skip re-consumed events are per user and topic, not per partition). A user
        held in state keeps the partition recorded there; a new one takes the partition of its first
        record in this batch. Returns the mask of events to keep (None: all); the others are
        dead-lettered as wrong_partition."""
        slot, partition, _ = positions
        known = slot >= 0
        owner = self.state.partition[rows]
        free = known & (owner < 0)
        if free.any():  # new users (or a file replay's): the partition of their first record (events are in record order)
            distinct, first, inverse = np.unique(rows[free], return_index=True, return_inverse=True)
            owner[free] = partition[free][first][inverse]
        wrong = known & (partition != owner)
        if not wrong.any():
            return None
        for i, user, home in zip(events.record_index[wrong].tolist(), events.user_id[wrong].tolist(),
                                 owner[wrong].tolist()):
            misrouted.append(_misrouted(records, i, f"user {user[:64]!r} is read from partition {home}, this "
                                        f"record is on partition {records.partitions[i]}: records must be keyed "
                                        "by user id, with one partitioner"))
        return ~wrong

    def _positions(self, records: RecordBatch, events: EventColumns, slot: np.ndarray | None = None) -> np.ndarray:
        """(3, N): each event's input topic slot (-1: not an input topic, e.g. a file), partition, offset."""
        if not self.topic_slot or not len(events):
            return np.full((3, len(events)), -1, dtype=np.int64)
        slot = self._record_slots(records) if slot is None else slot
        where = np.stack([slot, np.asarray(records.partitions, dtype=np.int64),
                          np.asarray(records.offsets, dtype=np.int64)])
        return where[:, events.record_index]

    def _not_yet_applied(self, events: EventColumns, rows: np.ndarray, positions: np.ndarray,
                         ids: np.ndarray | None) -> tuple[np.ndarray, int, int]:
        """Mask of the events to apply, and how many were re-consumed and duplicated (skipped)."""
        state, fresh = self.state, np.ones(len(events), dtype=bool)
        replayed = duplicates = 0
        if not len(events):
            return fresh, 0, 0
        slot, _, offset = positions
        known = slot >= 0
        if known.any():  # at or below the watermark: this user's state already includes the event
            seen = np.zeros(len(events), dtype=bool)
            seen[known] = offset[known] <= state.watermark[rows[known], slot[known]]
            fresh &= ~seen
            replayed = int(seen.sum())
        if ids is not None:
            again = (state.recent_ids[rows] == ids[:, None]).any(axis=1)  # in the user's recent events
            # ...or earlier in this batch (same user and id, lower record index)
            order = np.lexsort((events.record_index, ids, rows))
            same = (rows[order][1:] == rows[order][:-1]) & (ids[order][1:] == ids[order][:-1])
            again[order[1:][same]] = True
            again &= fresh  # a replayed event is counted once, as replayed
            fresh &= ~again
            duplicates = int(again.sum())
        return fresh, replayed, duplicates

    def _remember(self, events: EventColumns, rows: np.ndarray, positions: np.ndarray,
                  ids: np.ndarray | None) -> None:
        """After applying: each user's partition and watermarks, and the ring of recent event ids."""
        if not len(events):
            return
        state = self.state
        slot, partition, offset = positions
        known = slot >= 0
        if known.any():
            state.partition[rows[known]] = partition[known]
            np.maximum.at(state.watermark, (rows[known], slot[known]), offset[known])
        window = state.dedupe_window
        if ids is not None:
            # Arrival order within each user; of a user's c events this batch, the last `window` are written.
            order = np.lexsort((events.record_index, rows))
            user_rows = rows[order]
            starts = np.flatnonzero(np.r_[True, user_rows[1:] != user_rows[:-1]])
            counts = np.diff(np.r_[starts, len(order)])
            nth = np.arange(len(order)) - np.repeat(starts, counts)  # index within the user's events
            last = nth >= np.repeat(counts, counts) - window
            filled = state.recent_n[user_rows]
            state.recent_ids[user_rows[last], (filled[last] + nth[last]) % window] = ids[order[last]]
            state.recent_n[user_rows[starts]] += counts

    @torch.inference_mode()
    def apply(self, ev: EventColumns, event_rows: np.ndarray | None = None) -> np.ndarray:
        """Apply valid events to the state; return the state rows of the touched users.
        `event_rows`: each event's state row, when the caller already looked them up."""
        if len(ev) == 0:
            return np.empty(0, dtype=np.int64)
        state = self.state
        if event_rows is None:
            event_rows = state.rows_for(ev.user_id)  # new users get rows here
        # Users by state row: grouping integers is cheaper than strings.
        rows, user_of_event = np.unique(event_rows, return_inverse=True)  # (U,), (N,)

        # Each user's events in event-time order; arrival order breaks ties.
        order = np.lexsort((ev.record_index, ev.ts, user_of_event))
        user_sorted = user_of_event[order]
        ts = ev.ts[order]
        lengths = np.bincount(user_sorted, minlength=len(rows))
        starts = np.zeros_like(lengths)
        np.cumsum(lengths[:-1], out=starts[1:])
        position = np.arange(len(order)) - starts[user_sorted]

        # Time since the same user's previous event: from state for the first event of the batch.
        previous = np.empty_like(ts)
        previous[1:] = ts[:-1]
        first_in_batch = position == 0
        previous[first_in_batch] = state.last_ts[rows[user_sorted[first_in_batch]]]
        first_ever = previous < 0
        gap_seconds = np.where(first_ever, 0.0, (ts - previous) / 1000.0)

        cfg = self.config
        price = ev.price[order]
        category = ev.category[order]
        feats = build_features(
            ev.type_idx[order], ev.item_id[order], category, price, ev.query[order], gap_seconds, first_ever,
            item_buckets=cfg.item_buckets, category_buckets=cfg.category_buckets,
            query_buckets=cfg.query_buckets, hash_seed=cfg.hash_seed, device=self.device,
            item_index=self.item_index,
        )
        rows_t = torch.from_numpy(rows).to(self.device)
        x = self.model.embed(feats)  # (N, F)
        # The recurrent pass over a large batch is the one kernel big enough to gain from more threads.
        with torch_threads(self.gru_threads if len(ev) >= WIDE_BATCH_EVENTS else 0):
            # Events per user before this batch (the memory's age): the counters are updated below.
            state.hidden[rows_t] = self.model.advance(state.hidden[rows_t], x, user_sorted, position, lengths,
                                                      state.counts[rows].sum(axis=1))
        category_buckets = feats.category.cpu().numpy()
        state.remember_categories(category_buckets, category)
        # The exact statistics the field heads read (before last_ts moves: they decay from it).
        statistics.update(state.columns, rows, user_sorted, ts, ev.type_idx[order], category_buckets, starts,
                          lengths, gap_seconds * 1000.0, first_ever, state.last_ts[rows].copy())

        # Exact counters, vectorised (np.add.at accumulates repeated rows).
        event_rows = rows[user_sorted]
        type_idx = ev.type_idx[order]
        np.add.at(state.counts, (event_rows, type_idx), 1)
        purchase = (type_idx == PURCHASE) & ~np.isnan(price)
        add_spend(state.spend_micros, event_rows[purchase], np.rint(price[purchase] * ev.quantity[order][purchase] * 1e6))
        priced = ~np.isnan(price)
        np.add.at(state.price_sum, event_rows[priced], price[priced])
        np.add.at(state.price_n, event_rows[priced], 1)
        last_of_user = ts[starts + lengths - 1]
        state.last_ts[rows] = np.maximum(state.last_ts[rows], last_of_user)
        state.max_event_ts = max(state.max_event_ts, int(ts.max()))
        return rows

    def idle_users(self) -> np.ndarray:
        """Rows of users whose last published profile is `idle_rescore_ms` of event time old.

        Event time is the largest event time seen, so replays behave like live runs. Scans the
        whole table, but only when that clock has moved a tick (1/24 of the period) since the last scan.
        """
        state = self.state
        now = state.max_event_ts
        if now < self._next_idle_scan or len(state) == 0:
            return np.empty(0, dtype=np.int64)
        self._next_idle_scan = now + self._idle_tick_ms
        scored = state.scored_at[: len(state)]
        return np.flatnonzero((scored >= 0) & (now - scored >= self.idle_rescore_ms))

    def all_profiles(self, chunk_users: int = 50_000) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every user's current profile, in chunks (the end of a replay)."""
        for first in range(0, len(self.state), chunk_users):
            yield self.profiles_for(np.arange(first, min(first + chunk_users, len(self.state))))

    def field_inputs(self, rows: np.ndarray, now_ms: int) -> FieldInputs:
        """The statistics the field heads read for these rows at the clock now_ms; slots as columns of
        state.seen_categories(). Serving and the field heads' training both read them here."""
        state = self.state
        seen = state.seen_categories()
        user = statistics.user_features(state.columns, state.counts, state.last_ts, rows, now_ms)
        buckets, slot = statistics.slot_features(state.columns, state.last_ts, rows, now_ms)
        b = torch.from_numpy(buckets).to(self.device)
        cols = torch.searchsorted(seen, b).clamp(max=max(len(seen) - 1, 0))
        valid = (b > 0) & (seen[cols] == b) if len(seen) else torch.zeros_like(b, dtype=torch.bool)
        return FieldInputs(torch.from_numpy(user).to(self.device), cols, valid, torch.from_numpy(slot).to(self.device))

    @torch.inference_mode()
    def profiles_for(self, rows: np.ndarray, horizons_hours: tuple[float, float] | None = None
                     ) -> list[tuple[bytes, bytes]]:
        """Profiles of the given state rows, encoded for the output topic. horizons_hours: (purchase, churn)
        horizons other than the contract's (the evaluation's, where a log ends before them)."""
        if len(rows) == 0:
            return []
        state, cfg = self.state, self.config
        rows_t = torch.from_numpy(rows).to(self.device)
        h = state.hidden[rows_t]  # (U, H)
        idle = idle_hours(state.max_event_ts, state.last_ts[rows])
        # Top categories: a distribution over the buckets that ever carried a category string,
        # computed for those columns only (S seen categories, not every bucket).
        seen = state.seen_categories()  # (S,) bucket ids
        heads = self.model.heads(h, torch.from_numpy(idle).float().to(self.device), seen, TOP_CATEGORIES,
                                 self.field_inputs(rows, state.max_event_ts), horizons_hours)
        top_cols, top_scores = heads.top_category_cols, heads.top_category_probs
        top_names = state.seen_category_names()[top_cols.cpu().numpy()].tolist()  # (U, k) names, best first
        top_scores = np.round(top_scores.double().cpu().numpy(), 6).tolist()

        price_n = state.price_n[rows]
        mean_price = np.divide(state.price_sum[rows], price_n, out=np.full(len(rows), np.nan), where=price_n > 0)
        tier_names = cfg.price_tier_names
        tiers = [tier_names[t] if t >= 0 else "unknown" for t in price_tier_index(mean_price, cfg).tolist()]

        next_items = None
        if self.next_items:
            best = self.model.item_scores(h).topk(self.next_items, dim=1).indices.cpu().numpy()  # (U, k)
            next_items = self.item_vocab[best].tolist()
        cols = ProfileColumns(
            user_ids=[state.user_ids[r] for r in rows.tolist()],
            last_event_ts=state.last_ts[rows],
            counts=state.counts[rows],
            spend_micros=state.spend_micros[rows],
            top_category_names=top_names,
            top_category_scores=top_scores,
            purchase_propensity=heads.purchase_propensity.cpu().numpy(),
            churn_risk=heads.churn_risk.cpu().numpy(),
            price_tier=tiers,
            interest_cluster=heads.interest_cluster.cpu().numpy(),
            embedding=h.float().cpu().numpy() if self.emit_embedding else None,
            next_items=next_items,
        )
        return encode_profiles(cols, self.model_version, int(time.time() * 1000))


# Spend saturates here (micro-units: 9e12 currency units) instead of wrapping round to negative.
SPEND_MAX_MICROS = 9_000_000_000_000_000_000


def add_spend(spend_micros: np.ndarray, rows: np.ndarray, micros: np.ndarray) -> None:
    """Add each purchase's micro-units (floats, integral, each at most MAX_AMOUNT x 1e6) to its row's total,
    exactly, saturating at SPEND_MAX_MICROS. A float sum beside the int64 one tells where the int64 could
    have wrapped (its error is far below the margin between SPEND_MAX_MICROS and int64's maximum)."""
    if not len(rows):
        return
    targets, which = np.unique(rows, return_inverse=True)
    exact = np.zeros(len(targets), dtype=np.int64)
    np.add.at(exact, which, micros.astype(np.int64))
    approx = spend_micros[targets].astype(np.float64)
    np.add.at(approx, which, micros)
    with np.errstate(over="ignore"):
        total = spend_micros[targets] + exact  # wraps only where approx is far over the cap
    spend_micros[targets] = np.where(approx >= SPEND_MAX_MICROS, SPEND_MAX_MICROS,
                                     np.minimum(total, SPEND_MAX_MICROS))


def _misrouted(records: RecordBatch, i: int, detail: str) -> DeadLetter:
    return DeadLetter(value=records.values[i], key=records.keys[i], reason=WRONG_PARTITION, detail=detail,
                      topic=records.topics[i], partition=records.partitions[i], offset=records.offsets[i])


class PartitionWarning:
    """The warning for records dead-lettered as wrong_partition: at most one line every
    PARTITION_WARNING_EVERY_S, counting those since the last one and naming an example."""

    def __init__(self, every_s: float = PARTITION_WARNING_EVERY_S) -> None:
        self.every_s = every_s
        self.pending = 0
        self.last_at = -float("inf")

    def add(self, misrouted: list[DeadLetter]) -> None:
        self.pending += len(misrouted)
        now = time.monotonic()
        if now - self.last_at < self.every_s:
            return
        example = misrouted[0]
        log.warning("%d record(s) dead-lettered as wrong_partition%s, e.g. %s[%d]@%d: %s. A user's events must "
                    "come from one partition: produce with key = user id (docs/contracts.md, partitioning)",
                    self.pending, "" if self.last_at < 0 else f" in the last {now - self.last_at:.0f}s",
                    example.topic, example.partition, example.offset, example.detail)
        self.pending, self.last_at = 0, now


def event_id_hashes(event_ids: np.ndarray) -> np.ndarray:
    """64-bit hash of each event id: CRC-32 in the low half, Adler-32 in the high (two C calls; a false
    duplicate needs both to collide with one of the user's last few ids). Never 0: 0 marks an empty slot."""
    crc, adler = zlib.crc32, zlib.adler32
    encoded = [e.encode("utf-8", "surrogatepass") for e in event_ids]
    out = np.fromiter(map(crc, encoded), dtype=np.uint64, count=len(encoded))
    out |= np.fromiter(map(adler, encoded), dtype=np.uint64, count=len(encoded)) << np.uint64(32)
    out[out == 0] = 1
    return out


def _first_offsets(records: RecordBatch, index: np.ndarray) -> dict[int, int]:
    """Per partition, the smallest offset among these records (by position in the batch)."""
    if not len(index):
        return {}
    partitions = np.asarray(records.partitions, dtype=np.int64)[index]
    offsets = np.asarray(records.offsets, dtype=np.int64)[index]
    return {int(p): int(offsets[partitions == p].min()) for p in np.unique(partitions)}


def load_updater(settings: Settings) -> ProfileUpdater:
    """The updater the settings ask for: a checkpoint, or an untrained model (with one warning).
    It keeps watermarks for the offsets of settings.input_topics (the daemon's inputs)."""
    from models.profile_model import load_checkpoint, resolve_device, untrained

    device = resolve_device(settings.device)
    if device.type == "cpu" and settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.model_path:
        loaded = load_checkpoint(settings.model_path, device)
        log.info("model %s loaded from %s on %s", loaded.version, settings.model_path, device)
    else:
        loaded = untrained()
        log.warning("no --model given: serving a freshly initialised model (%s). Counters and spend are "
                    "exact; learned fields (top_categories scores, propensity, churn, cluster) are untrained.",
                    loaded.version)
    return ProfileUpdater(loaded, device, max_event_bytes=settings.max_event_bytes,
                          emit_embedding=settings.emit_embedding, idle_rescore_ms=settings.idle_rescore_after_ms,
                          next_items=settings.next_items, pseudonymize_key=settings.pseudonymize_key,
                          input_topics=settings.input_topics, dedupe_window=settings.dedupe_window,
                          gru_threads=settings.gru_threads or usable_cores())
