"""Kafka plumbing: topic admin, the co-partitioning check, and a producer that knows what was acknowledged."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from stream.settings import LIBRDKAFKA_LOG, KafkaSettings

# Every consumer that reads in bulk. librdkafka (2.4 and later) stops fetching a partition for
# fetch.queue.backoff.ms (1000 ms by default) whenever its local queue is above queued.min.messages or
# queued.max.messages.kbytes. A reader that does work between its consume calls (all of ours) fills that
# queue, and then finds it drained and waits out the rest of the second: a restore of 1M users spent 3.5
# of its 6.8 s waiting so (docs/benchmarks.md, session 31). Looking again after 10 ms costs a wake-up of
# librdkafka's thread every 10 ms, and only while the queue is full. A default (client_config's
# `defaults`): a user's --kafka-config may set another value.
FETCH_WITHOUT_STALLS = {"fetch.queue.backoff.ms": 10}
CONNECT_STEP_S = 1.0  # check_reachable asks for metadata this long at a time

log = logging.getLogger(__name__)


class StreamError(Exception):
    """Root of the stream package's errors."""


class TopicError(StreamError):
    """Topics missing or laid out in a way the pipeline cannot work with."""


class PublishError(StreamError):
    """Records the broker did not acknowledge."""


class BrokerUnreachable(StreamError):
    """No broker answered at the bootstrap address in time."""


