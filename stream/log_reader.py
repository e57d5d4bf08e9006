"""Read partitions of a topic from the beginning to their current end, one consumed batch at a time.

The state restore (stream/changelog.py) hands each batch to a column-wise loader; `read_latest`
(stream/kafka.py, for `profiles forget`) keeps the latest value per key.

Read committed, so that on Kafka the records of aborted transactions (a fenced zombie's) stay
hidden. A transaction left open by a dead producer holds read_committed readers back until the
broker aborts it (transaction.timeout.ms); a broker that never does (Tansu) would hold them for
ever, so a partition that makes no progress for `stall_s` is read on uncommitted. That is safe
for the state changelog: every record carries its watermark, and events at or below it are
skipped on re-consumption, whether the record's transaction committed or not.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable

import numpy as np
from confluent_kafka import Message

from stream.kafka import FETCH_WITHOUT_STALLS, StreamError, end_offsets
from stream.settings import KafkaSettings

log = logging.getLogger(__name__)

# A batch of consumed records and the partition of each (int64), in the order consumed: offset order
# within a partition.
Take = Callable[[list[Message], np.ndarray], None]

# Bigger fetches for a reader that wants everything up to the end as fast as it comes: up to 8 MiB per
# partition per fetch (librdkafka's default is 1 MiB), and more records queued ahead of the reader.
BULK_FETCH = {"max.partition.fetch.bytes": 8 << 20, "fetch.max.bytes": 64 << 20, "queued.min.messages": 500_000,
              **FETCH_WITHOUT_STALLS}
BATCH = 20_000  # records per consume() call: big enough to amortise the calls, small enough to stay in cache


def read_to_end(kafka: KafkaSettings, topic: str, partitions: Iterable[int], take: Take, *,
                timeout_s: float = 600.0, stall_s: float = 30.0, on_progress: Callable[[], None] | None = None,
                on_start: Callable[[int], None] | None = None) -> None:
    """Hand every record of these partitions, from the beginning to the current end, to `take`
    (see the module's docstring for read_committed and the stall). `on_progress` is called whenever
    records arrive (a liveness probe's tick); `on_start` is told how many records there are to read, before the
    first. Python's cyclic garbage collector is paused meanwhile:
    the records are short-lived and acyclic, and its collections otherwise cost a fifth of the time."""
    wanted = sorted(set(partitions))
    if not wanted:
        return
    ends = {p: e for p, e in end_offsets(kafka, topic, timeout_s=min(timeout_s, 30.0)).items() if p in wanted}
    start = {p: 0 for p, end in ends.items() if end > 0}
    if on_start is not None:
        on_start(sum(ends.values()))
    deadline = time.monotonic() + timeout_s
    collecting = gc.isenabled()
    gc.disable()
    try:
        for isolation in ("read_committed", "read_uncommitted"):
            if not start:
                break
            if isolation == "read_uncommitted":
                log.warning("%s%s: no progress for %.0fs at offsets %s, short of the end %s (a transaction left "
                            "open by a dead producer?): reading on uncommitted", topic, sorted(start), stall_s,
                            start, {p: ends[p] for p in start})
            start = _read(kafka, topic, start, ends, take, isolation, deadline,
                          stall_s if isolation == "read_committed" else timeout_s, on_progress)
    finally:
        if collecting:
            gc.enable()


def _read(kafka: KafkaSettings, topic: str, start: dict[int, int], ends: dict[int, int], take: Take,
          isolation: str, deadline: float, stall_s: float, on_progress: Callable[[], None] | None) -> dict[int, int]:
    """Read partitions from `start` to `ends`; return {partition: position} of those that made no
    progress for `stall_s` (empty when all reached their end)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.client_config(BULK_FETCH, **{
        "group.id": "profiles-restore", "enable.auto.commit": False,
        "enable.partition.eof": False, "isolation.level": isolation}))
    try:
        consumer.assign([TopicPartition(topic, p, o) for p, o in start.items()])
        position, pending = dict(start), set(start)
        progressed = time.monotonic()
        while pending:
            now = time.monotonic()
            if now > deadline:
                raise StreamError(f"restoring from {topic} did not reach the end {ends} in time: at {position}")
            if now - progressed > stall_s:
                return {p: position[p] for p in pending}
            messages = consumer.consume(BATCH, 0.2)
            if messages and any(map(Message.error, messages)):
                messages = [m for m in messages if m.error() is None]
            if messages:
                parts = np.fromiter(map(Message.partition, messages), dtype=np.int64, count=len(messages))
                take(messages, parts)
                # Records of a partition come in offset order: its last one in the batch is where it stands.
                seen, last = np.unique(parts[::-1], return_index=True)
                for p, i in zip(seen.tolist(), (len(messages) - 1 - last).tolist()):
                    position[p] = messages[i].offset() + 1
                    if position[p] >= ends[p]:
                        pending.discard(p)
                progressed = time.monotonic()
                if on_progress is not None:
                    on_progress()
            elif pending:  # transaction markers and aborted records are never delivered: ask where we are
                for tp in consumer.position([TopicPartition(topic, p) for p in pending]):
                    if tp.offset > position[tp.partition]:
                        position[tp.partition], progressed = tp.offset, time.monotonic()
                    if tp.offset >= ends[tp.partition]:
                        pending.discard(tp.partition)
        return {}
    finally:
        consumer.close()
