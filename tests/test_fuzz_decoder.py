"""Fuzz the input decoder (issue 6): input limits hold against hostile payloads.

Property tests of `decode_batch` through its public contract only (RecordBatch,
decode_batch, EventColumns, DeadLetter, REASONS and the field rules of the
stream.events docstring), so they keep holding while the decoder's internals change:

  * whatever the bytes (random, near-valid JSON, deep nesting, huge strings and
    numbers, NaN/Infinity tokens, duplicate keys, escaped lone surrogates,
    non-UTF-8, BOMs), decode_batch never raises and accounts for every record
    exactly once: as a valid event or as a dead letter with a known reason and
    the original bytes object;
  * every accepted event satisfies the field rules;
  * contract-conforming events are all accepted, with the source values;
  * records over max_event_bytes are dead-lettered as too_large, whatever they hold;
  * decoding is invariant under splitting a batch in two, and so a record's fate never
    depends on its neighbours (records cut at commas inside events included).

The bugs fuzzing has found are kept as explicit @example cases (see BASE below).

Reproducible in CI: derandomized, no example database, bounded example counts.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream import events as ev
from stream.events import EVENT_TYPES, MAX_ID_CHARS, MAX_QUERY_CHARS, MAX_TS_MS, MIN_TS_MS, REASONS, RecordBatch
from stream.decode import decode_batch
from tests.helpers import record_batch

FUZZ = {
    "deadline": None,
    "derandomize": True,  # reproducible in CI
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
}

BIG_LIMIT = 1 << 22  # max_event_bytes large enough that every generated record gets decoded
FIELDS = ("event_id", "user_id", "type", "ts", "item_id", "category", "price", "quantity", "query")
NEEDS_ITEM = {ev.CLICK, ev.ADD_TO_CART, ev.PURCHASE}
OBJECT_COLUMNS = ("user_id", "item_id", "category", "query", "event_id")
INT_COLUMNS = ("type_idx", "ts", "quantity", "record_index")


# ----------------------------------------------------------------------------- helpers


def make_batch(values: list[bytes | None], first_offset: int = 1000) -> RecordBatch:
    """A batch whose records have distinct offsets (offset = first_offset + 3 * index)."""
    offsets = [first_offset + 3 * i for i in range(len(values))]
    return record_batch(list(values), partition=7, offsets=offsets,  # keys: a function of the offset
                        keys=[None if offset % 9 == 6 else b"k%d" % offset for offset in offsets])


# decode_batch runs in the daemon a few dozen frames deep under Python's default recursion limit
# of 1000. Hypothesis raises the limit by 2000 frames while a test runs, which would hide a
# RecursionError (nested JSON is the classic way to get one): decode with the daemon's headroom.
DAEMON_HEADROOM = 900


def _stack_depth() -> int:
    frame, depth = sys._getframe(1), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def decode(batch: RecordBatch, max_event_bytes: int) -> tuple[ev.EventColumns, list[ev.DeadLetter]]:
    """decode_batch with the recursion headroom it has in the daemon."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + DAEMON_HEADROOM)
    try:
        return decode_batch(batch, max_event_bytes)
    finally:
        sys.setrecursionlimit(old)


def check_accounting(batch: RecordBatch, cols: ev.EventColumns, dead: list[ev.DeadLetter]) -> dict[int, ev.DeadLetter]:
    """Every record index appears exactly once, as a valid event or as a dead letter
    (matched through its offset); dead letters carry a known reason and the original
    bytes object. Returns {record index: dead letter}."""
    n = len(batch)
    assert len(cols) + len(dead) == n
    for name in cols.__dataclass_fields__:
        column = getattr(cols, name)
        assert isinstance(column, np.ndarray) and column.shape == (len(cols),), name
    for name in INT_COLUMNS:
        assert getattr(cols, name).dtype == np.int64, name
    assert cols.price.dtype == np.float64
    for name in OBJECT_COLUMNS:
        assert getattr(cols, name).dtype == object, name

    valid = [int(i) for i in cols.record_index]
    assert all(0 <= i < n for i in valid)
    index_of_offset = {offset: i for i, offset in enumerate(batch.offsets)}
    by_index: dict[int, ev.DeadLetter] = {}
    for d in dead:
        assert d.offset in index_of_offset, d
        i = index_of_offset[d.offset]
        assert i not in by_index, f"record {i} dead-lettered twice"
        by_index[i] = d
        assert d.reason in REASONS, d.reason
        assert d.value is batch.values[i]  # the original bytes object, unchanged
        assert (d.key, d.topic, d.partition) == (batch.keys[i], batch.topics[i], batch.partitions[i])
        assert isinstance(d.detail, str)
        d.headers()  # the DLQ headers can always be built (details may quote hostile input)
    assert len(set(valid)) == len(valid), "record accepted twice"
    assert set(valid).isdisjoint(by_index), "record both accepted and dead-lettered"
    assert set(valid) | set(by_index) == set(range(n))
    return by_index


