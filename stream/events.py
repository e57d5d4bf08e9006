"""The input event contract: decode and validate a whole batch at once.

`decode_batch` returns the good events as columns (numpy arrays, one entry per
valid event) and the bad ones as `DeadLetter` data: never an exception that
could stop the daemon. Every bad record keeps its original bytes and says why.

Contract (one JSON object per record):
  event_id  non-empty string
  user_id   non-empty string or integer (integers are normalised to their decimal string)
  type      search | click | add_to_cart | purchase
  ts        epoch milliseconds (integer) or ISO-8601 string (naive means UTC)
  item_id   string or integer, required for click, add_to_cart, purchase
  category  string or integer, optional
  price     finite number >= 0, optional
  quantity  integer >= 1, purchases only (default 1)
  query     non-empty string, required for search
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

import numpy as np
import orjson

EVENT_TYPES: tuple[str, ...] = ("search", "click", "add_to_cart", "purchase")
TYPE_INDEX = {name: i for i, name in enumerate(EVENT_TYPES)}
SEARCH, CLICK, ADD_TO_CART, PURCHASE = range(4)
_NEEDS_ITEM = frozenset(("click", "add_to_cart", "purchase"))

# Bounds on individual fields: ids and categories are keys, not documents.
MAX_ID_CHARS = 256
MAX_QUERY_CHARS = 1024
# Epoch ms must lie between 1970 and 2200: catches seconds-vs-ms and garbage.
MAX_TS_MS = 7_258_118_400_000

# Dead-letter reason codes (stable: they become metric labels and DLQ headers).
TOO_LARGE = "too_large"
INVALID_UTF8 = "invalid_utf8"
NOT_JSON = "not_json"
NOT_OBJECT = "not_object"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
UNKNOWN_TYPE = "unknown_type"
INVALID_PRICE = "invalid_price"
REASONS = (TOO_LARGE, INVALID_UTF8, NOT_JSON, NOT_OBJECT, MISSING_FIELD, INVALID_FIELD, UNKNOWN_TYPE, INVALID_PRICE)


@dataclass
class RecordBatch:
    """Raw records from any source, as parallel lists (one entry per record).

    Kafka sources fill topic/partition/offset from the message; file sources use
    the file name as topic, 0 as partition and the line number as offset.
    """

    topics: list[str]
    partitions: list[int]
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes | None]

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def empty(cls) -> "RecordBatch":
        return cls([], [], [], [], [])

    @classmethod
    def from_messages(cls, messages: list) -> "RecordBatch":
        """From confluent-kafka messages (without errors)."""
        return cls([m.topic() for m in messages], [m.partition() for m in messages], [m.offset() for m in messages],
                   [m.key() for m in messages], [m.value() for m in messages])

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


class _Invalid(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


def _id_field(obj: dict, name: str, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise _Invalid(MISSING_FIELD, f"missing required field '{name}'")
        return None
    if isinstance(value, str):
        if not value:
            raise _Invalid(INVALID_FIELD, f"'{name}' is an empty string")
        if len(value) > MAX_ID_CHARS:
            raise _Invalid(INVALID_FIELD, f"'{name}' longer than {MAX_ID_CHARS} characters")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise _Invalid(INVALID_FIELD, f"'{name}' must be a string or integer, got {type(value).__name__}")


def _timestamp_ms(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        ts = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise _Invalid(INVALID_FIELD, "'ts' is not epoch milliseconds or an ISO-8601 time") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        ts = int(moment.timestamp() * 1000)
    elif value is None:
        raise _Invalid(MISSING_FIELD, "missing required field 'ts'")
    else:
        raise _Invalid(INVALID_FIELD, f"'ts' must be epoch ms or ISO-8601, got {type(value).__name__}")
    if not 0 <= ts <= MAX_TS_MS:
        raise _Invalid(INVALID_FIELD, "'ts' out of range (expects epoch milliseconds)")
    return ts


def _validate(obj: object) -> tuple:
    """One decoded JSON value -> the event's column values, or raise _Invalid."""
    if not isinstance(obj, dict):
        raise _Invalid(NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    event_id = obj.get("event_id")
    if event_id is None:
        raise _Invalid(MISSING_FIELD, "missing required field 'event_id'")
    if not isinstance(event_id, str) or not event_id or len(event_id) > MAX_ID_CHARS:
        raise _Invalid(INVALID_FIELD, "'event_id' must be a non-empty string")
    user_id = _id_field(obj, "user_id", True)
    kind = obj.get("type")
    if kind is None:
        raise _Invalid(MISSING_FIELD, "missing required field 'type'")
    type_idx = TYPE_INDEX.get(kind) if isinstance(kind, str) else None
    if type_idx is None:
        raise _Invalid(UNKNOWN_TYPE, f"unknown event type {str(kind)[:40]!r}")
    ts = _timestamp_ms(obj.get("ts"))
    item_id = _id_field(obj, "item_id", kind in _NEEDS_ITEM)
    category = _id_field(obj, "category", False)

    price = obj.get("price")
    if price is None:
        price = math.nan
    elif isinstance(price, bool) or not isinstance(price, (int, float)):
        raise _Invalid(INVALID_PRICE, f"'price' must be a number, got {type(price).__name__}")
    else:
        price = float(price)
        if not math.isfinite(price) or price < 0:
            raise _Invalid(INVALID_PRICE, "'price' must be finite and >= 0")

    quantity = obj.get("quantity")
    if quantity is None:
        quantity = 1
    elif isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1 or quantity > 1_000_000:
        raise _Invalid(INVALID_FIELD, "'quantity' must be an integer between 1 and 1000000")

    query = obj.get("query")
    if query is not None:
        if not isinstance(query, str):
            raise _Invalid(INVALID_FIELD, f"'query' must be a string, got {type(query).__name__}")
        if len(query) > MAX_QUERY_CHARS:
            raise _Invalid(INVALID_FIELD, f"'query' longer than {MAX_QUERY_CHARS} characters")
    if type_idx == SEARCH and not query:
        raise _Invalid(MISSING_FIELD, "search events need a non-empty 'query'")
    return user_id, type_idx, ts, item_id, category, price, quantity, query, event_id


def _why_not_json(value: bytes) -> tuple[str, str]:
    """Name the reason orjson refused a record (the slow path: bad records only)."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return INVALID_UTF8, f"invalid UTF-8 at byte {exc.start}"
    try:
        # Python's json accepts the non-standard NaN/Infinity tokens some producers write:
        # if that is all that was wrong, report the field they broke (e.g. a NaN price).
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return NOT_JSON, "not valid JSON"
    try:
        _validate(obj)
    except _Invalid as bad:
        return bad.reason, bad.detail
    return NOT_JSON, "non-standard JSON (NaN or Infinity)"


def decode_batch(batch: RecordBatch, max_event_bytes: int) -> tuple[EventColumns, list[DeadLetter]]:
    """Decode and validate every record of the batch: (valid events as columns, dead letters)."""
    rows: list[tuple] = []
    kept: list[int] = []
    dead: list[DeadLetter] = []
    loads = orjson.loads
    for i, value in enumerate(batch.values):
        try:
            if value is None:
                raise _Invalid(NOT_JSON, "empty record (null value)")
            if len(value) > max_event_bytes:
                raise _Invalid(TOO_LARGE, f"{len(value)} bytes exceeds the {max_event_bytes}-byte limit")
            try:
                obj = loads(value)
            except orjson.JSONDecodeError:
                raise _Invalid(*_why_not_json(value)) from None
            rows.append(_validate(obj))
            kept.append(i)
        except _Invalid as bad:
            dead.append(
                DeadLetter(
                    value=value,
                    key=batch.keys[i],
                    reason=bad.reason,
                    detail=bad.detail,
                    topic=batch.topics[i],
                    partition=batch.partitions[i],
                    offset=batch.offsets[i],
                )
            )
    return _columns(rows, kept), dead


def _columns(rows: list[tuple], kept: list[int]) -> EventColumns:
    n = len(rows)
    cols = list(zip(*rows)) if n else [()] * 9

    def objects(values: Sequence) -> np.ndarray:
        out = np.empty(n, dtype=object)
        out[:] = values
        return out

    return EventColumns(
        user_id=objects(cols[0]),
        type_idx=np.fromiter(cols[1], dtype=np.int64, count=n),
        ts=np.fromiter(cols[2], dtype=np.int64, count=n),
        item_id=objects(cols[3]),
        category=objects(cols[4]),
        price=np.fromiter(cols[5], dtype=np.float64, count=n),
        quantity=np.fromiter(cols[6], dtype=np.int64, count=n),
        query=objects(cols[7]),
        event_id=objects(cols[8]),
        record_index=np.asarray(kept, dtype=np.int64),
    )
