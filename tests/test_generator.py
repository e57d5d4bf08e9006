"""The synthetic traffic generator: contract, determinism, ordering and the structure it promises.

No broker: these run on the generated events alone and take a few seconds.
"""

from __future__ import annotations

import gzip
import itertools
import math
from collections import Counter, defaultdict

import numpy as np
import orjson
import pytest

from stream.generator import (EVENT_TYPES, ShopParams, SyntheticLog, UserTruth, generate, iter_events, user_truths,
                              write_jsonl)

START = 1_700_000_000_000
DAY_MS = 86_400_000
USERS, EVENTS, SEED = 1000, 40_000, 7

# Exactly the keys each type carries (event_id, user_id, type, ts are common).
COMMON = {"event_id", "user_id", "type", "ts"}
KEYS = {
    "search": COMMON | {"category", "query"},
    "click": COMMON | {"item_id", "category", "price"},
    "add_to_cart": COMMON | {"item_id", "category", "price"},
    "purchase": COMMON | {"item_id", "category", "price", "quantity"},
}


@pytest.fixture(scope="module")
def log() -> SyntheticLog:
    return generate(users=USERS, events=EVENTS, seed=SEED)


@pytest.fixture(scope="module")
def by_user(log: SyntheticLog) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for e in log.events:
        out[str(e["user_id"])].append(e)
    return out


def test_same_seed_same_log_and_different_seed_different_log():
    a = generate(users=200, events=5000, seed=3)
    b = generate(users=200, events=5000, seed=3)
    c = generate(users=200, events=5000, seed=4)
    assert orjson.dumps(a.events) == orjson.dumps(b.events)
    assert a.users == b.users and a.categories == b.categories
    assert [e["ts"] for e in a.events] != [e["ts"] for e in c.events]
    assert a.users != c.users


def test_user_truths_are_the_simulated_users_whatever_the_event_count():
    truths = user_truths(200, seed=3)
    assert truths == generate(users=200, events=5000, seed=3).users
    assert truths == generate(users=200, events=100, seed=3).users
    assert all(isinstance(t, UserTruth) for t in truths.values())
    assert set(truths) == {str(t.user_id) for t in truths.values()}


@pytest.mark.parametrize("n", [0, 1, 1234])
def test_exact_event_count(n: int):
    assert len(generate(users=50, events=n, seed=1).events) == n
    assert sum(1 for _ in iter_events(50, seed=1, events=n)) == n


def test_iter_events_yields_the_materialised_log(log: SyntheticLog):
    streamed = list(iter_events(USERS, SEED, events=EVENTS))
    assert orjson.dumps(streamed) == orjson.dumps(log.events)


def test_global_order_and_strictly_increasing_per_user(log: SyntheticLog, by_user):
    ts = np.array([e["ts"] for e in log.events], dtype=np.int64)
    assert np.all(np.diff(ts) >= 0)
    for events in by_user.values():
        user_ts = np.array([e["ts"] for e in events], dtype=np.int64)
        assert np.all(np.diff(user_ts) > 0)


def test_every_event_satisfies_the_contract(log: SyntheticLog):
    for e in log.events:
        assert e["type"] in EVENT_TYPES
        assert set(e) == KEYS[e["type"]], e
        assert isinstance(e["event_id"], str) and e["event_id"]
        assert isinstance(e["user_id"], (str, int)) and not isinstance(e["user_id"], bool)
        assert type(e["ts"]) is int and START <= e["ts"] < START + 365 * DAY_MS
        assert isinstance(e["category"], str) and e["category"] in log.categories
        if e["type"] == "search":
            assert isinstance(e["query"], str) and e["query"].strip()
        else:
            assert isinstance(e["item_id"], str) and e["item_id"]
            price = e["price"]
            assert type(price) is float and math.isfinite(price) and price >= 0 and round(price, 2) == price
        if e["type"] == "purchase":
            assert type(e["quantity"]) is int and e["quantity"] >= 1
    assert orjson.loads(orjson.dumps(log.events)) == log.events  # JSON-serialisable, losslessly


