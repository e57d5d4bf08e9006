"""Synthetic e-commerce traffic with real structure (sessions, funnels, tastes, churn).

Used by the demo (endless stream), by the integration tests (tens of thousands of
events) and by load runs (millions of events). The shop it simulates -- catalogue,
users and their truths -- is `stream.synthetic_world`; this module is the traffic:
the users' sessions, emitted in time order.

* **Sessions** -- bursts of events seconds apart: usually a search about a
  category, clicks on items of that category (sometimes a refining search in
  between), add-to-cart of a just-clicked item, and at the end a checkout that
  buys some of the carted items. Sessions are separated by exponential gaps
  scaled by the user's activity rate. In a structured shop a session may end
  in a break of minutes instead (the visit goes on in the same category), and
  may leave its checkout to the session after the break.

``iter_events`` keeps a heap of ``(next_event_ts, user_index)`` (packed into one
int per user); a user's pending session (a handful of events) is planned when
the session starts and dropped when it ends, so memory is O(users), never
O(events).

Session rates follow from ``events / users / span_days`` so that a finite log
covers about ``span_days`` (a structured shop's, or one with replenishers, are
checked by simulating its users: see ``_sessions_per_day``); with few events per
user the gaps between a user's sessions are therefore days rather than hours.

Everything is deterministic given the seed: a ``random.Random`` seeded from the
seed's own ``SeedSequence`` stream drives the event stream (its scalar draws are
far cheaper than numpy's per call). Python's salted ``hash()`` is never used.
"""

from __future__ import annotations

import gzip
import heapq
import math
import random
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import orjson

from stream.synthetic_world import (
    REPLENISH_JITTER, DAY_MS, DEFAULT_START_TS_MS, ShopParams, UserTruth, World, seed_sequence,
)

EVENT_TYPES = ("search", "click", "add_to_cart", "purchase")

# ShopParams and UserTruth are defined with the world; they are named here too because the
# functions below take and return them.
__all__ = ["EVENT_TYPES", "ShopParams", "UserTruth", "SyntheticLog", "iter_events", "user_truths", "generate", "write_jsonl"]

# Query adjectives: neutral ones for everybody, price words that match the user's price level.
_NEUTRAL_WORDS = ("red", "black", "blue", "white", "grey", "green", "new", "classic", "compact",
                  "large", "small", "popular", "best", "lightweight")
_BUDGET_WORDS = ("cheap", "budget", "affordable", "discount")
_PREMIUM_WORDS = ("premium", "luxury", "professional", "high-end")

# Sessions. Per-user conversion (cart per click, buy per carted item) is the world's (World.p_cart, p_buy).
_P_SEARCH_FIRST = 0.85           # a session usually opens with a search
_P_MORE_CLICKS = 0.60            # clicks per session ~ 1 + geometric: mean 2.5
_MAX_CLICKS = 25
_P_REFINE_SEARCH = 0.15          # a new search before a further click
_P_QUANTITY = (0.88, 0.97)       # cumulative: quantity 1, 2, else 3
# Gaps inside a session in ms: (minimum, mean of the exponential extra). The
# minimum keeps every user's timestamps strictly increasing.
_GAP_SEARCH_CLICK = (2_000, 15_000)
_GAP_CLICK_CLICK = (3_000, 40_000)
_GAP_CLICK_CART = (1_000, 10_000)
_GAP_CHECKOUT = (5_000, 60_000)
_MIN_SESSION_GAP_MS = 10 * 60_000  # sessions never overlap
_DEFAULT_SESSIONS_PER_DAY = 3.0    # endless streams (events=None)
_CALIBRATION_USERS = 2000          # a structured shop's rates are checked on a simulated sample of this many users
_CALIBRATION_ROUNDS = 6


@dataclass
class SyntheticLog:
    """A materialised log and the truths behind it."""

    events: list[dict]
    users: dict[str, UserTruth]  # keyed by str(user_id)
    categories: list[str]


