"""Which of a batch's events the state step applies: the checks around models/update_step.py.

Decoding a batch into events; the partitioning policy (an input topic's record is keyed by its user
id, and a user is read from one partition: others are dead-lettered as wrong_partition); forget
records (erasure); the exactly-once skips (events at or below their user's watermark, event ids among
the user's recent ones) and the bookkeeping they read. Vectorised over the batch: Python loops only
over the records dead-lettered here, and over forget records.
"""

from __future__ import annotations

import itertools
import logging
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from models.features import category_keys
from stream.events import (AHEAD_OF_CLOCK, TOO_MANY_CATEGORIES, Control, DeadLetter, EventColumns, RecordBatch,
                           WRONG_PARTITION, iso_time, utf8)
from stream.decode import DecodedRecords, decode_records
from stream.pseudonyms import Pseudonymizer
from stream.state import StateTable

log = logging.getLogger(__name__)

# The partitioning warning (records dead-lettered as wrong_partition) at most this often.
PARTITION_WARNING_EVERY_S = 30.0


@dataclass
class Decoded:
    """decode: a batch's valid events (user ids pseudonymised where configured, erased users' earlier
    events removed), and what did not become an event."""

    events: EventColumns
    dead_letters: list[DeadLetter]  # records that break the event contract
    misrouted: list[DeadLetter]  # input records not keyed by their user id (wrong_partition)
    slots: np.ndarray  # each record's input topic slot (-1: not an input topic, e.g. a file)
    # Users erased by forget records: (user id, input partition or -1), and how many had anything to erase.
    erased: list[tuple[str, int]] = field(default_factory=list)
    forgotten: int = 0


@dataclass
class Placed:
    """place: each event with its user's state row and its position; events read from another
    partition than their user's are dead-lettered."""

    events: EventColumns
    rows: np.ndarray  # (N,) each event's state row (new users have one now)
    positions: np.ndarray  # (3, N) input topic slot (-1: none), partition, offset
    dead_letters: list[DeadLetter]  # all of the batch's, misrouted ones included, in record order


@dataclass
class ToApply:
    """skip_applied: the events not yet in their user's state, and what was skipped."""

    events: EventColumns
    rows: np.ndarray
    positions: np.ndarray
    id_hashes: np.ndarray | None  # each event id's hash (None: no dedupe window)
    replayed: int  # events at or below their user's watermark: applied before (re-consumed)
    duplicates: int  # events whose event_id the user's recent events already had
    again: np.ndarray  # state rows of users with re-consumed events: their profile is published again

    def take(self, keep: np.ndarray) -> ToApply:
        """The events where `keep` is true, to apply in a pass of their own (skip counts stay with the whole)."""
        return ToApply(events=self.events.take(keep), rows=self.rows[keep], positions=self.positions[:, keep],
                       id_hashes=self.id_hashes[keep] if self.id_hashes is not None else None, replayed=0,
                       duplicates=0, again=np.empty(0, dtype=np.int64))


