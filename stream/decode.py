"""Decode and validate a whole batch of records at once (the contract is in stream/events.py).

`decode_batch` returns the good events as columns (numpy arrays, one entry per valid event) and the bad
ones as `DeadLetter` data: never an exception that could stop the daemon. Every bad record keeps its
original bytes and says why.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Annotated, Literal

import msgspec
import numpy as np
import orjson

from stream.events import (
    SEARCH, MAX_INT_ID, MIN_INT_ID, CONTROL_KINDS, Control, DeadLetter, EventColumns, INVALID_FIELD, INVALID_PRICE,
    INVALID_UTF8, MAX_AMOUNT, MAX_ID_CHARS, MAX_QUERY_CHARS, MAX_TS_MS, MIN_TS_MS, MISSING_FIELD,
    NOT_JSON, NOT_OBJECT, RecordBatch, TOO_LARGE, TYPE_INDEX, UNKNOWN_TYPE,
    NEEDS_ITEM, RESERVED_ID_PREFIX, RESERVED_ID_PROBLEM, epoch_ms,
)
from stream.user_index import objects


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
        if not MIN_INT_ID <= value <= MAX_INT_ID:
            raise _Invalid(INVALID_FIELD, f"integer '{name}' outside the 64-bit range")
        return str(value)
    if isinstance(value, float) and value.is_integer() and not MIN_INT_ID <= value <= MAX_INT_ID:
        # orjson reads an integer past 64 bits (2**64) as a float: say what is wrong with it.
        raise _Invalid(INVALID_FIELD, f"integer '{name}' outside the 64-bit range")
    raise _Invalid(INVALID_FIELD, f"'{name}' must be a string or integer, got {type(value).__name__}")


def _user_id(obj: dict) -> str:
    """The record's user id. One starting with a NUL is refused: the state topic keys its own records (the meta
    record, stream/changelog_records.py META_KEY) that way, and a user of that id would be read back as one (a
    restore then fails on it, at every restart)."""
    user_id = _id_field(obj, "user_id", True)
    if user_id.startswith(RESERVED_ID_PREFIX):
        raise _Invalid(INVALID_FIELD, f"'user_id' {RESERVED_ID_PROBLEM}")
    return user_id


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
        ts = epoch_ms(moment)
    elif isinstance(value, float):
        # A JSON number is a number: 1.7e12 and 1700000000000.5 are epoch milliseconds as much as
        # 1700000000000 is (encoders of doubles write them so); the fraction of a millisecond is dropped.
        if not math.isfinite(value):
            raise _Invalid(INVALID_FIELD, "'ts' is not a finite number")
        ts = math.floor(value)
    elif value is None:
        raise _Invalid(MISSING_FIELD, "missing required field 'ts'")
    else:
        raise _Invalid(INVALID_FIELD, f"'ts' must be epoch ms or ISO-8601, got {type(value).__name__}")
    if 0 <= ts < MIN_TS_MS and not isinstance(value, str):
        raise _Invalid(INVALID_FIELD, f"'ts' {ts} is before 1973 as epoch milliseconds: epoch seconds? "
                                      "The contract is epoch milliseconds (or ISO-8601)")
    if not MIN_TS_MS <= ts <= MAX_TS_MS:
        raise _Invalid(INVALID_FIELD, "'ts' out of range (expects epoch milliseconds, 1973 to 2200)")
    return ts


def _validate(obj: object) -> tuple:
    """One decoded JSON value -> the event's column values, or raise _Invalid."""
    if not isinstance(obj, dict):
        raise _Invalid(NOT_OBJECT, f"expected a JSON object, got {type(obj).__name__}")
    event_id = _id_field(obj, "event_id", True)
    user_id = _user_id(obj)
    kind = obj.get("type")
    if kind is None:
        raise _Invalid(MISSING_FIELD, "missing required field 'type'")
    if not isinstance(kind, str):  # never str() a hostile value: a deep nesting overflows repr
        raise _Invalid(UNKNOWN_TYPE, f"'type' must be a string, got {type(kind).__name__}")
    type_idx = TYPE_INDEX.get(kind)
    if type_idx is None:
        raise _Invalid(UNKNOWN_TYPE, f"unknown event type {kind[:40]!r} (the contract's: {', '.join(TYPE_INDEX)})")
    ts = _timestamp_ms(obj.get("ts"))
    item_id = _id_field(obj, "item_id", kind in NEEDS_ITEM)
    category = _id_field(obj, "category", False)

    price = obj.get("price")
    if price is None:
        price = math.nan
    elif isinstance(price, bool) or not isinstance(price, (int, float)):
        raise _Invalid(INVALID_PRICE, f"'price' must be a number, got {type(price).__name__}")
    else:
        try:
            price = float(price)
        except OverflowError:  # an integer of hundreds of digits (Python's json reads it exactly)
            raise _Invalid(INVALID_PRICE, "'price' out of range") from None
        if not math.isfinite(price) or price < 0:
            raise _Invalid(INVALID_PRICE, "'price' must be finite and >= 0")

    quantity = obj.get("quantity")
    if quantity is None:
        quantity = 1
    elif isinstance(quantity, float) and quantity.is_integer():  # 2.0 from an encoder of doubles is 2
        quantity = int(quantity)
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1 or quantity > 1_000_000:
        raise _Invalid(INVALID_FIELD, "'quantity' must be an integer between 1 and 1000000")
    if not math.isnan(price) and price * quantity > MAX_AMOUNT:
        raise _Invalid(INVALID_PRICE, f"'price' x 'quantity' exceeds {MAX_AMOUNT:.0e}")

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
    # Deeper than orjson's limit: say so here, before Python's json, whose own limit moves with the
    # interpreter (3.11 gives up below 1000 levels, 3.12 near 1500, 3.13 near 10000; within it a
    # deep array read as `not_object`), so the reason is the same on every Python.
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        return NOT_JSON, f"nested deeper than {MAX_JSON_DEPTH} levels"
    # Python's json accepts what orjson refuses: the non-standard NaN/Infinity tokens some producers
    # write, numbers past float range, lone surrogate escapes ("\ud800"). If a field of the contract
    # is what that broke, report the field (e.g. a NaN price); else say which of these it was.
    odd: list[str] = []

    def constant(name: str) -> float:
        odd.append("non-standard JSON (NaN or Infinity)")
        return float(name)

    def number(text: str) -> float:
        value = float(text)
        if math.isinf(value):
            odd.append("a number beyond the float range")
        return value

    try:
        obj = json.loads(text, parse_constant=constant, parse_float=number)
    except (ValueError, RecursionError):
        return NOT_JSON, "not valid JSON"
    try:
        _validate(obj)
    except _Invalid as bad:
        return bad.reason, bad.detail
    if odd:
        return NOT_JSON, odd[0]
    if _LONE_SURROGATE.search(text):
        return NOT_JSON, "a lone UTF-16 surrogate escape (\\ud800-\\udfff without its pair): not Unicode text"
    return NOT_JSON, "not JSON the strict parser accepts"