def _expected_events_per_session(world: World) -> np.ndarray:
    """Mean events in one (uncut) visit of each user, from the session model: one session, or in a shop whose
    sessions end in breaks, (1 + a d / (1 - d)) / (1 - b) sessions. A visit's sessions are a chain of two
    states, cart empty or carried over: with a = the chance that a session carts, b the break share and d
    the defer share, an empty-cart session has a next one with a carried cart with probability a d and one
    with an empty cart with (1 - a d) b; a carried-cart session, d and (1 - d) b."""
    p_cart = np.asarray(world.p_cart)
    p_buy = np.asarray(world.p_buy)
    clicks = (1 - _P_MORE_CLICKS ** _MAX_CLICKS) / (1 - _P_MORE_CLICKS)
    searches = _P_SEARCH_FIRST + (clicks - 1) * _P_REFINE_SEARCH
    per_session = searches + clicks * (1 + p_cart + p_cart * p_buy)
    shop = world.shop
    carts = 1 - (1 - p_cart) ** clicks  # about: the chance that a session carts something
    b, d = min(shop.break_share, 0.95), min(shop.defer_share, 0.95)
    return per_session * (1 + carts * d / (1 - d)) / (1 - b)


def _expected_events(world: World):
    """The session model's expected event count of `world` within its span, as a function of the base rate
    (sessions per day of a user of activity 1): the sum over users of E[events/session] * (1 + active / period),
    with period = 1 / rate + (minimum gap + session length)."""
    per_session = _expected_events_per_session(world)
    first = np.asarray(world.first_session_ts, dtype=np.float64) - world.start_ts_ms
    end = np.minimum(np.asarray(world.quiet_after, dtype=np.float64) - world.start_ts_ms, world.span_ms)
    active_days = np.maximum(end - first, 0.0) / DAY_MS
    overhead_days = (_MIN_SESSION_GAP_MS + 4 * 60_000) / DAY_MS  # gap floor + a typical session

    def expected(base: float) -> float:
        period = 1.0 / (base * world.activity) + overhead_days
        return float(np.sum(per_session * (1.0 + active_days / period)))
    return expected


def _solve(expected, events: float) -> float:
    """The base rate at which the monotone `expected` gives `events` (bisection in log space); the floor
    where even one session per user is more than asked for."""
    lo, hi = math.log(1e-9), math.log(1e6)
    if expected(math.exp(lo)) >= events:
        return math.exp(lo)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if expected(math.exp(mid)) < events else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def _events_within_span(world: World, base: float) -> int:
    """How many events `world`'s users write within its span at base rate `base`, simulated."""
    end = world.start_ts_ms + world.span_ms
    n = 0
    for ev in _run(world, base * world.activity, None):
        if ev["ts"] > end:
            break
        n += 1
    return n


def _sessions_per_day(world: World, events: int | None) -> np.ndarray:
    """Each user's session rate (per day), calibrated so `events` events span about span_days.

    The session model (`_expected_events`) is exact for the classic shop. A structured shop's users also come
    back for the carts they left and slow down before going quiet, and replenishers rebuy on rhythms, which the
    model does not count, so there its count is corrected by simulating the shop's users (a sample of them in a
    large world) over the span at the model's rate, and the rate solved again, a few rounds (before session 71
    such logs ended at 45-70% of the span asked; docs/model-journal.md).
    """
    if events is None:
        return _DEFAULT_SESSIONS_PER_DAY * world.activity
    model = _expected_events(world)
    base = _solve(model, events)
    if not (world.shop.structured or world.shop.replenish_share > 0) or events == 0:
        return base * world.activity
    sample = world if world.n_users <= _CALIBRATION_USERS else World(
        _CALIBRATION_USERS, world.seed, world.start_ts_ms, world.span_ms / DAY_MS, world.catalogue_seed, world.shop)
    sample_model = _expected_events(sample)
    # The simulated count is noisy in the rate (another rate, other draws), so the rounds need not settle:
    # keep the round whose count came nearest, which in a world no larger than the sample is the log's own.
    best = (math.inf, base)
    for _ in range(_CALIBRATION_ROUNDS):
        correction = max(_events_within_span(sample, base), 1) / sample_model(base)
        best = min(best, (abs(math.log(model(base) * correction / events)), base))
        base = _solve(lambda b: model(b) * correction, events)
    return best[1] * world.activity