def test_event_ids_unique(log: SyntheticLog):
    assert len({e["event_id"] for e in log.events}) == len(log.events)


def test_user_ids_keep_one_type_and_about_ten_percent_are_ints(log: SyntheticLog, by_user):
    for key, events in by_user.items():
        assert len({(type(e["user_id"]), e["user_id"]) for e in events}) == 1
        assert events[0]["user_id"] == log.users[key].user_id
    ints = sum(isinstance(t.user_id, int) for t in log.users.values())
    assert 0.05 * USERS < ints < 0.15 * USERS


def test_catalogue_items_have_a_fixed_price_and_category(log: SyntheticLog):
    seen: dict[str, tuple[str, float]] = {}
    for e in log.events:
        if "item_id" in e:
            assert seen.setdefault(e["item_id"], (e["category"], e["price"])) == (e["category"], e["price"])
    assert 30 <= len(log.categories) <= 50 and len(set(log.categories)) == len(log.categories)
    assert 300 <= len(seen) <= 10_000


def test_every_user_appears_and_the_log_spans_about_span_days(log: SyntheticLog, by_user):
    assert set(by_user) == set(log.users)
    span_days = (log.events[-1]["ts"] - START) / DAY_MS
    assert 22 <= span_days <= 40
    short = generate(users=100, events=2000, seed=2, span_days=5.0)
    assert 3.5 <= (short.events[-1]["ts"] - START) / DAY_MS <= 7
    assert {str(e["user_id"]) for e in short.events} == set(short.users)


def test_a_structured_shop_keeps_meeting_new_users_and_the_classic_one_meets_them_early(log: SyntheticLog, by_user):
    """Two thirds of a structured shop's users arrive along the span (the first 90% of it), the others in its first
    10%; every user, quiet or not, is seen: a quiet one goes quiet after it arrived. The classic shop's users all
    come in the span's first 10%."""
    def first_visits(events: list[dict]) -> dict[str, int]:
        first: dict[str, int] = {}
        for e in events:  # in time order
            first.setdefault(str(e["user_id"]), e["ts"])
        return first

    span = 30 * DAY_MS
    classic = np.array(list(first_visits(log.events).values())) - START
    assert classic.max() < 0.1 * span and len(classic) == USERS
    shop = generate(users=3000, events=60_000, seed=SEED, shop=ShopParams.draw(1))
    first = first_visits(shop.events)
    assert set(first) == set(shop.users)  # every user arrives, the quiet ones before they go quiet
    at = (np.array(list(first.values())) - START) / span
    late = at >= 0.1
    assert 0.57 < late.mean() < 0.63  # two thirds arrive along the span, and 10% of those within its first 10%
    assert np.histogram(at[late], bins=4, range=(0.1, 0.9))[0].min() > 0.2 * late.sum()  # evenly
    assert at.max() < 0.9
    for user, truth in shop.users.items():
        assert truth.quiet_after_ts is None or truth.quiet_after_ts > first[user]


def test_funnel_cart_follows_click_and_purchase_follows_cart(by_user):
    for events in by_user.values():
        clicked: set[str] = set()
        carted: set[str] = set()
        for e in events:  # events of one user in log order
            if e["type"] == "click":
                clicked.add(e["item_id"])
            elif e["type"] == "add_to_cart":
                assert e["item_id"] in clicked
                carted.add(e["item_id"])
            elif e["type"] == "purchase":
                assert e["item_id"] in carted