class RateLimit(logging.Filter):
    """Lets the same message through at most once per `interval_s`: librdkafka repeats a failing
    connection's error every few hundred milliseconds."""

    def __init__(self, interval_s: float = 30.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        # The text without its digits: "after 14391ms" and the like differ between repeats.
        key = "".join(ch for ch in record.getMessage() if not ch.isdigit())
        now = time.monotonic()
        if now - self._last.get(key, -self.interval_s) < self.interval_s:
            return False
        self._last[key] = now
        return True


def configure_librdkafka_log(debug: bool) -> None:
    """librdkafka's log: errors only, each distinct one at most every 30 s (a dead broker is reported
    as one clear error by whoever needed it); everything, still rate-limited, when debugging."""
    LIBRDKAFKA_LOG.setLevel(logging.DEBUG if debug else logging.ERROR)
    if not any(isinstance(f, RateLimit) for f in LIBRDKAFKA_LOG.filters):
        LIBRDKAFKA_LOG.addFilter(RateLimit())


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def check_reachable(kafka: KafkaSettings, timeout_s: float) -> None:
    """Raise BrokerUnreachable, naming the address and the settings to fix, unless a broker answers a
    metadata request within `timeout_s`. Run before anything else talks to Kafka, so that a wrong
    address is one line within the timeout instead of every client's retries."""
    lines = _Lines()
    quiet = logging.Logger("librdkafka.connect-check")  # unregistered: its lines go into the error only
    quiet.addHandler(lines)
    try:
        admin = AdminClient(kafka.client_config(logger=quiet))
    except KafkaException as exc:  # a property librdkafka does not know, or a value it refuses
        raise BrokerUnreachable(kafka.scrub(f"the Kafka settings were refused: {exc.args[0].str()} (--kafka-config, "
                                            "--kafka-config-file or their PROFILES_ variables)")) from None
    deadline = time.monotonic() + timeout_s
    log.debug("waiting up to %gs for a Kafka broker at %s", timeout_s, kafka.bootstrap_servers)
    try:
        # A second at a time: Ctrl-C is served between the calls (not after the whole wait), and a wait of weeks
        # is never one librdkafka timeout (milliseconds in 31 bits: 24.8 days at most).
        while True:
            asked = time.monotonic()
            try:
                admin.list_topics(timeout=max(0.001, min(CONNECT_STEP_S, deadline - asked)))
                break
            except KafkaException:
                now = time.monotonic()
                if now >= deadline:
                    raise
                time.sleep(max(0.0, min(asked + CONNECT_STEP_S, deadline) - now))  # an error at once: no busy loop
    except KafkaException as exc:
        admin.poll(0)  # serve the log lines queued while connecting
        reason = next((line.split(": ", 1)[-1] for line in reversed(lines.lines) if "fail" in line.lower()),
                      exc.args[0].str())
        raise BrokerUnreachable(
            f"no Kafka broker reachable at {kafka.bootstrap_servers} within {timeout_s:g}s ({reason}); "
            "set --bootstrap-servers or KAFKA_BOOTSTRAP_SERVERS (--connect-timeout waits longer)") from None


def admin_client(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.client_config())


def partition_counts(admin: AdminClient, topics: Iterable[str], timeout_s: float = 10.0) -> dict[str, int]:
    """Partition count of each topic; a missing topic is absent from the result."""
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicError(f"cannot read cluster metadata: {exc.args[0]}") from None
    out = {}
    for topic in topics:
        meta = metadata.topics.get(topic)
        if meta is not None and meta.error is None:
            out[topic] = len(meta.partitions)
    return out


def check_exist(admin: AdminClient, topics: tuple[str, ...]) -> dict[str, int]:
    """Each input topic's partition count; TopicError naming those that do not exist."""
    counts = partition_counts(admin, topics)
    missing = [t for t in topics if t not in counts]
    if missing:
        raise TopicError(f"input topic(s) not found: {', '.join(missing)}")
    return counts


def check_copartitioned(admin: AdminClient, topics: tuple[str, ...]) -> int:
    """Input topics must exist and have equal partition counts: a user's events from
    every topic must land in the same consumer (partition n of each topic goes together)."""
    counts = check_exist(admin, topics)
    if len(set(counts.values())) > 1:
        layout = ", ".join(f"{t}={counts[t]}" for t in topics)
        raise TopicError(
            "input topics are not co-partitioned by user id: partition counts differ "
            f"({layout}); give them the same partition count and the same key (user_id)"
        )
    return next(iter(counts.values()))


def ensure_topics(admin: AdminClient, partitions: dict[str, int], timeout_s: float = 15.0,
                  compacted: Iterable[str] = ()) -> None:
    """Create the topics that do not exist yet (existing ones are left as they are). Topics named
    in `compacted` keep the latest record per key forever (cleanup.policy=compact)."""
    existing = partition_counts(admin, partitions)
    compacted = set(compacted)

    def config(topic: str) -> dict[str, str]:
        if topic in compacted:
            return {"cleanup.policy": "compact", "retention.ms": "-1"}
        # retention.ms set explicitly: some brokers (Tansu) need it at creation.
        return {"retention.ms": str(7 * 24 * 3600 * 1000)}

    new = [NewTopic(t, n, 1, config=config(t)) for t, n in partitions.items() if t not in existing]
    if not new:
        return
    for topic, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            log.info("created topic %s", topic)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {topic}: {exc.args[0].str()}") from None


class Publisher:
    """A producer that knows whether the broker acknowledged everything.

    `flush()` waits for every record produced so far and raises PublishError if
    any was not acknowledged, so the caller commits input offsets only after a
    complete, acknowledged publish.
    """

    def __init__(self, kafka: KafkaSettings, transactional_id: str = "", best_effort_topics: Iterable[str] = (),
                 **overrides: object) -> None:
        if transactional_id:
            overrides = {
                "transactional.id": transactional_id,
                # One transaction spans one batch (milliseconds). If this instance dies mid-transaction,
                # read_committed readers of its partitions (the next owner's restore included) wait
                # until the broker aborts it: keep that short (librdkafka's default is 60 s).
                "transaction.timeout.ms": 10_000,
                "message.timeout.ms": 10_000,  # librdkafka: at most the transaction timeout
                **overrides,
            }
        conf = kafka.client_config(
            {  # tuning: a user's --kafka-config may change it
                # Wait a few ms to fill bigger requests: profiles come in bursts, one per batch.
                "linger.ms": 5,
                # Profiles are repetitive JSON: lz4 shrinks them cheaply.
                "compression.type": "lz4",
                # Room for a few large batches in flight; produce() blocks (polls) past it.
                "queue.buffering.max.messages": 500_000,
                # Fail a record after 2 min of retries instead of librdkafka's 5 min default:
                # the daemon then exits non-zero and restarts from the last commit.
                "message.timeout.ms": 120_000,
            },
            **{
                # No duplicates or reordering from internal retries.
                "enable.idempotence": True,
                **overrides,  # (the transactional ones above, and the caller's)
            },
        )
        # Delivery reports for failures only: a per-record Python callback costs more than the produce.
        # flush() returning 0 with no failure reported means the broker acknowledged every record.
        # The callback closes over a list, not over self: no reference cycle, so the producer is
        # destroyed (and its connections closed) as soon as the Publisher is dropped.
        # Records to `best_effort_topics` (dead letters) that fail are set aside for the caller to log and
        # count, and do not fail flush(): losing a dead letter must not stop the daemon, or make it loop.
        failed: list[str] = []
        lost: list[str] = []
        best_effort = frozenset(best_effort_topics)

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                if msg.topic() in best_effort:
                    lost.append(f"{msg.topic()}: {err.str()} ({_source_of(msg.headers())})")
                else:
                    failed.append(err.str())

        conf.update({"delivery.report.only.error": True, "on_delivery": on_delivery})
        self._producer = Producer(conf)
        self._failed = failed
        self._lost = lost
        self.transactional = bool(transactional_id)
        self.in_transaction = False

    # ---- transactions (exactly-once mode): one per batch, offsets included

    def init_transactions(self, timeout_s: float = 60.0) -> None:
        """Register the transactional id (fencing an older producer with the same id)."""
        self._producer.init_transactions(timeout_s)

    def begin(self) -> None:
        """Open a transaction unless one is open: everything produced until commit() belongs to it."""
        if not self.in_transaction:
            self._producer.begin_transaction()
            self.in_transaction = True

    def commit(self, offsets: list, group_metadata: object, timeout_s: float = 60.0) -> None:
        """Commit the open transaction with the consumer's input offsets in it. Raises KafkaException;
        on `txn_requires_abort()` call abort() and produce the transaction's content again."""
        if offsets:
            self._producer.send_offsets_to_transaction(offsets, group_metadata, timeout_s)
        self._producer.commit_transaction(timeout_s)
        self.in_transaction = False
        self._failed.clear()  # a failed delivery fails the commit; the commit went through

    def abort(self, timeout_s: float = 60.0) -> None:
        if self.in_transaction:
            self._producer.abort_transaction(timeout_s)
            self.in_transaction = False
        self._failed.clear()

    def produce(self, topic: str, key: bytes | None, value: bytes | None,
                headers: list[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers)
                return
            except BufferError:
                # Local queue full: serve delivery reports until there is room.
                self._producer.poll(0.05)

    def produce_many(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        """(key, value) records to `topic`, in order: the per-profile loop of every batch, kept tight."""
        produce, i = self._producer.produce, 0
        while i < len(records):
            try:
                for key, value in records[i:] if i else records:
                    produce(topic, value, key)
                    i += 1
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain, then go on from record i

    def produce_to_partitions(self, topic: str, keys: list[bytes], values: list[bytes | None],
                              partitions: list[int]) -> None:
        """Records to explicit partitions of `topic` (the state changelog mirrors input partitions)."""
        produce, i = self._producer.produce, 0
        while i < len(keys):
            try:
                for key, value, partition in zip(keys[i:], values[i:], partitions[i:]):
                    produce(topic, value, key, partition)
                    i += 1
            except BufferError:
                self._producer.poll(0.05)

    def poll(self) -> None:
        self._producer.poll(0)

    def take_lost(self) -> list[str]:
        """Best-effort records the broker did not acknowledge since the last call (one line each)."""
        lost = list(self._lost)
        self._lost.clear()
        return lost

    def flush_briefly(self, timeout_s: float = 3.0) -> int:
        """Send what is queued for at most `timeout_s` (a command interrupted by Ctrl-C should end in
        seconds); returns the records left unsent."""
        return self._producer.flush(timeout_s)

    def flush(self, timeout_s: float = 120.0) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise PublishError(f"{remaining} record(s) still unacknowledged after {timeout_s:.0f}s")
        if self._failed:
            failed = list(self._failed)
            self._failed.clear()
            raise PublishError(f"{len(failed)} record(s) were not acknowledged: {failed[0]}")


def _source_of(headers: list[tuple[str, bytes]] | None) -> str:
    """`topic[partition]@offset` of a dead letter, from its headers ('?' where absent)."""
    h = dict(headers or [])
    return "{}[{}]@{}".format(*(h.get(f"dlq.{k}", b"?").decode("utf-8", "replace")
                                for k in ("topic", "partition", "offset")))


def end_offsets(kafka: KafkaSettings, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """The true end offset (high watermark) of every partition of `topic`.

    ListOffsets alone is not enough: some Kafka-compatible brokers (Tansu) answer it
    with the base offset of the last record batch + 1, short of the real end, and with 0 for a
    read_committed client while a transaction is open. Fetch responses carry the real high
    watermark, so read (uncommitted) one record from that last batch and take the watermark the
    fetch brought back.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(kafka.client_config(**{"group.id": "profiles-end-offsets", "enable.auto.commit": False,
                                               "isolation.level": "read_uncommitted"}))
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            raise TopicError(f"topic {topic} not found")
        listed = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
                  for p in meta.partitions}
        pending = {p for p, end in listed.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, listed[p] - 1) for p in pending])
        deadline = time.monotonic() + timeout_s
        seen = set()
        while seen != pending:
            if time.monotonic() > deadline:
                raise StreamError(f"could not read the end offsets of {topic}")
            messages = consumer.consume(1000, 0.2)
            seen |= {m.partition() for m in messages if m.error() is None}
            if not messages:  # a transaction marker is never delivered: the position moves past it
                seen |= {tp.partition for tp in consumer.position([TopicPartition(topic, p) for p in pending - seen])
                         if tp.offset >= listed[tp.partition]}
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), cached=True)[1] if p in pending else 0
                for p in listed}
    finally:
        consumer.close()


def offsets_at(kafka: KafkaSettings, topic: str, when: str, timeout_s: float = 30.0) -> dict[int, int]:
    """Per partition of `topic`, the offset a group starting at `when` reads first: "latest" the end, epoch ms
    (a decimal string) the first record written at or after it (the end where there is none)."""
    from confluent_kafka import Consumer, TopicPartition

    ends = end_offsets(kafka, topic, timeout_s)
    if when == "latest" or not ends:
        return ends
    consumer = Consumer(kafka.client_config(**{"group.id": "profiles-offsets-at", "enable.auto.commit": False}))
    try:
        found = consumer.offsets_for_times([TopicPartition(topic, p, int(when)) for p in ends], timeout=timeout_s)
        return {tp.partition: tp.offset if tp.offset >= 0 else ends[tp.partition] for tp in found}
    finally:
        consumer.close()


def committed_partitions(kafka: KafkaSettings, group_id: str, topic: str, timeout_s: float = 30.0) -> set[int]:
    """The partitions of `topic` where `group_id` has a committed offset."""
    from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

    consumer = Consumer(kafka.client_config(**{"group.id": group_id, "enable.auto.commit": False}))
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        parts = [TopicPartition(topic, p) for p in (meta.partitions if meta is not None and meta.error is None else ())]
        committed = consumer.committed(parts, timeout=timeout_s) if parts else []
        return {tp.partition for tp in committed if tp.offset != OFFSET_INVALID and tp.offset >= 0}
    finally:
        consumer.close()


def seed_group_offsets(kafka: KafkaSettings, group_id: str, offsets: dict[str, dict[int, int]],
                       timeout_s: float = 30.0) -> dict[str, dict[int, int]]:
    """Commit `offsets` for the partitions where `group_id` has no committed offset yet.

    Used when a daemon starts from a replayed state: it must continue where the replay stopped,
    not from the group's default start. Partitions the group already committed are left alone
    (a restart must not rewind a running group). Returns what was committed.
    """
    from confluent_kafka import OFFSET_INVALID, Consumer, TopicPartition

    wanted = [TopicPartition(t, int(p), int(o)) for t, parts in offsets.items() for p, o in parts.items()]
    if not wanted:
        return {}
    consumer = Consumer(kafka.client_config(**{"group.id": group_id, "enable.auto.commit": False}))
    try:
        committed = consumer.committed([TopicPartition(tp.topic, tp.partition) for tp in wanted], timeout=timeout_s)
        have = {(tp.topic, tp.partition) for tp in committed if tp.offset != OFFSET_INVALID and tp.offset >= 0}
        seed = [tp for tp in wanted if (tp.topic, tp.partition) not in have]
        if seed:
            consumer.assign(seed)  # a simple (unsubscribed) member may commit explicit offsets
            consumer.commit(offsets=seed, asynchronous=False)
        out: dict[str, dict[int, int]] = {}
        for tp in seed:
            out.setdefault(tp.topic, {})[tp.partition] = tp.offset
        return out
    finally:
        consumer.close()


def read_latest(kafka: KafkaSettings, topic: str, partitions: Iterable[int], timeout_s: float = 600.0,
                stall_s: float = 30.0, on_progress: Callable[[], None] | None = None,
                ) -> dict[int, dict[bytes, bytes | None]]:
    """The latest value of every key in these partitions of `topic`, read from the beginning to the
    current end (None: a tombstone), as stream/log_reader.py reads (read_committed, then uncommitted past
    a partition stalled for `stall_s`). A broker that does not compact (Tansu) just makes this longer."""
    from stream.log_reader import read_to_end  # it reads with end_offsets, above

    latest: dict[int, dict[bytes, bytes | None]] = {p: {} for p in sorted(set(partitions))}

    def take(messages: list[Message], _partitions: object) -> None:
        for m in messages:
            latest[m.partition()][m.key()] = m.value()

    read_to_end(kafka, topic, latest, take, timeout_s=timeout_s, stall_s=stall_s, on_progress=on_progress)
    return latest