def _run(world: World, sessions_per_day: np.ndarray, events: int | None) -> Iterator[dict]:
    """The event loop: pop the user with the earliest pending event, emit it, push its next one."""
    rnd = random.Random(int.from_bytes(seed_sequence(world.seed, 2).generate_state(4, np.uint32).tobytes(), "little"))
    r = rnd.random
    expo = rnd.expovariate
    log = math.log
    categories, tables, phrases = world.categories, world.tables, world.phrases
    n_cat = len(categories)
    user_ids, favourites, fav_cum, tiers = world.user_ids, world.favourites, world.fav_cum, world.tier
    price_words, p_cart, p_buy, quiet_after = world.price_words, world.p_cart, world.p_buy, world.quiet_after
    # Session rate per ms (expovariate takes the rate, i.e. 1 / mean gap).
    rate_ms = (sessions_per_day / DAY_MS).tolist()
    word_lists = (_NEUTRAL_WORDS, _BUDGET_WORDS, _PREMIUM_WORDS)
    q1, q2 = _P_QUANTITY
    (gs_min, gs_mean), (gc_min, gc_mean) = _GAP_SEARCH_CLICK, _GAP_CLICK_CLICK
    (gk_min, gk_mean), (go_min, go_mean) = _GAP_CLICK_CART, _GAP_CHECKOUT
    seed = world.seed
    # Structured shops (ShopParams.draw): what follows a purchase, carts that bring users back, churn
    # that slows users down first, visits that pause. The classic shop takes none of these branches (and no
    # extra draws).
    shop = world.shop
    structured = shop.structured
    fav_share, follow_share, return_share = shop.favourite_share, shop.follow_share, shop.return_share
    ramp_ms = shop.churn_ramp_days * DAY_MS
    complement = world.complement
    break_share, defer_share = shop.break_share, shop.defer_share
    break_mean_ms = shop.break_minutes * 60_000
    gc_mean *= shop.dwell_scale  # the classic shop's scale is 1: the same draws, the same log
    # The visit a user is in the middle of: (category, items carted and not yet checked out), set when a
    # session ends in a break; None when the last session ended the visit.
    visit: list[tuple[int, list[int]] | None] = [None] * world.n_users
    bought_category = [-1] * world.n_users  # category of the user's last purchase session, -1: none
    abandoned: list[tuple[int, int] | None] = [None] * world.n_users  # (category, item) carted, not bought
    # Replenishers (ShopParams.replenish_share): when each one's staple next falls due, and a stream of their own for
    # the rebuys' draws. Without replenishers no branch below is taken and no draw made: the log is what it was.
    staple, cycle_ms = world.staple, world.cycle_ms
    next_due = [ts if staple[u] is not None else None for u, ts in enumerate(world.first_due_ts)]
    replenishing = any(due is not None for due in next_due)
    rebuy_rnd = random.Random(int.from_bytes(seed_sequence(world.seed, 12).generate_state(4, np.uint32).tobytes(),
                                             "little"))

    def slowdown(u: int, t: int) -> float:
        """1, or less for a user in the days before going quiet (sessions farther apart, fewer purchases)."""
        if not ramp_ms or t <= quiet_after[u] - ramp_ms:
            return 1.0
        return max(0.2, (quiet_after[u] - t) / ramp_ms)

    def query(u: int, c: int) -> str:
        ph = phrases[c]
        text = ph[int(r() * len(ph))]
        x = r()
        if x < 0.35:  # price word, where the user has a price preference
            words = word_lists[price_words[u]]
        elif x < 0.75:
            words = _NEUTRAL_WORDS
        else:
            return text
        return f"{words[int(r() * len(words))]} {text}"

    def plan_rebuy(u: int, t: int) -> list[dict]:
        """A replenisher's visit straight to the staple: click, cart, buy (events in reverse order); the next rebuy
        falls due one cycle later (jittered, stretched for a user slowing down before going quiet)."""
        c, i = staple[u]
        ids, prices, _, _ = tables[c][tiers[u]]
        out = [{"event_id": None, "user_id": user_ids[u], "type": "click", "ts": t, "item_id": ids[i],
                "category": categories[c], "price": prices[i]}]
        for kind in ("add_to_cart", "purchase"):
            t += gk_min + int(-log(1.0 - rebuy_rnd.random()) * gk_mean)
            out.append({"event_id": None, "user_id": user_ids[u], "type": kind, "ts": t, "item_id": ids[i],
                        "category": categories[c], "price": prices[i]})
        out[-1]["quantity"] = 1 + int(rebuy_rnd.random() < 0.3)
        bought_category[u] = c
        next_due[u] = t + int(cycle_ms[u] * math.exp(rebuy_rnd.gauss(0.0, REPLENISH_JITTER)) / slowdown(u, t))
        if t > quiet_after[u]:
            out = [e for e in out if e["ts"] <= quiet_after[u]]
        out.reverse()
        return out

    def plan_session(u: int, t: int) -> list[dict]:
        """One session of user u starting at t, as events in reverse order (pop() gives the next)."""
        if replenishing and visit[u] is None and next_due[u] is not None and t >= next_due[u]:
            return plan_rebuy(u, t)
        comeback = None
        going_on = visit[u]
        visit[u] = None
        if going_on is None and structured and abandoned[u] is not None:
            if r() < return_share:
                comeback = abandoned[u]
            abandoned[u] = None
        if going_on is not None:
            c = going_on[0]
        elif comeback is not None:
            c = comeback[0]
        elif structured and bought_category[u] >= 0 and r() < follow_share:
            c = complement[bought_category[u]]
        elif r() < fav_share:
            favs = favourites[u]
            c = favs[min(bisect_right(fav_cum[u], r()), len(favs) - 1)]
        else:
            c = int(r() * n_cat)
        cat = categories[c]
        ids, prices, cum, total = tables[c][tiers[u]]
        last = len(ids) - 1
        pc = p_cart[u]
        out: list[dict] = []
        carted: list[int] = list(going_on[1]) if going_on is not None else []
        if comeback is not None:  # straight back to the carted item, into the cart again
            i = comeback[1]
            out.append({"event_id": None, "user_id": user_ids[u], "type": "click", "ts": t,
                        "item_id": ids[i], "category": cat, "price": prices[i]})
            t += gk_min + int(-log(1.0 - r()) * gk_mean)
            out.append({"event_id": None, "user_id": user_ids[u], "type": "add_to_cart", "ts": t,
                        "item_id": ids[i], "category": cat, "price": prices[i]})
            carted.append(i)
            t += gc_min + int(-log(1.0 - r()) * gc_mean)
        if r() < _P_SEARCH_FIRST:
            out.append({"event_id": None, "user_id": user_ids[u], "type": "search", "ts": t,
                        "category": cat, "query": query(u, c)})
            t += gs_min + int(-log(1.0 - r()) * gs_mean)
        n_clicks = 0
        while True:
            i = min(bisect_right(cum, r() * total), last)
            out.append({"event_id": None, "user_id": user_ids[u], "type": "click", "ts": t,
                        "item_id": ids[i], "category": cat, "price": prices[i]})
            n_clicks += 1
            if r() < pc:  # the cart only ever takes an item just clicked: the funnel holds
                t += gk_min + int(-log(1.0 - r()) * gk_mean)
                out.append({"event_id": None, "user_id": user_ids[u], "type": "add_to_cart", "ts": t,
                            "item_id": ids[i], "category": cat, "price": prices[i]})
                carted.append(i)
            if n_clicks >= _MAX_CLICKS or r() >= _P_MORE_CLICKS:
                break
            t += gc_min + int(-log(1.0 - r()) * gc_mean)
            if r() < _P_REFINE_SEARCH:
                out.append({"event_id": None, "user_id": user_ids[u], "type": "search", "ts": t,
                            "category": cat, "query": query(u, c)})
                t += gs_min + int(-log(1.0 - r()) * gs_mean)
        bought = False
        if structured and carted and r() < defer_share:  # checkout after a break, in the next session
            visit[u] = (c, carted)
            carted = []
        elif structured and r() < break_share:
            visit[u] = (c, [])
        if carted:  # checkout: buy some of what was carted, each item once
            pb = p_buy[u] * slowdown(u, t) if structured else p_buy[u]
            for k, i in enumerate(dict.fromkeys(carted)):
                if (comeback is not None and k == 0 and r() < 0.85) or r() < pb:
                    bought = True
                    t += go_min + int(-log(1.0 - r()) * go_mean)
                    x = r()
                    out.append({"event_id": None, "user_id": user_ids[u], "type": "purchase", "ts": t,
                                "item_id": ids[i], "category": cat, "price": prices[i],
                                "quantity": 1 if x < q1 else (2 if x < q2 else 3)})
        if structured:
            bought_category[u] = c if bought else -1
            if carted and not bought:
                abandoned[u] = (c, carted[-1])
        if t > quiet_after[u]:  # the user goes quiet mid-session: keep what came before
            out = [e for e in out if e["ts"] <= quiet_after[u]]
        out.reverse()
        return out

    # Heap keys are single ints, ts << shift | user: int comparisons are much
    # cheaper than tuple ones, and the order is the same as (ts, user).
    shift = max(world.n_users - 1, 1).bit_length()
    mask = (1 << shift) - 1
    heap = [(ts << shift) | u for u, ts in enumerate(world.first_session_ts) if ts <= quiet_after[u]]
    heapq.heapify(heap)
    pending: list[list[dict] | None] = [None] * world.n_users
    heapreplace, heappop = heapq.heapreplace, heapq.heappop
    n = 0
    limit = -1 if events is None else events
    while n != limit and heap:
        key = heap[0]
        u = key & mask
        plan = pending[u]
        if plan is None:
            plan = plan_session(u, key >> shift)
            if not plan:  # cannot happen with quiet checked on push, but stay safe
                heappop(heap)
                continue
        ev = plan.pop()
        ev["event_id"] = f"{seed}-{n}"
        n += 1
        if plan:
            pending[u] = plan
            heapreplace(heap, (plan[-1]["ts"] << shift) | u)
        else:
            pending[u] = None
            rate = rate_ms[u]
            if structured:
                rate *= slowdown(u, ev["ts"])
                if abandoned[u] is not None:  # a cart left behind: back within about a day, if at all
                    rate = max(rate, 1.0 / DAY_MS)
            if visit[u] is not None:  # a break in the visit: back within minutes
                nxt = ev["ts"] + 60_000 + int(-log(1.0 - r()) * break_mean_ms)
            else:
                nxt = ev["ts"] + _MIN_SESSION_GAP_MS + int(expo(rate))
                if replenishing and next_due[u] is not None:  # back for the staple when it falls due
                    nxt = min(nxt, max(next_due[u], ev["ts"] + _MIN_SESSION_GAP_MS))
            if nxt > quiet_after[u]:
                heappop(heap)  # gone quiet: never scheduled again
            else:
                heapreplace(heap, (nxt << shift) | u)
        yield ev


