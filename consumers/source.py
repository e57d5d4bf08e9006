"""The live source: a micro-batching Kafka consumer, a BatchSource (stream/sources.py).

`next_batch(stop)` returns a RecordBatch (possibly empty) and never blocks longer than the batch
window: a batch closes at `batch_max_events` records (or the pacer's cap) or `batch_max_ms`
milliseconds after the call started, whichever comes first, or as soon as `stop` is set. It never
ends (`exhausted` stays false); its positions are the consumer's, per assigned partition.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from stream.events import RecordBatch
from stream.kafka import FETCH_WITHOUT_STALLS, RateLimit
from stream.settings import Settings
from stream.sources import TimeRange

log = logging.getLogger(__name__)
# Errors the clients repeat while a broker is away (every few hundred ms): each distinct one at most every 30 s.
errors_log = logging.getLogger(__name__ + ".errors")
errors_log.addFilter(RateLimit())
# Connection failures: librdkafka logs each itself (a FAIL line naming the broker) before it reports it to
# the error callback, so the callback's warning would repeat it word for word.
LOGGED_BY_LIBRDKAFKA = frozenset({KafkaError._TRANSPORT, KafkaError._RESOLVE})

PartitionsHandler = Callable[[list[TopicPartition]], None]


class KafkaBatchSource:
    """The daemon's BatchSource: the input topics' assigned partitions (and the repartition topic's, with
    --repartition), consumed in micro-batches."""

    exhausted = False  # a live source never ends
    time_range: TimeRange | None = None  # every event is applied

    def __init__(self, settings: Settings, on_assign: PartitionsHandler, on_revoke: PartitionsHandler,
                 on_lost: PartitionsHandler, on_stats: Callable[[str], None] | None = None,
                 on_error: Callable[[KafkaError], None] | None = None) -> None:
        self.settings = settings
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_lost = on_lost
        self.consumer = Consumer(
            settings.kafka.client_config(
                FETCH_WITHOUT_STALLS,
                **{
                    "group.id": settings.group_id,
                    # Offsets are committed by stream/changelog.py, after the batch's output is acknowledged.
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    # A new group builds profiles from the whole retained history.
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": settings.session_timeout_ms,
                    # Liveness is the session heartbeat; this bounds one batch's processing time
                    # (the pacer keeps batches well inside it).
                    "max.poll.interval.ms": settings.max_poll_interval_ms,
                    # Only see records of committed transactions (where the broker honours it).
                    "isolation.level": "read_committed",
                    # librdkafka's statistics (per-partition consumer lag, from fetch watermarks)
                    # every 5 s, served from the consume calls the loop already makes.
                    **({"statistics.interval.ms": 5000, "stats_cb": on_stats} if on_stats else {}),
                    # Client-level errors (all brokers down, ...) to the caller, not as messages of consume().
                    **({"error_cb": on_error} if on_error else {}),
                }
            )
        )
        self.assigned: set[tuple[str, int]] = set()
        self.pacer = BatchPacer(settings.batch_max_events, settings.max_poll_interval_ms / 1000.0)
        # Records polled for the batch being built; the revoke handler may need them.
        self.pending = RecordBatch.empty()
        self.name = ",".join(settings.subscribed_topics)
        self.records_read = 0

    def subscribe(self) -> None:
        self.consumer.subscribe(
            list(self.settings.subscribed_topics), on_assign=self._assigned, on_revoke=self._revoked, on_lost=self._lost
        )

    def resubscribe(self) -> None:
        """Leave the subscription and take it again: a fresh join that sees topics created since."""
        self.consumer.unsubscribe()
        self.subscribe()

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("assigned %s", _names(partitions))
        self._on_assign(partitions)

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoked %s", _names(partitions))
        self._on_revoke(partitions)
        self.assigned -= {(p.topic, p.partition) for p in partitions}

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("lost %s (session expired): their pending records will be re-read by the new owner",
                    _names(partitions))
        self._on_lost(partitions)
        self.assigned -= {(p.topic, p.partition) for p in partitions}

    def take_pending(self) -> RecordBatch:
        batch, self.pending = self.pending, RecordBatch.empty()
        return batch

    def drop_pending(self, partitions: list[TopicPartition]) -> None:
        """Drop pending records of partitions this consumer no longer owns."""
        gone = {(p.topic, p.partition) for p in partitions}
        kept = self.take_pending()
        self.pending = kept.take([i for i, tp in enumerate(zip(kept.topics, kept.partitions)) if tp not in gone])

    def next_batch(self, stop: threading.Event | None = None) -> RecordBatch:
        stop = stop or threading.Event()
        max_events = self.pacer.cap
        deadline = time.monotonic() + self.settings.batch_max_ms / 1000.0
        while not stop.is_set():
            left = deadline - time.monotonic()
            wanted = max_events - len(self.pending)
            if left <= 0 or wanted <= 0:
                break
            # Short poll slices keep the loop responsive to `stop`.
            messages = self.consumer.consume(wanted, min(left, 0.1))
            good = [m for m in messages if m.error() is None]
            if len(good) != len(messages):
                self._log_errors(messages)
            if good:
                self.pending.extend(RecordBatch.from_messages(good))
        batch = self.take_pending()
        self.records_read += len(batch)
        return batch

    def positions(self) -> dict[str, dict[int, int]]:
        """Per input topic, assigned partition -> the next offset this consumer reads."""
        found: dict[str, dict[int, int]] = {}
        for tp in self.consumer.position([TopicPartition(t, p) for t, p in sorted(self.assigned)]):
            if tp.offset >= 0:
                found.setdefault(tp.topic, {})[tp.partition] = tp.offset
        return found

    def progress(self) -> tuple[int, int]:
        return self.records_read, 0  # a stream: no total

    @staticmethod
    def _log_errors(messages: list[Message]) -> None:
        for m in messages:
            err = m.error()
            if err is None or err.code() == KafkaError._PARTITION_EOF:
                continue
            if err.code() == KafkaError._MAX_POLL_EXCEEDED:
                log.error("a batch took longer than max.poll.interval.ms: this member left the group and rejoins; "
                          "its partitions move (their pending records are re-read, state restored). Raise "
                          "--max-poll-interval-ms or lower --batch-max-events if this repeats")
                continue
            if err.fatal():
                raise KafkaException(err)
            errors_log.warning("consumer error on %s[%s]: %s", m.topic(), m.partition(), err.str())

    def commit(self, offsets: list[TopicPartition]) -> None:
        self.consumer.commit(offsets=offsets, asynchronous=False)

    def group_metadata(self) -> object:
        """The consumer group's metadata (generation included), for offsets committed in a transaction."""
        return self.consumer.consumer_group_metadata()

    def close(self) -> None:
        self.consumer.close()