class Admission:
    """The checks of one state table: decode -> place -> skip_applied, then remember what was applied."""

    def __init__(self, state: StateTable, topic_slot: dict[str, int], pseudonymize: Pseudonymizer | None,
                 max_event_bytes: int, max_ahead_ms: int = 0, max_categories: int = 0, category_salt: int = 1) -> None:
        self.state = state
        self.topic_slot = topic_slot
        self.pseudonymize = pseudonymize
        self.max_event_bytes = max_event_bytes
        self.max_ahead_ms = max_ahead_ms  # 0: no limit (events.AHEAD_OF_CLOCK)
        self.max_categories = max_categories  # 0: no limit (events.TOO_MANY_CATEGORIES)
        self.category_salt = category_salt  # of the categories' keys, as the state's (models/features.py)
        self.partition_warning = PartitionWarning()

    def decode(self, records: RecordBatch, ahead: DecodedRecords | None = None) -> Decoded:
        """Records -> valid events (dead letters for the others), keys checked, user ids pseudonymised,
        forget records applied before the batch's events. `ahead`: decode_records of these records, done
        elsewhere (stream/decode_ahead.py)."""
        if ahead is None:
            ahead = decode_records(records, self.max_event_bytes)
        events, dead, controls = ahead.events, ahead.dead_letters, ahead.controls
        slots = self._record_slots(records)
        misrouted: list[DeadLetter] = []
        if (slots >= 0).any():  # records of input topics: the key must be the user id (files have no keys)
            events = self._check_keys(records, events, slots, misrouted)
        if self.max_ahead_ms:
            events = refuse_ahead_of_clock(records, events, self.max_ahead_ms, dead)
        if self.max_categories:
            events = self.refuse_categories_past_bound(records, events, dead)
        if self.pseudonymize is not None:
            events.user_id = self.pseudonymize(events.user_id)
        decoded = Decoded(events=events, dead_letters=dead, misrouted=misrouted, slots=slots)
        if controls:  # rare: forget records (right to erasure), applied before the batch's events
            decoded.events, decoded.erased, decoded.forgotten = self._forget(records, events, controls)
        return decoded

    def refuse_categories_past_bound(self, records: RecordBatch, events: EventColumns, dead: list[DeadLetter]
                                     ) -> EventColumns:
        """The events, less those whose category would make the table name more than max_categories distinct ones:
        dead-lettered as too_many_categories into `dead` (kept in record order). New categories are taken in record
        order until the bound, so the same records leave the same ones whatever the batches."""
        names = self.state.category_names
        if len(names) < self.max_categories and len(events) <= self.max_categories - len(names):
            return events  # room for every event's category to be a new one: the usual batch, nothing to look up
        keys = category_keys(events.category, self.category_salt).astype(np.int64)
        known = np.fromiter(names, dtype=np.int64, count=len(names))
        new = (keys > 0) & ~np.isin(keys, known)
        distinct, first = np.unique(keys[new], return_index=True)
        room = max(self.max_categories - len(names), 0)
        refused_keys = distinct[np.argsort(first, kind="stable")[room:]]  # the latest to appear, past the room left
        refused = np.isin(keys, refused_keys) & new
        if not refused.any():
            return events
        detail = (f"its category would be one more than the {self.max_categories:,} distinct categories the state "
                  "names (--max-categories)")
        dead.extend(_dead_letter(records, i, TOO_MANY_CATEGORIES, detail)
                    for i in events.record_index[refused].tolist())
        dead.sort(key=lambda d: (d.topic, d.partition, d.offset))
        return events.take(~refused)

    def place(self, records: RecordBatch, decoded: Decoded) -> Placed:
        """Each event's state row and position; the partitioning policy's part 2 (one partition per user)."""
        events, misrouted = decoded.events, decoded.misrouted
        rows = self.state.rows_for(events.user_id)
        positions = self._positions(records, events, decoded.slots)
        if (positions[0] >= 0).any():
            keep = self._check_owner(records, events, rows, positions, misrouted)
            if keep is not None:
                events, rows, positions = events.take(keep), rows[keep], positions[:, keep]
        dead = decoded.dead_letters
        if misrouted:
            dead = sorted(dead + misrouted, key=lambda d: (d.topic, d.partition, d.offset))
            self.partition_warning.add(misrouted)
        return Placed(events=events, rows=rows, positions=positions, dead_letters=dead)

    def skip_applied(self, placed: Placed) -> ToApply:
        """The events to apply: not at or below their user's watermark, not a recent event id again."""
        events, rows, positions = placed.events, placed.rows, placed.positions
        id_hashes = event_id_hashes(events.event_id) if self.state.dedupe_window else None
        fresh, replayed, duplicates = self._not_yet_applied(events, rows, positions, id_hashes)
        # Users with re-consumed events get their profile again: the crash that made us re-read them
        # may have come after the state reached the changelog but before the profile reached its topic.
        again = np.unique(rows[~fresh]) if replayed else np.empty(0, dtype=np.int64)
        if not fresh.all():
            events, rows, positions = events.take(fresh), rows[fresh], positions[:, fresh]
            id_hashes = id_hashes[fresh] if id_hashes is not None else None
        return ToApply(events=events, rows=rows, positions=positions, id_hashes=id_hashes, replayed=replayed,
                       duplicates=duplicates, again=again)

    def remember(self, applied: ToApply) -> None:
        """After applying: each user's partition and watermarks, and the ring of recent event ids."""
        events, rows, positions, ids = applied.events, applied.rows, applied.positions, applied.id_hashes
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
        users = np.fromiter(utf8(events.user_id), dtype=object, count=len(events))
        wrong = from_topic & (keys[index] != users)  # elementwise in C; None never equals bytes
        if not wrong.any():
            return events
        for i, user in zip(index[wrong].tolist(), events.user_id[wrong].tolist()):
            key = records.keys[i]
            detail = ("no key: records must be keyed by user id" if key is None else
                      f"key {key[:64]!r} is not the user id {user[:64]!r}: records must be keyed by user id")
            misrouted.append(_dead_letter(records, i, WRONG_PARTITION, detail))
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
            misrouted.append(_dead_letter(records, i, WRONG_PARTITION,
                                          f"user {user[:64]!r} is read from partition {home}, this record is on "
                                          f"partition {records.partitions[i]}: records must be keyed by user id, "
                                          "with one partitioner"))
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


def _dead_letter(records: RecordBatch, i: int, reason: str, detail: str) -> DeadLetter:
    """Record i of the batch as a dead letter of the pipeline's own checks (the decoder's are stream/decode.py's)."""
    return DeadLetter(value=records.values[i], key=records.keys[i], reason=reason, detail=detail,
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
    encoded = list(utf8(event_ids))
    out = np.fromiter(map(crc, encoded), dtype=np.uint64, count=len(encoded))
    out |= np.fromiter(map(adler, encoded), dtype=np.uint64, count=len(encoded)) << np.uint64(32)
    out[out == 0] = 1
    return out


def refuse_ahead_of_clock(records: RecordBatch, events: EventColumns, max_ahead_ms: int, dead: list[DeadLetter]
                          ) -> EventColumns:
    """The events, less those stamped more than max_ahead_ms after this machine's clock: dead-lettered as
    ahead_of_clock into `dead` (kept in record order). They would move the event-time clock for every user (one
    event of 2199 put an evaluation's default cut in 2164). The daemon, replay and the commands that read logs
    offline (models/dataset.decode_offline) refuse the same events, and each takes --max-ahead, which the detail
    names. The caller skips this where max_ahead_ms is 0 (no bound)."""
    now = int(time.time() * 1000)
    ahead = events.ts > now + max_ahead_ms
    if not ahead.any():
        return events
    bound = f"--max-ahead {max_ahead_ms / 3_600_000:g}h; 0 turns the check off"
    for i, ts in zip(events.record_index[ahead].tolist(), events.ts[ahead].tolist()):
        detail = (f"'ts' {iso_time(ts, 'seconds')} is {(ts - now) / 86_400_000:,.1f} days after this machine's "
                  f"clock ({bound})")
        dead.append(_dead_letter(records, i, AHEAD_OF_CLOCK, detail))
    dead.sort(key=lambda d: (d.topic, d.partition, d.offset))
    return events.take(~ahead)