def test_structured_visits_pause_and_carts_are_bought_after_the_break():
    """A structured shop's sessions may end in a break of minutes and leave their checkout to the session
    after it: purchases an hour after the cart are common there, and rare with breaks and deferrals off
    (sessions are then ten minutes apart at least, usually days). The funnel holds either way."""
    import dataclasses

    from stream.synthetic_world import ShopParams

    def after_the_cart(shop: ShopParams) -> tuple[float, int]:
        carted_at: dict[tuple[str, str], int] = {}
        later = purchases = 0
        for e in generate(users=400, events=30_000, seed=5, span_days=30, shop=shop).events:
            key = (str(e["user_id"]), e.get("item_id"))
            if e["type"] == "add_to_cart":
                carted_at[key] = e["ts"]
            elif e["type"] == "purchase":
                assert key in carted_at  # purchase follows cart
                purchases += 1
                later += 10 * 60_000 <= e["ts"] - carted_at[key] < 3 * 3_600_000
        return later / purchases, purchases

    shop = dataclasses.replace(ShopParams.draw(3), dwell_scale=1.0)  # clicks a classic 40 s apart
    assert shop.break_share > 0 and shop.defer_share > 0
    with_visits, n = after_the_cart(shop)
    without, m = after_the_cart(dataclasses.replace(shop, break_share=0.0, defer_share=0.0))
    assert n > 500 and m > 500
    assert with_visits > 0.2 > 0.05 > without


@pytest.mark.parametrize("shop_seed", [None, 3])
def test_replenishers_rebuy_their_staple_when_their_own_cycle_runs_out(shop_seed):
    """With --replenish-share, about that share of users rebuy one item of their favourite category, each on a
    cycle of their own (7 to 35 days, jittered): the gaps between a replenisher's rebuys follow the user's cycle,
    not the shop's. Without it (share 0) the log is byte for byte what it was."""
    import dataclasses

    from stream.synthetic_world import ShopParams

    shop = ShopParams.of_seed(shop_seed) or ShopParams()
    log = generate(users=300, events=40_000, seed=8, span_days=120, shop=dataclasses.replace(shop, replenish_share=0.5))
    cycles = {u: t.replenish_cycle_days for u, t in log.users.items() if t.replenish_cycle_days is not None}
    assert 0.4 < len(cycles) / len(log.users) < 0.6
    assert all(7 <= c <= 35 for c in cycles.values())
    bought: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in log.events:
        if e["type"] == "purchase":
            bought[(str(e["user_id"]), e["item_id"])].append(e["ts"])
    ratios = []  # each replenisher's median gap between buys of its most bought item, over its cycle
    for user, cycle in cycles.items():
        staple = max((k for k in bought if k[0] == user), key=lambda k: len(bought[k]), default=None)
        if staple is not None and len(bought[staple]) >= 3:
            gaps = np.diff(sorted(bought[staple])) / 86_400_000
            ratios.append(float(np.median(gaps)) / cycle)
    assert len(ratios) > 0.5 * len(cycles)
    assert 0.85 < np.median(ratios) < 1.15
    assert np.quantile(ratios, 0.9) < 1.6  # each user's own cycle, not a shop-wide one
    plain = generate(users=300, events=5_000, seed=8, span_days=120, shop=shop)
    assert plain.events == generate(users=300, events=5_000, seed=8, span_days=120,
                                    shop=dataclasses.replace(shop, replenish_share=0.0)).events
    assert all(t.replenish_cycle_days is None for t in plain.users.values())


def test_sessions_mostly_start_with_a_search_about_the_clicked_category(by_user):
    # A click right after a search (same user, within 10 minutes) is about the searched category.
    pairs = same = 0
    for events in by_user.values():
        for prev, cur in zip(events, events[1:]):
            if prev["type"] == "search" and cur["type"] == "click" and cur["ts"] - prev["ts"] < 600_000:
                pairs += 1
                same += prev["category"] == cur["category"]
    assert pairs > 1000 and same == pairs


def test_habitual_buyers_convert_far_more(log: SyntheticLog, by_user):
    rates = {True: [], False: []}
    for key, events in by_user.items():
        counts = Counter(e["type"] for e in events)
        if counts["click"] >= 10:
            rates[log.users[key].habitual_buyer].append(counts["purchase"] / counts["click"])
    assert len(rates[True]) > 50 and len(rates[False]) > 200
    assert np.median(rates[True]) > 4 * max(np.median(rates[False]), 0.01)
    assert np.mean(rates[True]) > 0.15 > np.mean(rates[False])
    habitual = sum(t.habitual_buyer for t in log.users.values())
    assert 0.18 * USERS < habitual < 0.32 * USERS