def _check_events(events: int | None) -> None:
    if events is not None and (isinstance(events, bool) or not isinstance(events, (int, np.integer)) or events < 0):
        raise ValueError(f"events must be None or an int >= 0, got {events!r}")


def iter_events(users: int, seed: int = 0, *, start_ts_ms: int = DEFAULT_START_TS_MS,
                events: int | None = None, span_days: float = 30.0, catalogue_seed: int = 0,
                shop: ShopParams | None = None) -> Iterator[dict]:
    """Yield events lazily in global (non-decreasing) time order.

    ``events=None`` means endless (for a live demo), at about
    ``_DEFAULT_SESSIONS_PER_DAY`` sessions per user per day; otherwise exactly
    ``events`` events, with session rates chosen so that they span about
    ``span_days``. Memory is O(users), not O(events). Quiet users stop at their
    ``quiet_after_ts`` (see ``user_truths``): in the first half of the span, or in a
    structured shop any time after its first 15% (after its arrival, for the two thirds
    of a structured shop's users who arrive along the span).
    """
    _check_events(events)
    world = World(users, seed, start_ts_ms, span_days, catalogue_seed, shop)  # validate now, not at the first next()
    events = None if events is None else int(events)
    return _run(world, _sessions_per_day(world, events), events)


def user_truths(users: int, seed: int = 0, *, start_ts_ms: int = DEFAULT_START_TS_MS,
                span_days: float = 30.0, catalogue_seed: int = 0, shop: ShopParams | None = None) -> dict[str, UserTruth]:
    """The users that ``iter_events(users, seed, ...)`` simulates, keyed by ``str(user_id)``.

    Independent of the event count: the same seed, start and span give the same truths.
    """
    return World(users, seed, start_ts_ms, span_days, catalogue_seed, shop).truths


