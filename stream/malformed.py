"""Malformed records of every kind the decoder must dead-letter, for tests, demos and load runs.

Each maker takes a valid event (dict) and returns raw bytes that break the
contract in one specific way; `MALFORMED_KINDS` maps the expected reason code to it.
"""

from __future__ import annotations

import random
from typing import Callable

import orjson

from stream import events as ev


def _dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


def _without(event: dict, field: str) -> dict:
    return {k: v for k, v in event.items() if k != field}


# kind -> (reason code the decoder must report, maker(event, max_event_bytes) -> bytes)
MALFORMED_KINDS: dict[str, tuple[str, Callable[[dict, int], bytes]]] = {
    "not_json": (ev.NOT_JSON, lambda e, _: _dumps(e)[:-3] + b"#,"),
    "invalid_utf8": (ev.INVALID_UTF8, lambda e, _: _dumps(e)[:-1] + b',"note":"\xff\xfe"}'),
    "not_object": (ev.NOT_OBJECT, lambda e, _: _dumps([e])),
    "missing_user_id": (ev.MISSING_FIELD, lambda e, _: _dumps(_without(e, "user_id"))),
    "ill_typed_ts": (ev.INVALID_FIELD, lambda e, _: _dumps({**e, "ts": [e.get("ts")]})),
    "unknown_type": (ev.UNKNOWN_TYPE, lambda e, _: _dumps({**e, "type": "wishlist"})),
    "negative_price": (ev.INVALID_PRICE, lambda e, _: _dumps({**e, "price": -abs(e.get("price") or 1.0)})),
    # NaN is not JSON, but some producers write the bare token anyway.
    "nan_price": (ev.INVALID_PRICE, lambda e, _: _dumps({**e, "price": 0.5}).replace(b":0.5", b":NaN")),
    # price x quantity over MAX_AMOUNT: would wrap the int64 spend counter.
    "overflowing_amount": (ev.INVALID_PRICE, lambda e, _: _dumps({**e, "price": 1e8, "quantity": 1000})),
    # The state topic keys its own records with a leading NUL (stream/changelog_records.py META_KEY).
    "reserved_user_id": (ev.INVALID_FIELD, lambda e, _: _dumps({**e, "user_id": ev.RESERVED_ID_PREFIX + "meta"})),
    "too_large": (ev.TOO_LARGE, lambda e, limit: _dumps({**e, "padding": "x" * limit})),
}


def malformed(event: dict, kind: str, max_event_bytes: int = 65536) -> tuple[bytes, str]:
    """(bytes breaking the contract in the way `kind` names, the reason the decoder must report)."""
    reason, make = MALFORMED_KINDS[kind]
    return make(event, max_event_bytes), reason


def corrupt_some(events: list[dict], fraction: float, seed: int = 0,
                 max_event_bytes: int = 65536) -> tuple[list[bytes], dict[int, str]]:
    """Serialise `events`, replacing about `fraction` of them by malformed records of
    every kind in turn. Returns (records, {index: expected reason})."""
    rng = random.Random(seed)
    kinds = list(MALFORMED_KINDS)
    records, bad = [], {}
    for i, event in enumerate(events):
        if rng.random() < fraction:
            record, reason = malformed(event, kinds[len(bad) % len(kinds)], max_event_bytes)
            records.append(record)
            bad[i] = reason
        else:
            records.append(_dumps(event))
    return records, bad
