"""The event contract: what decodes, what is dead-lettered and why."""

from __future__ import annotations

import math

import orjson
import pytest

from stream import events as ev
from stream.decode import decode_batch
from stream.malformed import MALFORMED_KINDS, malformed
from tests.helpers import record_batch

CLICK = {"event_id": "e1", "user_id": "u1", "type": "click", "ts": 1_700_000_000_000, "item_id": "i9",
         "category": "shoes", "price": 19.5}


def decode(*values: bytes | None, limit: int = 65536):
    return decode_batch(record_batch(values, topic="t", partition=3, first_offset=100, keys=b"k"), limit)


def test_valid_events_become_columns():
    search = {"event_id": "e2", "user_id": 42, "type": "search", "ts": "2024-05-01T12:00:00Z", "query": "red shoes"}
    purchase = {**CLICK, "event_id": "e3", "type": "purchase", "quantity": 3, "ts": "2024-05-01T12:00:01"}
    cols, dead = decode(orjson.dumps(CLICK), orjson.dumps(search), orjson.dumps(purchase))
    assert dead == []
    assert list(cols.user_id) == ["u1", "42", "u1"]  # integer ids normalised to strings
    assert cols.type_idx.tolist() == [ev.CLICK, ev.SEARCH, ev.PURCHASE]
    assert cols.ts.tolist() == [1_700_000_000_000, 1_714_564_800_000, 1_714_564_801_000]  # naive ISO = UTC
    assert cols.quantity.tolist() == [1, 1, 3]
    assert math.isnan(cols.price[1]) and cols.price[2] == 19.5
    assert list(cols.query) == [None, "red shoes", None]
    assert cols.record_index.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", sorted(MALFORMED_KINDS))
def test_each_kind_of_bad_record_is_dead_lettered_with_its_reason(kind):
    value, reason = malformed(CLICK, kind, 1000)
    cols, dead = decode(orjson.dumps(CLICK), value, limit=1000)
    assert len(cols) == 1 and cols.record_index.tolist() == [0]
    assert len(dead) == 1
    d = dead[0]
    assert (d.reason, d.value, d.key, d.topic, d.partition, d.offset) == (reason, value, b"k", "t", 3, 101)
    headers = dict(d.headers())
    assert headers["dlq.reason"] == reason.encode() and headers["dlq.offset"] == b"101"


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"type": "click", "item_id": None}, ev.MISSING_FIELD),
        ({"type": "search", "query": ""}, ev.MISSING_FIELD),
        ({"user_id": True}, ev.INVALID_FIELD),
        ({"user_id": ""}, ev.INVALID_FIELD),
        ({"event_id": 7.5}, ev.INVALID_FIELD),
        ({"ts": "yesterday"}, ev.INVALID_FIELD),
        ({"ts": -5}, ev.INVALID_FIELD),
        ({"ts": 1.7e9}, ev.INVALID_FIELD),
        ({"price": "9.99"}, ev.INVALID_PRICE),
        ({"price": -0.01}, ev.INVALID_PRICE),
        ({"type": "purchase", "quantity": 0}, ev.INVALID_FIELD),
        ({"type": "purchase", "quantity": 1.5}, ev.INVALID_FIELD),
        ({"type": 3}, ev.UNKNOWN_TYPE),
        ({"item_id": "x" * 300}, ev.INVALID_FIELD),
    ],
)
def test_field_rules(change, reason):
    event = {k: v for k, v in {**CLICK, **change}.items() if v is not None}
    _, dead = decode(orjson.dumps(event))
    assert [d.reason for d in dead] == [reason]


def test_null_value_and_deep_nesting_are_dead_letters_not_crashes():
    deep = b"[" * 5000 + b"]" * 5000
    cols, dead = decode(None, deep, b"", b"\x00\x01")
    assert len(cols) == 0
    assert [d.reason for d in dead] == [ev.NOT_JSON, ev.NOT_JSON, ev.NOT_JSON, ev.NOT_JSON]


@pytest.mark.parametrize("depth", [1025, 1500, 5000, 10000])
def test_nesting_past_the_parser_limit_is_not_json_on_every_python(depth):
    # Python's own json reads some of these depths (1025 on 3.12, 5000 on 3.13) and would call them
    # `not_object`; the reason must not depend on the interpreter.
    for value in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
        _, dead = decode(value)
        assert [(d.reason, d.detail) for d in dead] == [(ev.NOT_JSON, "nested deeper than 1024 levels")]