# A \uD800-\uDFFF escape not preceded by another backslash (which would make it literal text).
_LONE_SURROGATE = re.compile(r"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

# orjson refuses arrays and objects nested deeper than this ("depth limit exceeded").
MAX_JSON_DEPTH = 1024
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in a JSON text (brackets inside strings left out)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


# The fast path's schema: msgspec checks types, lengths and ranges in C while it parses. Rules
# across fields (item for clicks, query for searches, ISO timestamps) are checked on the columns.
# Whatever fails either check takes the slow path (orjson + _validate), the one source of truth
# for the reason, so both paths accept the same records. (One difference: fields outside the
# contract are skipped unread by the fast path, so e.g. an overflowing number in an extra
# field does not reject an otherwise valid event.)
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)] | Annotated[
    int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]  # msgspec bounds stop at int64: the rest go slow


class _Event(msgspec.Struct, gc=False):  # gc=False: flat fields, no cycles; not the collector's work
    event_id: _Id
    user_id: _Id
    type: Literal["search", "click", "add_to_cart", "purchase"]
    ts: Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)] | Annotated[
        float, msgspec.Meta(ge=MIN_TS_MS, lt=MAX_TS_MS + 1)] | str
    item_id: _Id | None = None
    category: _Id | None = None
    price: Annotated[float, msgspec.Meta(ge=0)] | None = None
    quantity: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    query: Annotated[str, msgspec.Meta(max_length=MAX_QUERY_CHARS)] | None = None