def _is_key(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS


def _utf8(value: str) -> bool:
    # Accepted strings go back out through Kafka as UTF-8: no lone surrogates.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_contract(cols: ev.EventColumns) -> None:
    """Every accepted event satisfies the field rules of the contract."""
    for j in range(len(cols)):
        event_id, user_id = cols.event_id[j], cols.user_id[j]
        type_idx, ts = int(cols.type_idx[j]), int(cols.ts[j])
        item_id, category, query = cols.item_id[j], cols.category[j], cols.query[j]
        price, quantity = float(cols.price[j]), int(cols.quantity[j])
        assert _is_key(event_id) and _utf8(event_id), event_id
        assert _is_key(user_id) and _utf8(user_id), user_id
        assert type_idx in range(len(EVENT_TYPES))
        assert MIN_TS_MS <= ts <= MAX_TS_MS
        if type_idx in NEEDS_ITEM:
            assert item_id is not None
        for key in (item_id, category):
            assert key is None or (_is_key(key) and _utf8(key)), key
        assert math.isnan(price) or (math.isfinite(price) and price >= 0), price
        assert 1 <= quantity <= 1_000_000
        assert math.isnan(price) or price * quantity <= ev.MAX_AMOUNT, (price, quantity)
        if type_idx == ev.SEARCH:
            assert isinstance(query, str) and 0 < len(query) <= MAX_QUERY_CHARS and _utf8(query), query
        else:
            assert query is None or (isinstance(query, str) and len(query) <= MAX_QUERY_CHARS and _utf8(query))


def rows(cols: ev.EventColumns, shift: int = 0) -> list[tuple]:
    """The events as comparable tuples (NaN prices as a marker, since NaN != NaN)."""
    out = []
    for j in range(len(cols)):
        price = float(cols.price[j])
        out.append((
            cols.event_id[j], cols.user_id[j], int(cols.type_idx[j]), int(cols.ts[j]), cols.item_id[j],
            cols.category[j], "NaN" if math.isnan(price) else price, int(cols.quantity[j]), cols.query[j],
            int(cols.record_index[j]) + shift,
        ))
    return out


# ----------------------------------------------------------------------------- valid events

# Integer ids within 64 bits: the decoder dead-letters integer ids outside [-2**63, 2**64)
# (invalid_field), a bound the module docstring's contract does not state yet.
int_ids = st.integers(min_value=-(2**63), max_value=2**64 - 1)
str_ids = st.one_of(
    st.text(min_size=1, max_size=40),
    st.text(min_size=1, max_size=MAX_ID_CHARS),
    st.integers(1, 4).map(lambda k: "é" * (MAX_ID_CHARS - k + 1)),  # at and near the length limit
)
ids = st.one_of(str_ids, int_ids)
queries = st.one_of(
    st.text(min_size=1, max_size=60),
    st.integers(0, 3).map(lambda k: "q" * (MAX_QUERY_CHARS - k)),
)
prices = st.one_of(  # valid ones: price x quantity <= MAX_AMOUNT (valid_events caps the quantity to fit)
    st.floats(min_value=0.0, max_value=ev.MAX_AMOUNT, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=int(ev.MAX_AMOUNT)),
    st.sampled_from([ev.MAX_AMOUNT, int(ev.MAX_AMOUNT)]),
)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@st.composite
def timestamps(draw) -> tuple[object, int]:
    """(the ts field as written, the epoch ms it must decode to)."""
    ms = draw(st.one_of(st.integers(MIN_TS_MS, MAX_TS_MS),
                        st.sampled_from([MIN_TS_MS, MIN_TS_MS + 1, MIN_TS_MS + 999, MAX_TS_MS - 1, MAX_TS_MS])))
    style = draw(st.sampled_from(["int", "float", "naive", "Z", "offset"]))
    if style == "int":
        return ms, ms
    if style == "float":  # a fraction of a millisecond (exact in a double at these magnitudes) is dropped
        return ms + draw(st.sampled_from([0.0, 0.25, 0.5, 0.75])), ms
    spec = draw(st.sampled_from(["milliseconds", "microseconds", "seconds"]))
    sep = draw(st.sampled_from(["T", " "]))
    expected = ms - ms % 1000 if spec == "seconds" else ms
    moment = _EPOCH + timedelta(milliseconds=ms)
    if spec == "microseconds":
        moment += timedelta(microseconds=draw(st.integers(0, 999)))  # sub-millisecond digits are dropped
    if style == "offset":
        minutes = draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))
        return moment.astimezone(timezone(timedelta(minutes=minutes))).isoformat(sep, spec), expected
    text = moment.replace(tzinfo=None).isoformat(sep, spec)
    return (text + "Z" if style == "Z" else text), expected