class BatchPacer:
    """Keeps a batch's processing time within a quarter of max.poll.interval.ms.

    A member that does not poll for max.poll.interval.ms is evicted from the group and its
    partitions move. A slow model (a big one on CPU, a cold GPU) or a slow broker could make a full
    batch that long, so the batch cap follows the measured cost per event: it shrinks at once when
    a batch overruns the budget and grows back, doubling, when batches are cheap again.
    """

    def __init__(self, max_events: int, max_poll_interval_s: float) -> None:
        self.max_events = max_events
        self.budget_s = max_poll_interval_s / 4
        self.cap = max_events

    def took(self, seconds: float, events: int) -> int:
        """Record that a batch of `events` took `seconds`; return the cap for the next batch."""
        if events <= 0:
            return self.cap
        if seconds > self.budget_s:
            cap = max(1, int(events * self.budget_s / seconds * 0.8))
            if cap < self.cap:
                log.warning("a batch of %d events took %.1fs, over a quarter of max.poll.interval.ms: "
                            "batches capped at %d events", events, seconds, cap)
                self.cap = cap
        elif self.cap < self.max_events and seconds < self.budget_s / 4 and events >= self.cap:
            self.cap = min(self.max_events, self.cap * 2)
        return self.cap


def _names(partitions: list[TopicPartition]) -> str:
    return ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing"
