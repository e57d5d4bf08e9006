"""The input event contract, and the batches that carry it: records in (RecordBatch), events out as
columns (EventColumns), bad records as DeadLetter data, control records (Control). Decoding and
validating a whole batch at once is stream/decode.py (`decode_batch`).

The contract itself (fields, rules, dead-letter reasons, control records) is written once, in
docs/contracts.md.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Sequence

import numpy as np

EVENT_TYPES: tuple[str, ...] = ("search", "click", "add_to_cart", "purchase")
TYPE_INDEX = {name: i for i, name in enumerate(EVENT_TYPES)}
SEARCH, CLICK, ADD_TO_CART, PURCHASE = range(4)
NEEDS_ITEM = frozenset(("click", "add_to_cart", "purchase"))

# Bounds on individual fields: ids and categories are keys, not documents.
MAX_ID_CHARS = 256
MAX_QUERY_CHARS = 1024
# A user id may not start with it: the state topic keys its own records so (stream/changelog_records.py META_KEY).
RESERVED_ID_PREFIX = "\x00"
RESERVED_ID_PROBLEM = "starts with a NUL character (reserved for the state topic's own records)"

# Integer ids must fit 64 bits (a 5000-digit "id" is an attack, not a key).
MIN_INT_ID, MAX_INT_ID = -(2**63), 2**64 - 1
# The largest price x quantity of one event (currency units): spend is kept in int64 micro-units,
# which one event of more could wrap (1e9 x 1e6 leaves room for 9,000 such purchases per user).
MAX_AMOUNT = 1e9
# Epoch ms must lie between 1973-03-03 and 2200. The floor catches epoch *seconds* (every second up to
# the year 5138 is under 1e11), which read as ms would put the event in January 1970 and turn days into
# minutes silently; the ceiling catches microseconds and garbage.
MIN_TS_MS = 100_000_000_000
MAX_TS_MS = 7_258_118_400_000

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)

# Dead-letter reason codes (stable: they become metric labels and DLQ headers).
TOO_LARGE = "too_large"
INVALID_UTF8 = "invalid_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
UNKNOWN_TYPE = "unknown_type"
INVALID_PRICE = "invalid_price"
# Not the decoder's: a valid event the pipeline refuses because its key or partition breaks the
# partitioning policy (key = user id, one partition per user; docs/contracts.md).
WRONG_PARTITION = "wrong_partition"
# Not the decoder's either: a valid event stamped further after this machine's clock than --max-ahead. The
# daemon's clock is the largest event time it has seen, so one event stamped in 2199 would leave every user
# idle for 170 years (churn_risk near 1 for all; with --state-ttl, every user expired).
AHEAD_OF_CLOCK = "ahead_of_clock"
# Nor this: a valid event whose category would be one more than --max-categories distinct ones. top_categories scores
# every user against every category the table names, so a producer writing product titles as categories would slow
# every batch without end (100,000 categories over 20,000 users: 49 s to apply 100,000 events).
TOO_MANY_CATEGORIES = "too_many_categories"
# A dead letter must fit what the producer (librdkafka's message.max.bytes, 1,000,000 by default)
# and the broker (Kafka's message.max.bytes, about 1 MiB) accept, key and headers included: a longer
# value or key is cut to these sizes, its full size and SHA-256 in headers. (Half the limit for the
# value leaves room for the rest; a record re-published whole would fail the batch, and the restart.)
DEAD_LETTER_MAX_VALUE_BYTES = 512 * 1024
DEAD_LETTER_MAX_KEY_BYTES = 1024
REASONS = (TOO_LARGE, INVALID_UTF8, NOT_JSON, NOT_OBJECT, MISSING_FIELD, INVALID_FIELD, UNKNOWN_TYPE, INVALID_PRICE)


@dataclass
class RecordBatch:
    """Raw records from any source, as parallel lists (one entry per record).

    Kafka sources fill topic/partition/offset from the message; file sources use
    the file name as topic, 0 as partition and the line number as offset.
    Build one with `RecordBatch.of` (production code and tests alike).
    """

    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def of(cls, values: Sequence[bytes | None], *, topic: str | Sequence[str] = "", partition: int | Sequence[int] = 0,
           offsets: Sequence[int] | None = None, first_offset: int = 0,
           keys: bytes | None | Sequence[bytes | None] = None) -> "RecordBatch":
        """The one constructor: records `values`, each field given per record (a list) or once for all
        (a str topic, an int partition, a bytes or None key); without `offsets`, consecutive offsets from
        `first_offset`."""
        n = len(values)
        return cls(
            topics=[topic] * n if isinstance(topic, str) else list(topic),
            partitions=[partition] * n if isinstance(partition, int) else list(partition),
            offsets=list(range(first_offset, first_offset + n)) if offsets is None else list(offsets),
            keys=[keys] * n if keys is None or isinstance(keys, bytes) else list(keys),
            values=list(values),
        )

    @classmethod
    def empty(cls) -> "RecordBatch":
        return cls.of([])

    @classmethod
    def from_messages(cls, messages: list) -> "RecordBatch":
        """From confluent-kafka messages (without errors)."""
        return cls.of([m.value() for m in messages], topic=[m.topic() for m in messages],
                      partition=[m.partition() for m in messages], offsets=[m.offset() for m in messages],
                      keys=[m.key() for m in messages])

    def slice(self, start: int, stop: int) -> "RecordBatch":
        """Records start..stop-1 (a batch of a larger one)."""
        return self.take(range(start, min(stop, len(self))))

    def take(self, index: Sequence[int]) -> "RecordBatch":
        """The records at these positions, in that order."""
        if isinstance(index, range) and index.step == 1:
            at = slice(index.start, index.stop)
            return RecordBatch.of(self.values[at], topic=self.topics[at], partition=self.partitions[at],
                                  offsets=self.offsets[at], keys=self.keys[at])
        return RecordBatch.of([self.values[i] for i in index], topic=[self.topics[i] for i in index],
                              partition=[self.partitions[i] for i in index], offsets=[self.offsets[i] for i in index],
                              keys=[self.keys[i] for i in index])

    def extend(self, other: "RecordBatch") -> None:
        self.topics += other.topics
        self.partitions += other.partitions
        self.offsets += other.offsets
        self.keys += other.keys
        self.values += other.values


@dataclass(frozen=True)
class DeadLetter:
    """A record that broke the contract, with the original bytes and the reason."""

    value: bytes | None
    key: bytes | None
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("dlq.reason", self.reason.encode()),
            ("dlq.detail", self.detail.encode("utf-8", "replace")),
            ("dlq.topic", self.topic.encode()),
            ("dlq.partition", str(self.partition).encode()),
            ("dlq.offset", str(self.offset).encode()),
        ]

    def record(self, max_value_bytes: int = DEAD_LETTER_MAX_VALUE_BYTES,
               max_key_bytes: int = DEAD_LETTER_MAX_KEY_BYTES) -> tuple[bytes | None, bytes | None,
                                                                       list[tuple[str, bytes]]]:
        """(key, value, headers) for the dead-letter topic: the record byte for byte when it fits,
        else its first bytes, with `dlq.truncated: true` and the original's size and SHA-256 in headers."""
        headers = self.headers()
        value, key = self.value, self.key
        if value is not None:
            headers += [("dlq.value_bytes", str(len(value)).encode()),
                        ("dlq.value_sha256", hashlib.sha256(value).hexdigest().encode())]
        truncated = False
        if value is not None and len(value) > max_value_bytes:
            value, truncated = value[:max_value_bytes], True
        if key is not None and len(key) > max_key_bytes:
            headers += [("dlq.key_bytes", str(len(key)).encode()),
                        ("dlq.key_sha256", hashlib.sha256(key).hexdigest().encode())]
            key, truncated = key[:max_key_bytes], True
        headers.append(("dlq.truncated", b"true" if truncated else b"false"))
        return key, value, headers