_decode_event = msgspec.json.Decoder(_Event).decode


def decode_batch(batch: RecordBatch, max_event_bytes: int, controls: list[Control] | None = None,
                 ) -> tuple[EventColumns, list[DeadLetter]]:
    """Decode and validate every record of the batch: (valid events as columns, dead letters).
    Valid control records are appended to `controls` (in record order); without it they are skipped.

    Fast path: a C-level typed parse per record, then whole-column checks. Records either
    refuses go through `_decode_slow`, which names the reason (or, rarely, accepts what the
    fast schema was stricter about, e.g. an ISO timestamp with an offset).
    """
    # Record by record: parsing the batch as one joined JSON array would be a little faster, but
    # records cut at a comma could then pair up into valid events (found by the fuzz test).
    parsed, kept, suspect = _parse_each(batch.values, max_event_bytes)
    events, rejected = _fast_columns(parsed, kept)
    if rejected:
        suspect.extend(rejected)
        suspect.sort()
    rows, slow_kept, dead = _decode_slow(batch, suspect, max_event_bytes, controls)
    if rows:
        events = _concat_in_order(events, _columns(rows, slow_kept))
    return events, dead


@dataclass
class DecodedRecords:
    """What decode_batch says of a batch, as one value (stream/decode_ahead.py sends it back from a worker)."""

    events: EventColumns
    dead_letters: list[DeadLetter]
    controls: list[Control] = field(default_factory=list)


def decode_records(batch: RecordBatch, max_event_bytes: int) -> DecodedRecords:
    """decode_batch of the batch, its control records kept."""
    controls: list[Control] = []
    events, dead = decode_batch(batch, max_event_bytes, controls)
    return DecodedRecords(events, dead, controls)


def _parse_each(values: list[bytes | None], max_event_bytes: int) -> tuple[list[_Event], list[int], list[int]]:
    """Parse record by record: (events, their record indices, indices of records the fast path refused)."""
    decode = _decode_event
    if None not in values and max(map(len, values), default=0) <= max_event_bytes and all(map(bytes.isascii, values)):
        try:  # the usual batch, every record valid: the loop runs in C
            return list(map(decode, values)), list(range(len(values))), []
        except Exception:  # noqa: BLE001 (some record is refused: find which, one by one)
            pass
    parsed: list[_Event] = []
    kept: list[int] = []
    suspect: list[int] = []
    for i, value in enumerate(values):
        try:
            if value is None or len(value) > max_event_bytes:
                raise ValueError
            if not value.isascii():
                value.decode("utf-8")  # msgspec skips unknown fields unread: check the whole record
            parsed.append(decode(value))
            kept.append(i)
        except Exception:  # noqa: BLE001 (any refusal, RecursionError included, means: ask the slow path)
            suspect.append(i)
    return parsed, kept, suspect


