"""Reading profiles back without code: `profiles tail` follows the output topic, `profiles get` finds
users' latest profiles. Both read with manually assigned partitions, a throwaway group id and no
offset commits: they leave no trace in any consumer group.

`get` does not replay the topic: a profile is keyed by user id, so it computes the partition the
daemon's producer chose for the key (librdkafka's partitioner, `consistent_random` unless a
`partitioner` property says otherwise) and reads that partition backwards from its end in chunks,
until every wanted user is found or the partition's start is reached.
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from stream.kafka import FETCH_WITHOUT_STALLS, StreamError, TopicError, end_offsets
from stream.settings import KafkaSettings

# librdkafka's partitioners, for a message with a key (all of them pick at random for a NULL key).
_HASHED = {"consistent": "crc32", "consistent_random": "crc32", "murmur2": "murmur2", "murmur2_random": "murmur2",
           "fnv1a": "fnv1a", "fnv1a_random": "fnv1a"}
DEFAULT_PARTITIONER = "consistent_random"  # librdkafka's default, the daemon's producer's


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's default partitioner; librdkafka's `murmur2`)."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    end = length & ~3
    for i in range(0, end, 4):
        k = (int.from_bytes(data[i:i + 4], "little") * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    extra = length & 3
    if extra >= 3:
        h ^= data[end + 2] << 16
    if extra >= 2:
        h ^= data[end + 1] << 8
    if extra >= 1:
        h ^= data[end]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def partition_for(key: bytes, partitions: int, partitioner: str = DEFAULT_PARTITIONER) -> int | None:
    """The partition librdkafka's `partitioner` sends `key` to; None when it cannot be known (random)."""
    hashing = _HASHED.get(partitioner)
    if hashing == "crc32":
        return zlib.crc32(key) % partitions
    if hashing == "murmur2":
        return (murmur2(key) & 0x7FFFFFFF) % partitions
    if hashing == "fnv1a":  # librdkafka: abs((int32_t)hash % partitions)
        h = fnv1a(key)
        return abs(h - (1 << 32) if h >= 1 << 31 else h) % partitions
    return None


def _reader(kafka: KafkaSettings, purpose: str) -> Consumer:
    """A consumer for assigned partitions only: a throwaway group id, never committing."""
    return Consumer(kafka.client_config(FETCH_WITHOUT_STALLS, **{
        "group.id": f"profiles-{purpose}-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
        "enable.auto.offset.store": False, "enable.partition.eof": False, "auto.offset.reset": "earliest"}))


def _partitions(consumer: Consumer, topic: str, timeout_s: float) -> list[int]:
    meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise TopicError(f"topic {topic} not found")
    return sorted(meta.partitions)


def as_line(key: bytes | None, value: bytes | None) -> bytes:
    """One JSON line for a profile record: its value as published, or {"user_id", "erased": true} for a
    tombstone (as `profiles replay --out` writes an erasure)."""
    if value is None:
        user = key.decode("utf-8", "replace") if key is not None else None
        return orjson.dumps({"user_id": user, "erased": True}) + b"\n"
    return value.rstrip(b"\n") + b"\n"


# ---- tail


def tail(kafka: KafkaSettings, topic: str, from_beginning: bool, max_records: int | None,
         write: Callable[[list[bytes]], None], timeout_s: float = 30.0) -> int:
    """Follow `topic`, calling `write` with the lines of each consumed chunk, until `max_records` lines
    (forever when None; Ctrl-C raises KeyboardInterrupt out of here). Starts at each partition's true
    end (only new profiles) unless `from_beginning`. Returns the records written."""
    consumer = _reader(kafka, "tail")
    written = 0
    try:
        partitions = _partitions(consumer, topic, timeout_s)
        if from_beginning:
            start = {p: OFFSET_BEGINNING for p in partitions}
        else:
            # The true high watermark: some brokers' ListOffsets (behind OFFSET_END) answers short of it.
            start = end_offsets(kafka, topic, timeout_s)
        consumer.assign([TopicPartition(topic, p, start.get(p, OFFSET_BEGINNING)) for p in partitions])
        while max_records is None or written < max_records:
            messages = consumer.consume(1000, 0.5)  # short: Ctrl-C is served between calls
            lines = [as_line(m.key(), m.value()) for m in messages if m.error() is None]
            if max_records is not None:
                lines = lines[:max_records - written]
            if lines:
                write(lines)
                written += len(lines)
        return written
    finally:
        consumer.close()


