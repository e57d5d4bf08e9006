"""Event logs as training data: every user's events in time order, with next-event targets.

Logs are read through the replay's sources (files, or a Kafka topic's range) and the same decoder as the
daemon (`stream.decode.decode_batch`), so training and serving share one event contract; invalid records
are counted, not used.
Targets and horizon labels are derived with numpy over the whole log, not per event.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from stream.events import Control, DeadLetter, EventColumns, PURCHASE, RecordBatch, iso_time
from stream.decode import decode_batch
from models.admission import refuse_ahead_of_clock
from stream.settings import KafkaSettings, Settings
from stream.sources import SourceError, TimeRange, no_usable_events_among, open_sources

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
READ_BATCH_RECORDS = 500_000  # records per read: few batches, within librdkafka's consume limit (1M)


def read_records(sources: Iterable[str | Path], kafka: KafkaSettings | None = None,
                 outputs: Mapping[str, str | None] | None = None) -> RecordBatch:
    """Every record of the sources, as `profiles replay` reads them: JSON-lines files (plain or gzip; topic =
    file, offset = line number), directories and globs of them, and Kafka topic ranges kafka://TOPIC?from=&to=
    (read with `kafka`), whose valid events outside the range's event time are left out, as the replay leaves
    them out. `outputs`: the command's own output files, never read as a log (stream.sources.expand_paths)."""
    names = [str(s) for s in sources]
    if kafka is None and any(s.startswith("kafka://") for s in names):
        raise SourceError("kafka:// sources need the brokers' address (--bootstrap-servers)")
    records = RecordBatch.empty()
    for source in open_sources(kafka, names, "jsonl", READ_BATCH_RECORDS, outputs):
        while not source.exhausted:
            batch = source.next_batch()
            records.extend(batch if source.time_range is None else _inside(batch, source.time_range))
    return records


def _inside(batch: RecordBatch, window: TimeRange) -> RecordBatch:
    """The batch without its valid events outside the window (records that are not valid events stay: they
    are counted as invalid, or are control records)."""
    events, _ = decode_batch(batch, 1 << 30)
    outside = np.zeros(len(batch), dtype=bool)
    outside[events.record_index[~window.mask(events.ts)]] = True
    return batch.take(np.flatnonzero(~outside).tolist())


@dataclass
class EventLog:
    """Valid events sorted by (user, event time, file order); arrays are aligned, length N."""

    users: np.ndarray  # (U,) object: user ids, in the order of their groups
    start: np.ndarray  # (U,) index of each user's first event
    length: np.ndarray  # (U,) events per user
    user_of_event: np.ndarray  # (N,) user index
    position: np.ndarray  # (N,) index of the event within its user's sequence
    events: EventColumns  # (N,) columns, sorted
    invalid: int  # lines that broke the contract

    def __len__(self) -> int:
        return len(self.events)

    @property
    def first_ts(self) -> int:
        return int(self.events.ts.min()) if len(self) else 0

    @property
    def last_ts(self) -> int:
        return int(self.events.ts.max()) if len(self) else 0

    def gap_seconds(self) -> tuple[np.ndarray, np.ndarray]:
        """(seconds since the user's previous event, first-event-of-user flag) per event."""
        ts = self.events.ts
        first = self.position == 0
        previous = np.empty_like(ts)
        previous[1:] = ts[:-1]
        previous[first] = ts[first]
        return (ts - previous) / 1000.0, first

    def next_index(self) -> np.ndarray:
        """Index of the same user's next event, -1 for a user's last event."""
        nxt = np.arange(1, len(self) + 1)
        last = self.position == self.length[self.user_of_event] - 1
        nxt[last] = -1
        return nxt

    def purchase_within(self, horizon_ms: int) -> np.ndarray:
        """1 where the same user purchases within (ts, ts + horizon] after the event, else 0."""
        ts, n = self.events.ts, len(self)
        purchases = np.flatnonzero(self.events.type_idx == PURCHASE)
        if len(purchases) == 0:
            return np.zeros(n, dtype=np.float32)
        # The first purchase strictly after each event, then check it is the same user and in time.
        k = np.searchsorted(purchases, np.arange(n), side="right")
        has = k < len(purchases)
        nxt = purchases[np.minimum(k, len(purchases) - 1)]
        same_user = self.user_of_event[nxt] == self.user_of_event
        return (has & same_user & (ts[nxt] - ts <= horizon_ms)).astype(np.float32)

    def before(self, until_ms: int) -> "EventLog":
        """The log restricted to the events at or before until_ms."""
        return _build(self.events.take(np.flatnonzero(self.events.ts <= until_ms)), self.invalid)

    def subset_users(self, keep: np.ndarray) -> "EventLog":
        """The log restricted to the users where `keep` (U,) is true."""
        event_keep = keep[self.user_of_event]
        idx = np.flatnonzero(event_keep)
        return _build(self.events.take(idx), self.invalid)


def _build(ev: EventColumns, invalid: int) -> EventLog:
    users, user_of_event = np.unique(ev.user_id, return_inverse=True)
    order = np.lexsort((ev.record_index, ev.ts, user_of_event))
    ev = ev.take(order)
    user_of_event = user_of_event[order]
    length = np.bincount(user_of_event, minlength=len(users))
    start = np.zeros_like(length)
    np.cumsum(length[:-1], out=start[1:])
    position = np.arange(len(order)) - start[user_of_event]
    return EventLog(users, start, length, user_of_event, position, ev, invalid)


def event_log(ev: EventColumns, invalid: int = 0) -> EventLog:
    """Decoded events as an EventLog (sorted by user, time, arrival)."""
    return _build(ev, invalid)