def _fast_columns(parsed: list[_Event], kept: list[int]) -> tuple[EventColumns, list[int]]:
    """Columns of the records msgspec accepted, minus those that break a cross-field rule (returned).
    Column-at-a-time: comprehensions and C-level maps, no per-event function calls."""
    n = len(parsed)
    type_idx = np.fromiter(map(TYPE_INDEX.__getitem__, [e.type for e in parsed]), dtype=np.int64, count=n)
    item_id = _id_column([e.item_id for e in parsed])
    query = objects([e.query for e in parsed])
    ok = ~((type_idx != SEARCH) & (item_id == None))  # noqa: E711 (elementwise on object arrays)
    ok &= ~((type_idx == SEARCH) & ((query == None) | (query == "")))  # noqa: E711
    raw_ts = [e.ts for e in parsed]
    try:  # numbers were range-checked by the schema (positive: the cast's truncation floors); ISO strings are rare
        ts = np.array(raw_ts, dtype=np.int64)
    except (TypeError, ValueError):
        ts = np.zeros(n, dtype=np.int64)
        for i, t in enumerate(raw_ts):
            try:
                ts[i] = t if t.__class__ is int else _timestamp_ms(t)
            except _Invalid:
                ok[i] = False
    quantity = np.array([e.quantity for e in parsed], dtype=np.float64)  # None -> NaN -> the default 1
    price = np.array([e.price for e in parsed], dtype=np.float64).reshape(n)  # None -> NaN
    ok &= ~(price * np.nan_to_num(quantity, nan=1.0) > MAX_AMOUNT)  # NaN compares false: absent prices pass
    user_id = _required_id_column([e.user_id for e in parsed])
    if n and min(user_id) < "\x01":  # one C-level pass: NUL-led ids (_user_id) are rare, found one by one
        ok &= np.fromiter((not u.startswith(RESERVED_ID_PREFIX) for u in user_id), dtype=bool, count=n)
    events = EventColumns(
        user_id=user_id,
        type_idx=type_idx,
        ts=ts,
        item_id=item_id,
        category=_id_column([e.category for e in parsed]),
        price=price,
        quantity=np.nan_to_num(quantity, nan=1.0).astype(np.int64).reshape(n),
        query=query,
        event_id=_required_id_column([e.event_id for e in parsed]),
        record_index=np.asarray(kept, dtype=np.int64),
    )
    if ok.all():
        return events, []
    return events.take(ok), events.record_index[~ok].tolist()


def _required_id_column(values: list) -> np.ndarray:
    """_id_column of a field the schema requires (str or int, never None), in one C-level pass: str() returns
    a str as it is and writes an int in decimal. Half the time of _id_column where some ids are integers."""
    return np.fromiter(map(str, values), dtype=object, count=len(values))


def _id_column(values: list) -> np.ndarray:
    """Ids as an object array of str (None stays None): integer ids become their decimal string."""
    out = objects(values)
    if int in set(map(type, values)):
        is_int = np.fromiter(map(type, values), dtype=object, count=len(values)) == int
        out[is_int] = [str(v) for v in out[is_int]]
    return out


def _concat_in_order(a: EventColumns, b: EventColumns) -> EventColumns:
    """Both column sets as one, in record order (the order decode promises)."""
    merged = EventColumns(**{name: np.concatenate([getattr(a, name), getattr(b, name)])
                             for name in EventColumns.__dataclass_fields__})
    return merged.take(np.argsort(merged.record_index, kind="stable"))


def _decode_slow(batch: RecordBatch, indices: list[int], max_event_bytes: int, controls: list[Control] | None,
                 ) -> tuple[list[tuple], list[int], list[DeadLetter]]:
    """orjson + _validate for the given records: the reference rules, and the reasons.
    Control records land here too (they have no event fields): cheap, they are rare."""
    rows: list[tuple] = []
    kept: list[int] = []
    dead: list[DeadLetter] = []
    for i in indices:
        value = batch.values[i]
        try:
            if value is None:
                raise _Invalid(NOT_JSON, "empty record (null value)")
            if len(value) > max_event_bytes:
                raise _Invalid(TOO_LARGE, f"{len(value)} bytes exceeds the {max_event_bytes}-byte limit")
            try:
                obj = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise _Invalid(*_why_not_json(value)) from None
            if isinstance(obj, dict) and "control" in obj and "type" not in obj:
                control = _control(obj, i)
                if controls is not None:
                    controls.append(control)
                continue
            rows.append(_validate(obj))
            kept.append(i)
        except _Invalid as bad:
            dead.append(DeadLetter(value=value, key=batch.keys[i], reason=bad.reason, detail=bad.detail,
                                   topic=batch.topics[i], partition=batch.partitions[i], offset=batch.offsets[i]))
    return rows, kept, dead


def _control(obj: dict, index: int) -> Control:
    kind = obj["control"]
    if kind not in CONTROL_KINDS:
        raise _Invalid(UNKNOWN_TYPE, f"unknown control record {str(kind)[:40]!r} (known: {', '.join(CONTROL_KINDS)})"
                       if isinstance(kind, str) else "'control' must be a string")
    return Control(kind, _user_id(obj), index)


def _columns(rows: list[tuple], kept: list[int]) -> EventColumns:
    n = len(rows)
    cols = list(zip(*rows)) if n else [()] * 9
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