def test_quiet_users_emit_nothing_after_quiet_after_ts(log: SyntheticLog, by_user):
    quiet = [t for t in log.users.values() if t.goes_quiet]
    assert 0.12 * USERS < len(quiet) < 0.28 * USERS
    half_span = START + 15 * DAY_MS
    for t in log.users.values():
        if not t.goes_quiet:
            assert t.quiet_after_ts is None
            continue
        assert START < t.quiet_after_ts <= half_span
        events = by_user[str(t.user_id)]
        assert events, "a quiet user is active before going quiet"
        assert events[-1]["ts"] <= t.quiet_after_ts
    # And they are really missed: the active ones carry on into the second half.
    late = {str(e["user_id"]) for e in log.events if e["ts"] > half_span}
    assert not late & {str(t.user_id) for t in quiet}
    assert len(late) > 0.6 * USERS


def test_favourite_categories_dominate_clicks(log: SyntheticLog, by_user):
    checked = top_is_favourite = overlaps = 0
    on_favourites = total = 0
    for key, events in by_user.items():
        favs = log.users[key].favourite_categories
        assert 2 <= len(favs) <= 3 and len(set(favs)) == len(favs)
        clicks = Counter(e["category"] for e in events if e["type"] == "click")
        on_favourites += sum(clicks[c] for c in favs)
        total += sum(clicks.values())
        if sum(clicks.values()) >= 30:
            checked += 1
            top3 = [c for c, _ in clicks.most_common(3)]
            overlaps += bool(set(top3) & set(favs))
            top_is_favourite += top3[0] in favs
    assert checked > 200
    assert overlaps >= 0.99 * checked
    assert top_is_favourite >= 0.95 * checked
    assert on_favourites / total > 0.75


def test_price_level_drives_the_prices_users_click(log: SyntheticLog, by_user):
    # Compare each click's price with its category's mean, so that category mix does not matter.
    cat_prices: dict[str, list[float]] = defaultdict(list)
    for e in log.events:
        if e["type"] == "click":
            cat_prices[e["category"]].append(e["price"])
    cat_mean = {c: float(np.mean(p)) for c, p in cat_prices.items()}
    levels, relative = [], []
    for key, events in by_user.items():
        rel = [math.log(e["price"] / cat_mean[e["category"]]) for e in events if e["type"] == "click"]
        if len(rel) >= 10:
            levels.append(math.log(log.users[key].price_level))
            relative.append(float(np.mean(rel)))
    assert np.corrcoef(levels, relative)[0, 1] > 0.5


@pytest.mark.parametrize("name", ["events.jsonl", "events.jsonl.gz"])
def test_write_jsonl_round_trip(tmp_path, name: str):
    events = generate(users=30, events=700, seed=5).events
    path = tmp_path / name
    assert write_jsonl(iter(events), path) == len(events)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as fh:
        lines = fh.read().splitlines()
    assert [orjson.loads(line) for line in lines] == events
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert write_jsonl([], tmp_path / ("empty-" + name)) == 0


def test_endless_stream_slices_deterministically_past_the_span():
    # 20 users make 5000 events cover many days: the stream must keep going past span_days.
    take = list(itertools.islice(iter_events(20, seed=9, span_days=1.0), 5000))
    again = list(itertools.islice(iter_events(20, seed=9, span_days=1.0), 5000))
    assert len(take) == 5000 and take == again
    ts = [e["ts"] for e in take]
    assert ts == sorted(ts) and ts[-1] > START + 2 * DAY_MS
    assert len({e["event_id"] for e in take}) == 5000


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        generate(users=0, events=10)
    with pytest.raises(ValueError):
        generate(users=10, events=-1)
    with pytest.raises(ValueError):
        iter_events(10, span_days=0)