def decode_offline(records: RecordBatch, max_event_bytes: int, controls: list[Control] | None = None, *,
                   max_ahead_ms: int = Settings.max_ahead_ms) -> tuple[EventColumns, list[DeadLetter]]:
    """decode_batch for the commands that read logs offline: the events stamped more than max_ahead_ms (their
    --max-ahead; 0: no bound) after this machine's clock are dead letters too, as the daemon refuses them
    (ahead_of_clock; one event of 2199 would move every cut)."""
    ev, dead = decode_batch(records, max_event_bytes, controls)
    if max_ahead_ms:
        ev = refuse_ahead_of_clock(records, ev, max_ahead_ms, dead)
    return ev, dead


def warn_skipped(dead: list[DeadLetter]) -> None:
    """One warning for the lines a command left out of its logs, with the first as the example."""
    if dead:
        first = dead[0]
        log.warning("%d invalid line(s) skipped, e.g. %s:%d: %s", len(dead), first.topic, first.offset, first.detail)


def usable_events(records: RecordBatch, max_event_bytes: int, *, max_ahead_ms: int = Settings.max_ahead_ms
                  ) -> tuple[EventColumns, list[DeadLetter]]:
    """The events of `records` the daemon would apply, in record order, and the dead letters: what breaks the
    contract is left out (and logged), as are a user's events before a forget record for them (the daemon
    erases them; what comes after is a new user) and repeats of a (user, event_id) pair already seen (the
    daemon skips those within its dedupe window; here wherever they are, so that an at-least-once producer's
    retries neither train nor judge a model twice); and those stamped more than max_ahead_ms ahead (decode_offline)."""
    controls: list[Control] = []
    ev, dead = decode_offline(records, max_event_bytes, controls, max_ahead_ms=max_ahead_ms)
    warn_skipped(dead)
    forgets = [c for c in controls if c.kind == "forget"]
    if forgets:
        # An event is erased where a forget for its user comes after it: the user's last forget tells.
        last_forget = {}
        for c in forgets:
            last_forget[c.user_id] = c.record_index
        erased = np.fromiter((last_forget.get(u, -1) > r for u, r in zip(ev.user_id.tolist(),
                                                                         ev.record_index.tolist())),
                             dtype=bool, count=len(ev))
        if erased.any():
            log.info("%d event(s) of %d user(s) left out: erased by forget records", int(erased.sum()),
                     len(set(ev.user_id[erased].tolist())))
            ev = ev.take(np.flatnonzero(~erased))
    ids = ev.event_id.tolist()
    if len(set(ids)) < len(ids):  # rare: only then the (user, event_id) pairs, first seen kept
        seen: set = set()
        first = np.fromiter((not (k in seen or seen.add(k)) for k in zip(ev.user_id.tolist(), ids)), dtype=bool,
                            count=len(ids))
        if not first.all():
            log.warning("%d duplicate event(s) skipped (an event_id the same user already had)", int((~first).sum()))
            ev = ev.take(np.flatnonzero(first))
    return ev, dead


def load_events(paths: Sequence[str | Path], max_event_bytes: int = 65536, kafka: KafkaSettings | None = None,
                outputs: Mapping[str, str | None] | None = None, *, max_ahead_ms: int = Settings.max_ahead_ms
                ) -> EventLog:
    """Read, validate and sort the events of the sources (read_records; usable_events: what the daemon would
    apply, with the command's --max-ahead as max_ahead_ms)."""
    ev, dead = usable_events(read_records(paths, kafka, outputs), max_event_bytes, max_ahead_ms=max_ahead_ms)
    if not len(ev) and dead:  # what the records are instead (a JSON array, CSV, UTF-16), as replay says it
        raise SourceError(no_usable_events_among(list(paths), dead))
    return _build(ev, len(dead))


def split_lines_by_time(source: str | Path, test_fraction: float, train_out: str | Path,
                        test_out: str | Path, *, max_ahead_ms: int = Settings.max_ahead_ms) -> tuple[int, int, str]:
    """Copy the lines of `source` into a train and a test file by event time.

    The cut is the event time below which (1 - test_fraction) of the valid events lie, so the test
    part is the latest test_fraction of the events (events at the cut stay in training).
    Events stamped more than max_ahead_ms ahead of this machine's clock (decode_offline) are left out of the
    quantile, and stay in training as invalid lines do.
    Returns (train lines, test lines, cut as ISO time).
    """
    records = read_records([source])
    lines, n = records.values, len(records)
    ev, dead = decode_offline(records, 1 << 30, max_ahead_ms=max_ahead_ms)
    if not len(ev):  # no event time to cut at
        raise SourceError(no_usable_events_among([source], dead))
    ts = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)  # invalid lines: train side
    ts[ev.record_index] = ev.ts
    cutoff = int(np.quantile(ev.ts, 1 - test_fraction, method="lower"))
    test = ts > cutoff
    if not test.any():  # the latest events all share the cut's time: a test part of none would judge nothing
        raise SourceError(f"no event of {source} is later than the cut {iso_time(cutoff)} at --test-fraction "
                          f"{test_fraction:g} ({int((ev.ts == cutoff).sum()):,} of its {len(ev):,} events share that "
                          "time): the test part is the events after the cut, and it would be empty")
    if dead:  # copied, not dropped, but the user should know the training part holds them
        first = dead[0]
        log.warning("%d line(s) that are no usable event (%s) kept in the training part, e.g. line %d: %s", len(dead),
                    ", ".join(sorted({d.reason for d in dead})), first.offset, first.detail)
    for path, keep in ((train_out, ~test), (test_out, test)):
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "wb") as out:
            out.writelines(line + b"\n" for line, k in zip(lines, keep.tolist()) if k)
    when = iso_time(cutoff)
    return int((~test).sum()), int(test.sum()), when