def test_nesting_within_the_parser_limit_is_judged_on_its_content():
    # Brackets inside strings (an escaped quote among them) do not count as nesting: the NaN price that
    # sends this record down the slow path is what it is refused for.
    brackets = orjson.dumps({**CLICK, "note": '\\"' + "[" * 3000})[:-1] + b', "price": NaN}'
    _, dead = decode(b"[" * 1024 + b"]" * 1024, brackets)
    assert [d.reason for d in dead] == [ev.NOT_OBJECT, ev.INVALID_PRICE]


def test_every_dead_letter_reason_has_a_malformed_record_that_produces_it():
    assert {reason for reason, _ in MALFORMED_KINDS.values()} == set(ev.REASONS)


@pytest.mark.parametrize("written", [b"1.7e12", b"1700000000000.0", b"1700000000000.75", b"17000000000005e-1"])
def test_a_number_with_a_fraction_or_an_exponent_is_epoch_milliseconds_rounded_down(written):
    """Encoders of doubles write 1.7E12 or 1700000000000.0 for a time in milliseconds: it is the same number,
    read so on both of the decoder's paths (alone, and beside an ISO time that sends the batch's times the
    slow way)."""
    for batch in ([raw_click(ts=written)], [raw_click(ts=written), raw_click(ts=b'"2024-05-01T12:00:00Z"')]):
        cols, dead = decode(*batch)
        assert dead == [] and int(cols.ts[0]) == 1_700_000_000_000


def test_an_integer_event_id_becomes_its_decimal_string_as_user_and_item_ids_do():
    cols, dead = decode(orjson.dumps({**CLICK, "event_id": 7}), orjson.dumps({**CLICK, "event_id": -2**63}))
    assert dead == [] and list(cols.event_id) == ["7", str(-2**63)]


def test_a_whole_quantity_written_as_a_double_is_that_quantity():
    purchase = {**CLICK, "type": "purchase", "quantity": 2.0}
    cols, dead = decode(orjson.dumps(purchase), orjson.dumps({**purchase, "event_id": "e2", "quantity": 2.5}))
    assert cols.quantity.tolist() == [2] and [d.reason for d in dead] == [ev.INVALID_FIELD]


def raw_click(user=b'"u1"', kind=b'"click"', ts=b"1700000000000", item=b'"i"', extra=b"") -> bytes:
    """A click record written out byte for byte: some cases are JSON no encoder would write."""
    return b'{"event_id":"e1","user_id":%s,"type":%s,"ts":%s,"item_id":%s%s}' % (user, kind, ts, item, extra)


@pytest.mark.parametrize("value, reason, detail", [
    # A lone surrogate escape is valid JSON syntax but not Unicode: not a NaN.
    (raw_click(user=b'"\\ud800"'), ev.NOT_JSON, "lone UTF-16 surrogate"),
    (raw_click(extra=b',"note":"\\ud800"'), ev.NOT_JSON, "lone UTF-16 surrogate"),
    # 2**64 is read as a float by the strict parser: it is an integer out of range, not "a float".
    (raw_click(user=b"18446744073709551616"), ev.INVALID_FIELD, "integer 'user_id' outside the 64-bit range"),
    (raw_click(item=b"-18446744073709551616"), ev.INVALID_FIELD, "integer 'item_id' outside the 64-bit range"),
    (raw_click(extra=b',"x":NaN'), ev.NOT_JSON, "NaN or Infinity"),
    # Epoch seconds read as milliseconds would be January 1970, with days shrunk to minutes: refused, and said.
    (raw_click(ts=b"1700000000"), ev.INVALID_FIELD, "epoch seconds?"),
    (raw_click(ts=b"1700000000.25"), ev.INVALID_FIELD, "epoch seconds?"),  # a clock's time(), as a float
    (raw_click(ts=b"1e400"), ev.INVALID_FIELD, "'ts' is not a finite number"),
    (raw_click(ts=b'"1970-01-20T16:13:20Z"'), ev.INVALID_FIELD, "out of range"),
    (raw_click(ts=b"1700000000000000"), ev.INVALID_FIELD, "out of range"),
    # A type from another dataset's vocabulary: the detail lists the contract's four.
    (raw_click(kind=b'"view"'), ev.UNKNOWN_TYPE, "'view' (the contract's: search, click, add_to_cart, purchase)"),
])
def test_dead_letter_details_name_what_is_wrong(value, reason, detail):
    cols, dead = decode(value)
    assert len(cols) == 0 and [d.reason for d in dead] == [reason]
    assert detail in dead[0].detail
