"""Spend is overflow-safe: an event's price x quantity is bounded by the contract, a user's total saturates."""

from __future__ import annotations

import itertools
import math

import numpy as np
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.update_step import SPEND_MAX_MICROS, add_spend, load_updater
from stream import events as ev
from stream.events import MAX_AMOUNT, RecordBatch
from stream.decode import decode_batch
from stream.settings import Settings
from tests.helpers import DEVICE, record_batch

FUZZ = {"deadline": None, "derandomize": True, "database": None,
        "suppress_health_check": [HealthCheck.too_slow]}
BASE = {"event_id": "e1", "user_id": "u1", "type": "purchase", "ts": 1_700_000_000_000, "item_id": "i9"}
prices = st.one_of(st.floats(0, 1e13, allow_nan=False), st.integers(0, 10**13), st.sampled_from([1e9, 1e9 + 1e-6]))
quantities = st.one_of(st.none(), st.integers(1, 1_000_000))


def batch(values: list[bytes], first_offset: int = 0) -> RecordBatch:
    # keyed by user id, as the partitioning policy wants (every event here is user u1's)
    return record_batch(values, first_offset=first_offset, keys=b"u1")


@settings(max_examples=300, **FUZZ)
@given(price=prices, quantity=quantities, iso_ts=st.booleans())
@example(price=9.3e9, quantity=1000, iso_ts=False)  # the case: spend wrapped to -9.2e12
@example(price=1e9, quantity=None, iso_ts=False)
@example(price=1e9 + 1e-6, quantity=None, iso_ts=True)
def test_an_amount_over_the_maximum_is_an_invalid_price_on_both_decode_paths(price, quantity, iso_ts):
    # An ISO timestamp with an offset takes the slow path; epoch ms the fast one: both must agree.
    event = {**BASE, "price": price, "ts": "2023-11-14T22:13:20+01:00" if iso_ts else BASE["ts"]}
    if quantity is not None:
        event["quantity"] = quantity
    cols, dead = decode_batch(batch([orjson.dumps(event)]), 65536)
    amount = float(price) * (quantity or 1)
    if amount > MAX_AMOUNT:
        assert len(cols) == 0 and [d.reason for d in dead] == [ev.INVALID_PRICE]
        assert "exceeds" in dead[0].detail
    else:
        assert not dead and len(cols) == 1


@settings(max_examples=200, **FUZZ)
@given(start=st.integers(0, SPEND_MAX_MICROS),
       amounts=st.lists(st.integers(0, int(MAX_AMOUNT * 1e6)), max_size=12_000 // 100).map(lambda a: a * 100))
@example(start=0, amounts=[int(MAX_AMOUNT * 1e6)] * 10_000)  # 10,000 maximal purchases in one batch
@example(start=SPEND_MAX_MICROS - 5, amounts=[3, 3])
def test_spend_totals_are_exact_until_they_saturate_and_never_wrap(start, amounts):
    spend = np.array([start, 7], dtype=np.int64)
    add_spend(spend, np.zeros(len(amounts), dtype=np.int64), np.asarray(amounts, dtype=np.float64))
    assert int(spend[0]) == min(start + sum(amounts), SPEND_MAX_MICROS)
    assert int(spend[1]) == 7


def test_a_user_with_maximal_purchases_across_batches_saturates_instead_of_going_negative():
    updater = load_updater(Settings(input_topics=("events",), device=DEVICE))
    ids = itertools.count()
    for k in range(3):  # 3 batches of 4,000 purchases of the maximum amount: 1.2e13 > the cap of 9e12
        values = [orjson.dumps({**BASE, "event_id": f"e{next(ids)}", "price": MAX_AMOUNT / 10, "quantity": 10})
                  for _ in range(4000)]
        result = updater.process(batch(values, first_offset=4000 * k))
        assert not result.dead_letters
    row = updater.state.row("u1")
    assert int(updater.state.spend_micros[row]) == SPEND_MAX_MICROS
    profile = orjson.loads(result.profiles[0][1])
    assert profile["spend"] == SPEND_MAX_MICROS / 1e6 and not math.isinf(profile["spend"])