# ---- get


@dataclass
class Lookup:
    found: dict[str, bytes | None]  # user -> latest value (None: a tombstone, the user was erased)
    missing: list[str]
    records_read: int


def get_latest(kafka: KafkaSettings, topic: str, users: Iterable[str], keys: dict[str, bytes] | None = None,
               chunk: int = 1000, timeout_s: float = 60.0, stall_s: float = 3.0) -> Lookup:
    """Each user's latest record in `topic` (keyed by `keys[user]`, default the id's UTF-8), reading only
    the partition the producer's partitioner gives the key, backwards from its end: chunks of `chunk`
    records, doubling, until every user of the partition is found or its start is reached."""
    users = list(dict.fromkeys(users))
    keys = keys or {}
    key_of = {u: keys.get(u, u.encode("utf-8", "surrogatepass")) for u in users}
    partitioner = str(dict(kafka.extra).get("partitioner", DEFAULT_PARTITIONER))
    deadline = time.monotonic() + timeout_s
    consumer = _reader(kafka, "get")
    found: dict[bytes, bytes | None] = {}
    records = 0
    try:
        partitions = _partitions(consumer, topic, timeout_s)
        wanted: dict[int, set[bytes]] = {}
        for key in key_of.values():
            p = partition_for(key, len(partitions), partitioner)
            for q in partitions if p is None else [p]:  # a random partitioner: every partition
                wanted.setdefault(q, set()).add(key)
        ends = end_offsets(kafka, topic, timeout_s)
        for p, remaining in sorted(wanted.items()):
            low = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[0]
            hi, step = ends.get(p, 0), chunk
            remaining = remaining - found.keys()
            while remaining and hi > max(low, 0):
                lo = max(low, 0, hi - step)
                latest, n = _read_range(consumer, topic, p, lo, hi, remaining, deadline, stall_s)
                records += n
                found.update(latest)
                remaining -= latest.keys()
                hi, step = lo, min(step * 2, 100_000)
    finally:
        consumer.close()
    return Lookup({u: found[k] for u, k in key_of.items() if k in found},
                  [u for u, k in key_of.items() if k not in found], records)


def _read_range(consumer: Consumer, topic: str, partition: int, lo: int, hi: int, keys: set[bytes],
                deadline: float, stall_s: float) -> tuple[dict[bytes, bytes | None], int]:
    """The last record of each of `keys` in offsets [lo, hi) of one partition, and the records read.
    Stops early when the partition makes no progress for `stall_s` (a read_committed reader stops at an
    open transaction; aborted records and markers are never delivered)."""
    consumer.assign([TopicPartition(topic, partition, lo)])
    latest: dict[bytes, bytes | None] = {}
    position, records, progressed = lo, 0, time.monotonic()
    while position < hi:
        now = time.monotonic()
        if now > deadline:
            raise StreamError(f"reading {topic}[{partition}] back did not finish in time (at offset {position})")
        if now - progressed > stall_s:
            break
        messages = consumer.consume(1000, 0.2)
        for m in messages:
            if m.error() is not None or m.partition() != partition or m.offset() < lo:
                continue  # (a record fetched for an earlier chunk's assignment)
            position = max(position, m.offset() + 1)
            if m.offset() < hi:
                records += 1
                if m.key() in keys:
                    latest[m.key()] = m.value()
        if messages:
            progressed = time.monotonic()
        else:
            offset = consumer.position([TopicPartition(topic, partition)])[0].offset
            if offset > position:
                position, progressed = offset, time.monotonic()
    return latest, records