@dataclass(frozen=True)
class Control:
    """A control record of the input: `kind` (only "forget" so far) for `user_id`, at `record_index`."""

    kind: str
    user_id: str
    record_index: int


CONTROL_KINDS = ("forget",)


@dataclass
class EventColumns:
    """Valid events of one batch, column by column (index i is the same event everywhere)."""

    user_id: np.ndarray  # (n,) object: str
    type_idx: np.ndarray  # (n,) int64, index into EVENT_TYPES
    ts: np.ndarray  # (n,) int64 epoch ms
    item_id: np.ndarray  # (n,) object: str or None
    category: np.ndarray  # (n,) object: str or None
    price: np.ndarray  # (n,) float64, NaN where absent
    quantity: np.ndarray  # (n,) int64
    query: np.ndarray  # (n,) object: str or None
    event_id: np.ndarray  # (n,) object: str
    record_index: np.ndarray  # (n,) int64, position of the event in its RecordBatch

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: np.ndarray) -> "EventColumns":
        """The events at `index` (integer positions or a boolean mask), every column alike."""
        return EventColumns(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


def utf8(strings: Iterable[str]) -> Iterator[bytes]:
    """Each id as UTF-8, lone surrogates kept (as keys are written). Positional arguments through map run in
    C: a functools.partial with keywords costs 5x as much per id."""
    return map(str.encode, strings, itertools.repeat("utf-8"), itertools.repeat("surrogatepass"))


def iso_time(ms: int, timespec: str = "seconds") -> str:
    """An epoch-milliseconds time as ISO-8601 in UTC, for messages and reports."""
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec=timespec)


def epoch_ms(moment: datetime) -> int:
    """Epoch milliseconds of an aware datetime, exactly (timestamp() * 1000 goes through a float and
    can round down: 1974-05-10T17:29:13.471 became ...470, found by the fuzz test)."""
    return (moment - _EPOCH) // _ONE_MS


def user_id_problem(user_id: str) -> str | None:
    """Why the decoder dead-letters an event of this user id (stream/decode.py), in words; None where it does not."""
    if not user_id:
        return "is an empty string"
    if len(user_id) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    return RESERVED_ID_PROBLEM if user_id.startswith(RESERVED_ID_PREFIX) else None