@st.composite
def valid_events(draw) -> tuple[dict, tuple]:
    """(a contract-conforming event, the decoded row it must give, record_index left out)."""
    kind = draw(st.sampled_from(EVENT_TYPES))
    type_idx = EVENT_TYPES.index(kind)
    ts, ts_ms = draw(timestamps())
    event: dict = {"event_id": draw(str_ids), "user_id": draw(ids), "type": kind, "ts": ts}
    if type_idx in NEEDS_ITEM or draw(st.booleans()):
        event["item_id"] = draw(ids)
    elif draw(st.booleans()):
        event["item_id"] = None  # optional fields may be null
    if draw(st.booleans()):
        event["category"] = draw(st.one_of(ids, st.none()))
    if draw(st.booleans()):
        event["price"] = draw(st.one_of(prices, st.none()))
    if type_idx == ev.PURCHASE and draw(st.booleans()):
        event["quantity"] = draw(st.one_of(st.integers(1, 1_000_000), st.sampled_from([1, 1_000_000])))
        price = event.get("price")
        if price and float(price) * event["quantity"] > ev.MAX_AMOUNT:
            # The largest quantity that keeps price x quantity within the contract's maximum.
            quantity = max(1, int(ev.MAX_AMOUNT // float(price)))  # price > 1000 here: a finite quotient
            while quantity > 1 and float(price) * quantity > ev.MAX_AMOUNT:
                quantity -= 1
            event["quantity"] = quantity
    if type_idx == ev.SEARCH or draw(st.booleans()):
        event["query"] = draw(queries)
    if draw(st.booleans()):  # fields outside the contract are ignored
        event[draw(st.sampled_from(["session", "extra", "v", "meta"]))] = draw(json_values)
    keys = list(event)
    order = draw(st.permutations(keys))
    event = {k: event[k] for k in order}

    def as_key(value):
        return None if value is None else str(value)

    price = event.get("price")
    expected = (
        event["event_id"], str(event["user_id"]), type_idx, ts_ms, as_key(event.get("item_id")),
        as_key(event.get("category")), "NaN" if price is None else float(price), event.get("quantity", 1),
        event.get("query"),
    )
    return event, expected


def serialise(event: dict, how: str) -> bytes:
    if how == "orjson":
        return orjson.dumps(event)
    return json.dumps(event, ensure_ascii=(how == "json_ascii")).encode("utf-8")


serialisers = st.sampled_from(["orjson", "json_ascii", "json_utf8"])


# ----------------------------------------------------------------------------- hostile records


def _json_trees(ints, floats):
    return st.recursive(
        st.one_of(
            st.none(), st.booleans(), ints, floats, st.text(max_size=20),
            st.sampled_from(["", "click", "search", "purchase", "2024-05-01T12:00:00Z", "1700000000000", "-1"]),
        ),
        lambda children: st.one_of(
            st.lists(children, max_size=4), st.dictionaries(st.sampled_from(FIELDS + ("a", "")), children, max_size=4)
        ),
        max_leaves=12,
    )


# Valid JSON that orjson can also write (64-bit integers, finite floats): extra fields of valid events.
json_values = _json_trees(st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False))
# Anything Python's json writes: big integers, NaN and Infinity as bare tokens.
loose_json_values = _json_trees(st.integers(), st.floats())


def _nest(depth: int, shape: str, inner: bytes = b"1") -> bytes:
    if shape == "list":
        return b"[" * depth + inner + b"]" * depth
    if shape == "list_empty":
        return b"[" * depth + b"]" * depth
    if shape == "dict":
        return b'{"a":' * depth + inner + b"}" * depth
    if shape == "unclosed":
        return b"[" * depth
    return b'[{"a":' * depth + inner + b"}]" * depth  # mixed


# Around 1000 levels: orjson's own limit is 1024, Python's recursion limit 1000 (minus the stack in use).
depths = st.one_of(st.integers(900, 1030), st.integers(1, 50_000),
                   st.sampled_from([1000, 1023, 1024, 1025, 10_000, 50_000]))
nested = st.builds(_nest, depths, st.sampled_from(["list", "list_empty", "dict", "unclosed", "mixed"]))


@st.composite
def huge_numbers(draw) -> bytes:
    digits = draw(st.one_of(st.integers(19, 25), st.integers(300, 5000), st.sampled_from([309, 400, 4300, 4301])))
    body = b"1" + b"0" * (digits - 1)
    sign = draw(st.sampled_from([b"", b"-"]))
    tail = draw(st.sampled_from([b"", b"", b"", b".5", b"e10", b"e400", b".0"]))
    return sign + body + tail


number_tokens = st.sampled_from([
    b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"inf", b"nan", b"1e400", b"-1e400", b"1e-400", b"-0", b"-0.0",
    b"0e0", b"1E+2", b"01", b"1.", b".5", b"0x10", b"+1", b"18446744073709551615", b"18446744073709551616",
    b"-9223372036854775808", b"-9223372036854775809", b"1700000000000", b"7258118400001", b"true", b"null",
])
string_tokens = st.sampled_from([
    b'"\\ud800"', b'"\\udfff"', b'"\\udc00\\ud800"', b'"x\\ud83d"', b'"\\ud83d\\ude00"', b'"\\ud800\\u0041"',
    b'"\\u0000"', b'""', b'"\\"', b'"\\x41"', b'"\\u12"', b'"2024-05-01T12:00:00\\ud800"', b'"\xed\xa0\x80"',
    b'"\xff"', b'"\xc0\x80"', b'"2024-13-45T99:99:99"', b'"0001-01-01T00:00:00+23:59"', b'"9999-12-31T23:59:59-23:59"',
    b'"1969-12-31T23:59:59.999Z"', b'"2200-01-01T00:00:00"', b'"2200-01-01T00:00:00.001"', b'"1e3"',
])


@st.composite
def huge_strings(draw) -> bytes:
    n = draw(st.one_of(st.integers(0, 2000), st.integers(MAX_ID_CHARS - 2, MAX_ID_CHARS + 2),
                       st.integers(MAX_QUERY_CHARS - 2, MAX_QUERY_CHARS + 2), st.integers(100_000, 300_000)))
    unit = draw(st.sampled_from([b"x", b"\\u00e9", b"\xc3\xa9", b"\\ud83d\\ude00", b"\\\\", b"\\n"]))
    return b'"' + unit * n + b'"'


fragments = st.one_of(
    loose_json_values.map(lambda v: json.dumps(v).encode()),  # NaN/Infinity floats come out as bare tokens
    number_tokens, huge_numbers(), string_tokens, huge_strings(), nested,
    st.builds(_nest, depths, st.sampled_from(["list", "dict", "mixed"]), st.one_of(string_tokens, number_tokens)),
)

_HOLE = "\x00hole\x00"


def _splice(event: dict, field: str, fragment: bytes) -> bytes:
    """The event serialised with `field` holding the raw JSON `fragment` (any bytes)."""
    return orjson.dumps({**event, field: _HOLE}).replace(orjson.dumps(_HOLE), fragment, 1)


@st.composite
def near_valid(draw) -> bytes:
    """A valid event broken in one way (or sometimes not at all)."""
    event, _ = draw(valid_events())
    raw = serialise(event, draw(serialisers))
    how = draw(st.sampled_from(["field", "field", "field", "drop", "duplicate", "bytes", "bom", "truncate", "none"]))
    if how == "field":
        field = draw(st.sampled_from(FIELDS + ("extra",)))
        return _splice(event, field, draw(fragments))
    if how == "drop":
        field = draw(st.sampled_from(FIELDS))
        return orjson.dumps({k: v for k, v in event.items() if k != field})
    if how == "duplicate":  # the same key twice: before and after the good value
        field = draw(st.sampled_from(FIELDS))
        frag = draw(fragments)
        pair = orjson.dumps(field) + b":" + frag
        if draw(st.booleans()):
            return raw[:-1] + b"," + pair + b"}"
        return b"{" + pair + b"," + raw[1:]
    if how == "bytes":  # non-UTF-8 (or odd) bytes spliced in anywhere
        junk = draw(st.sampled_from([b"\xff", b"\xfe", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82",
                                     b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\x00", b"\x1b", b"\t",
                                     b"\xef\xbb\xbf"]))
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + junk + raw[at:]
    if how == "bom":
        bom = draw(st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-32", "bom-only"]))
        if bom == "bom-only":
            return b"\xef\xbb\xbf" + raw
        return raw.decode("utf-8").encode(bom)
    if how == "truncate":
        return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    return raw


hostile_records = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.binary(max_size=8).map(lambda b: b"{" + b + b"}"),
    fragments,
    near_valid(),
    near_valid(),
    near_valid(),
)


@st.composite
def resplit_batches(draw) -> list[bytes]:
    """Valid events joined by commas, then cut into as many records at other commas (inside
    objects too): records that are not JSON alone, but whose comma-join is a list of n events.
    A decoder that parses a batch as one JSON array must not accept them."""
    events = draw(st.lists(valid_events(), min_size=2, max_size=5))
    joined = b",".join(orjson.dumps(event) for event, _ in events)
    commas = [i for i, byte in enumerate(joined) if byte == ord(",")]
    cuts = sorted(draw(st.sets(st.sampled_from(commas), min_size=len(events) - 1, max_size=len(events) - 1)))
    bounds = [-1] + cuts + [len(joined)]
    return [joined[a + 1:b] for a, b in itertools.pairwise(bounds)]


batches = st.one_of(st.lists(hostile_records, max_size=6), resplit_batches(),
                    st.lists(st.one_of(hostile_records, valid_events().map(lambda e: orjson.dumps(e[0]))), max_size=8))

# Bugs fuzzing found in stream.events (as of commit b1a81c6), kept as explicit examples:
# the tests that carry them fail until the decoder is fixed.
BASE = {"event_id": "e1", "user_id": "u1", "type": "click", "ts": 1_700_000_000_000, "item_id": "i9"}
# price = 10**400: the fast path and orjson refuse it, the stdlib json fallback that names the
# reason parses it as a Python int, and _validate's float(price) raises OverflowError out of decode_batch.
HUGE_INT_PRICE = _splice(BASE, "price", b"1" + b"0" * 400)
# type = 1000 nested lists: valid JSON for orjson (limit 1024 levels); the unknown_type detail
# formats str(type), which exceeds Python's recursion limit: RecursionError out of decode_batch.
DEEP_TYPE = _splice(BASE, "type", _nest(1000, "list_empty"))
# Two records, neither of them JSON alone (an object cut after its first field; the rest of it, a
# comma and a second object): decode_batch parses the comma-joined batch as one JSON array, gets 2
# events for 2 records and accepts both; each record alone is (rightly) dead-lettered as not_json.
SMUGGLED = [
    b'{"event_id":"e1"',
    (b'"user_id":"u1","type":"click","ts":1700000000000,"item_id":"i9"},'
     b'{"event_id":"e2","user_id":"u1","type":"click","ts":1700000000000,"item_id":"i9"}'),
]


# ----------------------------------------------------------------------------- properties


@settings(max_examples=300, **FUZZ)
@given(records=batches, limit=st.sampled_from([BIG_LIMIT, BIG_LIMIT, 65536, 2048, 256]),
       first_offset=st.integers(0, 2**62))
@example(records=[HUGE_INT_PRICE], limit=BIG_LIMIT, first_offset=0)
@example(records=SMUGGLED, limit=BIG_LIMIT, first_offset=0)
@example(records=[DEEP_TYPE], limit=BIG_LIMIT, first_offset=0)
@example(records=[None, b"", b"\xef\xbb\xbf{}", b"[" * 50_000, b'{"a":' * 20_000], limit=BIG_LIMIT, first_offset=0)
def test_hostile_records_never_raise_and_are_all_accounted_for(records, limit, first_offset):
    batch = make_batch(records, first_offset)
    cols, dead = decode(batch, limit)
    check_accounting(batch, cols, dead)
    check_contract(cols)


@pytest.mark.parametrize("field", FIELDS + ("extra",))
@settings(max_examples=100, **FUZZ)
@given(event=valid_events(), fragment=fragments, duplicate=st.sampled_from([None, "before", "after"]))
@example(event=(BASE, ()), fragment=b"1" + b"0" * 400, duplicate=None)  # HUGE_INT_PRICE when field == "price"
@example(event=(BASE, ()), fragment=_nest(1000, "list_empty"), duplicate=None)  # DEEP_TYPE when field == "type"
def test_one_field_of_a_valid_event_replaced_by_anything(field, event, fragment, duplicate):
    """A valid event with one field set to a hostile JSON fragment (or that field written twice)."""
    event = event[0]
    if duplicate is None:
        value = _splice(event, field, fragment)
    else:
        raw, pair = orjson.dumps(event), orjson.dumps(field) + b":" + fragment
        value = raw[:-1] + b"," + pair + b"}" if duplicate == "after" else b"{" + pair + b"," + raw[1:]
    batch = make_batch([orjson.dumps(BASE), value])
    cols, dead = decode(batch, BIG_LIMIT)
    check_accounting(batch, cols, dead)
    check_contract(cols)
    assert 0 in cols.record_index.tolist()


@pytest.mark.parametrize("field", FIELDS + ("extra", None))
@settings(max_examples=25, **FUZZ)
@given(event=valid_events(), depth=depths, shape=st.sampled_from(["list", "list_empty", "dict", "unclosed", "mixed"]),
       inner=st.one_of(string_tokens, number_tokens))
@example(event=(BASE, ()), depth=1000, shape="list_empty", inner=b"1")  # DEEP_TYPE when field == "type"
def test_deep_nesting_anywhere(field, event, depth, shape, inner):
    """Nesting from 1 to 50,000 levels, as the whole record or as the value of any one field."""
    nest = _nest(depth, shape, inner)
    value = nest if field is None else _splice(event[0], field, nest)
    batch = make_batch([value, orjson.dumps(BASE)])
    cols, dead = decode(batch, BIG_LIMIT)
    check_accounting(batch, cols, dead)
    check_contract(cols)
    assert 1 in cols.record_index.tolist()


@settings(max_examples=150, **FUZZ)
@given(values=st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_bytes_never_raise(values):
    batch = make_batch(values)
    cols, dead = decode(batch, BIG_LIMIT)
    check_accounting(batch, cols, dead)
    check_contract(cols)


@settings(max_examples=200, **FUZZ)
@given(events=st.lists(st.tuples(valid_events(), serialisers), min_size=1, max_size=8))
def test_valid_events_are_accepted_with_their_values(events):
    values = [serialise(event, how) for (event, _), how in events]
    batch = make_batch(values)
    cols, dead = decode(batch, BIG_LIMIT)
    assert dead == []
    check_accounting(batch, cols, dead)
    check_contract(cols)
    expected = [row + (i,) for i, ((_, row), _) in enumerate(events)]
    assert rows(cols) == expected


@settings(max_examples=100, **FUZZ)
@given(event=valid_events(), how=serialisers, slack=st.integers(0, 3))
def test_a_valid_event_exactly_at_the_limit_is_accepted(event, how, slack):
    value = serialise(event[0], how)
    cols, dead = decode(make_batch([value]), len(value) + slack)
    assert dead == [] and len(cols) == 1


@settings(max_examples=150, **FUZZ)
@given(records=st.lists(st.one_of(hostile_records, valid_events().map(lambda e: orjson.dumps(e[0]))), max_size=6),
       limit=st.one_of(st.integers(0, 400), st.integers(0, 4000)))
def test_too_large_exactly_when_over_the_limit(records, limit):
    batch = make_batch(records)
    cols, dead = decode(batch, limit)
    by_index = check_accounting(batch, cols, dead)
    for i, value in enumerate(records):
        if value is not None and len(value) > limit:
            assert i in by_index and by_index[i].reason == ev.TOO_LARGE
        elif i in by_index:
            assert by_index[i].reason != ev.TOO_LARGE


@settings(max_examples=150, **FUZZ)
@given(value=st.one_of(hostile_records.filter(lambda v: v), valid_events().map(lambda e: orjson.dumps(e[0]))),
       data=st.data())
def test_any_record_over_a_tight_limit_is_too_large(value, data):
    limit = data.draw(st.integers(0, len(value) - 1), label="limit")
    batch = make_batch([value, value])
    cols, dead = decode(batch, limit)
    check_accounting(batch, cols, dead)
    assert len(cols) == 0
    assert [d.reason for d in dead] == [ev.TOO_LARGE, ev.TOO_LARGE]


@settings(max_examples=150, **FUZZ)
@given(records=batches, split=st.integers(0, 8), limit=st.sampled_from([BIG_LIMIT, 1024, 200]))
@example(records=SMUGGLED, split=1, limit=BIG_LIMIT)
def test_decoding_is_invariant_under_splitting_the_batch(records, split, limit):
    split = min(split, len(records))
    whole = make_batch(records)
    head = make_batch(records[:split])
    tail = make_batch(records[split:], first_offset=1000 + 3 * split)
    cols, dead = decode(whole, limit)
    cols_head, dead_head = decode(head, limit)
    cols_tail, dead_tail = decode(tail, limit)
    assert rows(cols) == rows(cols_head) + rows(cols_tail, shift=split)
    assert dead == dead_head + dead_tail


@settings(max_examples=150, **FUZZ)
@given(records=batches, limit=st.sampled_from([BIG_LIMIT, 1024, 200]))
@example(records=SMUGGLED, limit=BIG_LIMIT)
def test_each_record_is_decoded_on_its_own(records, limit):
    """Splitting at every point: a record's fate never depends on its neighbours."""
    cols, dead = decode(make_batch(records), limit)
    alone = [decode(make_batch([value], first_offset=1000 + 3 * i), limit) for i, value in enumerate(records)]
    assert rows(cols) == [row for i, (c, _) in enumerate(alone) for row in rows(c, shift=i)]
    assert dead == [d for _, ds in alone for d in ds]


MB = 1024 * 1024


def _big_record(size: int, shape: str) -> bytes:
    """A record of about `size` bytes: a valid event padded by an extra field, one huge string, a huge
    id, bytes that are not UTF-8, or deep nesting."""
    if shape == "padded_event":
        return orjson.dumps({**BASE, "padding": "x" * size})
    if shape == "huge_user_id":
        return orjson.dumps({**BASE, "user_id": "u" * size})
    if shape == "string":
        return b'"' + b"y" * size + b'"'
    if shape == "not_utf8":
        return (bytes(range(256)) * (size // 256 + 1))[:size]
    return _nest(size // 2, "list_empty")


@settings(max_examples=20, **FUZZ)
@given(size=st.integers(0, 10 * MB),
       shape=st.sampled_from(["padded_event", "huge_user_id", "string", "not_utf8", "nested"]),
       limit=st.sampled_from([65536, BIG_LIMIT, 16 * MB]))
@example(size=10 * MB, shape="padded_event", limit=65536)
@example(size=10 * MB, shape="padded_event", limit=16 * MB)
@example(size=10 * MB, shape="not_utf8", limit=16 * MB)
def test_records_up_to_10mb_are_accounted_for_and_their_dead_letters_fit(size, shape, limit):
    """Whatever the size, every record is accounted for, its neighbour is unaffected, and its dead
    letter fits the dead-letter size rule: cut to DEAD_LETTER_MAX_VALUE_BYTES, original size and hash in headers."""
    import hashlib

    value = _big_record(size, shape)
    batch = make_batch([value, orjson.dumps(BASE)])
    cols, dead = decode(batch, limit)
    by_index = check_accounting(batch, cols, dead)
    check_contract(cols)
    assert 1 in cols.record_index.tolist()
    if len(value) > limit:
        assert by_index[0].reason == ev.TOO_LARGE
    for letter in dead:
        key, cut, headers = letter.record()
        h = dict(headers)
        assert len(cut) <= ev.DEAD_LETTER_MAX_VALUE_BYTES and cut == letter.value[:len(cut)]
        assert int(h["dlq.value_bytes"]) == len(letter.value)
        assert h["dlq.value_sha256"] == hashlib.sha256(letter.value).hexdigest().encode()
        assert h["dlq.truncated"] == (b"true" if len(letter.value) > ev.DEAD_LETTER_MAX_VALUE_BYTES else b"false")