def generate(users: int, events: int, seed: int = 0, *, start_ts_ms: int = DEFAULT_START_TS_MS,
             span_days: float = 30.0, catalogue_seed: int = 0, shop: ShopParams | None = None) -> SyntheticLog:
    """Materialise exactly ``events`` events (the stream of ``iter_events``) plus the truths."""
    if events is None:
        raise ValueError("generate needs a finite event count; use iter_events for an endless stream")
    _check_events(events)
    world = World(users, seed, start_ts_ms, span_days, catalogue_seed, shop)
    events = int(events)
    return SyntheticLog(events=list(_run(world, _sessions_per_day(world, events), events)), users=world.truths,
                        categories=list(world.categories))


def write_jsonl(events: Iterable[dict], path: str | Path) -> int:
    """Write one orjson line per event to ``path`` (gzip when it ends in ``.gz``); return the count."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    count = 0
    chunk: list[bytes] = []
    dumps = orjson.dumps
    with opener(path, "wb") as fh:
        for ev in events:
            chunk.append(dumps(ev))
            count += 1
            if len(chunk) >= 10_000:  # one write per chunk: far fewer syscalls/compress calls
                fh.write(b"\n".join(chunk) + b"\n")
                chunk.clear()
        if chunk:
            fh.write(b"\n".join(chunk) + b"\n")
    return count
