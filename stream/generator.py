"""Synthetic e-commerce traffic with real structure (sessions, funnels, tastes, churn).

Used by the demo (endless stream), by the integration tests (tens of thousands of
events) and by load runs (millions of events). Everything is deterministic given
the seed: numpy ``Generator(PCG64)`` builds the catalogue and the users, and a
``random.Random`` seeded from the same ``SeedSequence`` drives the event stream
(its scalar draws are far cheaper than numpy's per call). Python's salted
``hash()`` is never used.

The simulated world:

* **Catalogue** -- 40 readable categories (``"shoes.running"``, ...) with a base
  price each; 30-120 items per category with lognormal prices around the base
  and Zipf-like popularity. An item's category and price never change.
* **Users** -- 2-3 ordered favourite categories (about 80% of sessions go to
  them), a price level (budget users pick cheaper items, premium users pricier
  ones), a purchase habit (about 25% are habitual buyers with a high
  click -> cart -> purchase conversion), an activity rate, and about 20% who go
  quiet for good at some time in the first half of the span. About 10% of users
  have an ``int`` user id, the rest a ``str`` one.
* **Sessions** -- bursts of events seconds apart: usually a search about a
  category, clicks on items of that category (sometimes a refining search in
  between), add-to-cart of a just-clicked item, and at the end a checkout that
  buys some of the carted items. Sessions are separated by exponential gaps
  scaled by the user's activity rate.

``iter_events`` keeps a heap of ``(next_event_ts, user_index)`` (packed into one
int per user); a user's pending session (a handful of events) is planned when
the session starts and dropped when it ends, so memory is O(users), never
O(events).

Session rates follow from ``events / users / span_days`` so that a finite log
covers about ``span_days``; with few events per user the gaps between a user's
sessions are therefore days rather than hours.
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

EVENT_TYPES = ("search", "click", "add_to_cart", "purchase")

__all__ = ["EVENT_TYPES", "ShopParams", "UserTruth", "SyntheticLog", "iter_events", "user_truths", "generate", "write_jsonl"]

DAY_MS = 86_400_000
DEFAULT_START_TS_MS = 1_700_000_000_000

# (category, base price, search phrases). Base prices span three orders of
# magnitude so that spend and price-tier features have something to learn.
_CATEGORIES: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("electronics.phones", 450.0, ("phone", "smartphone", "android phone")),
    ("electronics.laptops", 900.0, ("laptop", "notebook computer", "ultrabook")),
    ("electronics.headphones", 120.0, ("headphones", "earbuds", "noise cancelling headphones")),
    ("electronics.cameras", 600.0, ("camera", "mirrorless camera", "action camera")),
    ("electronics.tv", 700.0, ("tv", "smart tv", "4k television")),
    ("electronics.gaming", 300.0, ("game console", "gaming controller", "video games")),
    ("electronics.accessories", 25.0, ("phone case", "usb cable", "charger")),
    ("computers.monitors", 250.0, ("monitor", "4k monitor", "gaming monitor")),
    ("computers.storage", 90.0, ("ssd", "external hard drive", "usb stick")),
    ("computers.peripherals", 70.0, ("keyboard", "mechanical keyboard", "wireless mouse")),
    ("shoes.running", 110.0, ("running shoes", "trail runners", "marathon trainers")),
    ("shoes.hiking", 140.0, ("hiking boots", "trekking shoes", "walking boots")),
    ("shoes.casual", 70.0, ("sneakers", "casual shoes", "canvas shoes")),
    ("shoes.formal", 130.0, ("dress shoes", "leather oxfords", "loafers")),
    ("clothing.men", 45.0, ("men shirt", "men jeans", "men jacket")),
    ("clothing.women", 50.0, ("women dress", "women blouse", "women jeans")),
    ("clothing.kids", 25.0, ("kids t-shirt", "kids jacket", "baby clothes")),
    ("clothing.outdoor", 150.0, ("rain jacket", "down jacket", "fleece")),
    ("clothing.sportswear", 40.0, ("running shorts", "sports bra", "gym leggings")),
    ("home.kitchen", 60.0, ("frying pan", "knife set", "coffee maker")),
    ("home.furniture", 350.0, ("sofa", "office chair", "bookshelf")),
    ("home.bedding", 80.0, ("duvet", "pillow", "bed sheets")),
    ("home.lighting", 55.0, ("desk lamp", "led bulbs", "floor lamp")),
    ("home.decor", 35.0, ("wall art", "vase", "picture frame")),
    ("home.appliances", 280.0, ("vacuum cleaner", "washing machine", "air purifier")),
    ("garden.tools", 45.0, ("garden hose", "pruning shears", "lawn mower")),
    ("garden.plants", 20.0, ("house plant", "seeds", "flower pots")),
    ("beauty.skincare", 30.0, ("moisturiser", "face serum", "sunscreen")),
    ("beauty.makeup", 22.0, ("lipstick", "mascara", "foundation")),
    ("beauty.fragrance", 75.0, ("perfume", "eau de toilette", "cologne")),
    ("sports.fitness", 90.0, ("dumbbells", "yoga mat", "resistance bands")),
    ("sports.cycling", 400.0, ("bike", "bike helmet", "cycling gloves")),
    ("sports.camping", 120.0, ("tent", "sleeping bag", "camping stove")),
    ("toys.building", 45.0, ("building blocks", "lego set", "construction toy")),
    ("toys.boardgames", 35.0, ("board game", "card game", "jigsaw puzzle")),
    ("books.fiction", 15.0, ("novel", "thriller book", "fantasy book")),
    ("books.cooking", 25.0, ("cookbook", "baking book", "recipe book")),
    ("grocery.coffee", 14.0, ("coffee beans", "ground coffee", "espresso capsules")),
    ("grocery.snacks", 6.0, ("snacks", "chocolate", "protein bars")),
    ("pets.supplies", 30.0, ("dog food", "cat litter", "pet bed")),
)
# Query adjectives: neutral ones for everybody, price words that match the user's price level.
_NEUTRAL_WORDS = ("red", "black", "blue", "white", "grey", "green", "new", "classic", "compact",
                  "large", "small", "popular", "best", "lightweight")
_BUDGET_WORDS = ("cheap", "budget", "affordable", "discount")
_PREMIUM_WORDS = ("premium", "luxury", "professional", "high-end")

# Catalogue shape.
_ITEMS_PER_CATEGORY = (30, 121)  # [low, high) items per category
_ITEM_PRICE_SIGMA = 0.55         # lognormal spread of item prices around the category base
_ZIPF_EXPONENT = 1.1             # item popularity within a category ~ 1 / rank**s
# Item choice is precomputed for a few price tiers (a continuous per-user level
# would need a weight table per user); each user uses the tier nearest its level.
_PRICE_TIERS = np.exp(np.linspace(math.log(0.35), math.log(2.8), 9))
_PRICE_PREF_SIGMA = 0.45         # how tightly a tier prefers prices near base * tier

# Users.
_INT_ID_FRACTION = 0.10
_INT_ID_OFFSET = 900_000
_HABITUAL_FRACTION = 0.25
_QUIET_FRACTION = 0.20
_FAVOURITE_SHARE = 0.80          # share of sessions about a favourite category
_FAVOURITE_WEIGHTS = {2: (0.65, 0.35), 3: (0.55, 0.30, 0.15)}
_ACTIVITY_SIGMA = 0.7            # lognormal spread of session rates (mean multiplier 1)
_FIRST_SESSION_WINDOW = 0.10     # every user starts within the first 10% of the span...
_QUIET_WINDOW = (0.15, 0.50)     # ...and quiet users stop between 15% and 50% of it

# Sessions. Conversion probabilities are (habitual buyer, others).
_P_SEARCH_FIRST = 0.85           # a session usually opens with a search
_P_MORE_CLICKS = 0.60            # clicks per session ~ 1 + geometric: mean 2.5
_MAX_CLICKS = 25
_P_REFINE_SEARCH = 0.15          # a new search before a further click
_P_CART = (0.40, 0.08)           # per click
_P_BUY = (0.70, 0.25)            # per carted item, at checkout
_P_QUANTITY = (0.88, 0.97)       # cumulative: quantity 1, 2, else 3
# Gaps inside a session in ms: (minimum, mean of the exponential extra). The
# minimum keeps every user's timestamps strictly increasing.
_GAP_SEARCH_CLICK = (2_000, 15_000)
_GAP_CLICK_CLICK = (3_000, 40_000)
_GAP_CLICK_CART = (1_000, 10_000)
_GAP_CHECKOUT = (5_000, 60_000)
_MIN_SESSION_GAP_MS = 10 * 60_000  # sessions never overlap
_DEFAULT_SESSIONS_PER_DAY = 3.0    # endless streams (events=None)


@dataclass(frozen=True)
class UserTruth:
    """What the generator decided about a user: the ground truth profiles should recover."""

    user_id: str | int
    favourite_categories: tuple[str, ...]  # most favourite first
    price_level: float                     # multiplier around 1.0 (budget < 1 < premium)
    habitual_buyer: bool
    goes_quiet: bool
    quiet_after_ts: int | None             # epoch ms after which the user emits nothing (None if not quiet)


@dataclass
class SyntheticLog:
    """A materialised log and the truths behind it."""

    events: list[dict]
    users: dict[str, UserTruth]  # keyed by str(user_id)
    categories: list[str]


@dataclass(frozen=True)
class ShopParams:
    """The shape of a simulated shop. The defaults are the classic shop (favourites from one popularity,
    no sequential structure); `ShopParams.draw(seed)` makes a structured shop with its own parameters,
    so a model can be trained in one shop and judged in another.

    Structure that counts cannot see (a structured shop has all of it):
      segments        users belong to segments; each segment favours its own categories (cross-user
                      structure: users like this one go on to like what the segment likes)
      follow_share    after a purchase in category c, the next session goes to c's complement
                      (phones -> accessories) with this probability: what follows a purchase
      return_share    a session that carts items but buys none brings the user back within about a
                      day to buy them, with this probability: carts not bought announce a purchase
      churn_ramp_days users who go quiet slow down over this many days before (sessions farther apart,
                      fewer purchases): churn announces itself in the rhythm
    """

    n_categories: int = len(_CATEGORIES)
    favourite_share: float = _FAVOURITE_SHARE
    habitual_fraction: float = _HABITUAL_FRACTION
    quiet_fraction: float = _QUIET_FRACTION
    activity_sigma: float = _ACTIVITY_SIGMA
    segments: int = 0
    follow_share: float = 0.0
    return_share: float = 0.0
    churn_ramp_days: float = 0.0
    shop_seed: int = 0  # which categories, segments and complements (structured shops)

    @classmethod
    def draw(cls, seed: int) -> "ShopParams":
        """A structured shop whose parameters depend on the seed."""
        rng = np.random.Generator(np.random.PCG64(_seed_sequence(seed, 7)))
        return cls(n_categories=int(rng.integers(16, len(_CATEGORIES) + 1)),
                   favourite_share=float(rng.uniform(0.55, 0.85)), habitual_fraction=float(rng.uniform(0.12, 0.4)),
                   quiet_fraction=float(rng.uniform(0.12, 0.35)), activity_sigma=float(rng.uniform(0.4, 1.0)),
                   segments=int(rng.integers(3, 9)), follow_share=float(rng.uniform(0.25, 0.55)),
                   return_share=float(rng.uniform(0.3, 0.7)), churn_ramp_days=float(rng.uniform(8.0, 20.0)),
                   shop_seed=int(seed))


def _seed_sequence(seed: int, stream: int) -> np.random.SeedSequence:
    # Independent streams for catalogue, users and events: changing how many
    # draws one of them makes never shifts the others.
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, stream])


class _World:
    """Catalogue, users and per-user lookup tables, as plain Python lists for speed."""

    def __init__(self, users: int, seed: int, start_ts_ms: int, span_days: float, catalogue_seed: int = 0,
                 shop: ShopParams | None = None) -> None:
        if isinstance(users, bool) or not isinstance(users, (int, np.integer)) or users < 1:
            raise ValueError(f"users must be a positive int, got {users!r}")
        if not (isinstance(span_days, (int, float)) and math.isfinite(span_days) and span_days > 0):
            raise ValueError(f"span_days must be a positive number, got {span_days!r}")
        self.n_users = int(users)
        self.seed = int(seed)
        self.start_ts_ms = int(start_ts_ms)
        self.span_ms = span_days * DAY_MS
        self.shop = shop or ShopParams()
        # The catalogue has its own seed: logs of different seeds are different users and behaviour
        # in the same shop, as a model trained last month meets this month's traffic.
        self._build_catalogue(np.random.Generator(np.random.PCG64(_seed_sequence(catalogue_seed, 0))))
        self._build_users(np.random.Generator(np.random.PCG64(_seed_sequence(seed, 1))))

    def _build_catalogue(self, rng: np.random.Generator) -> None:
        shop = self.shop
        chosen = list(_CATEGORIES)
        if shop.n_categories < len(_CATEGORIES):  # a smaller shop: its own subset of the categories
            pick = np.random.Generator(np.random.PCG64(_seed_sequence(shop.shop_seed, 8))).permutation(len(chosen))
            chosen = [chosen[i] for i in sorted(pick[:shop.n_categories].tolist())]
        self.categories = [name for name, _, _ in chosen]
        self.base_price = [base for _, base, _ in chosen]
        self.phrases = [phrases for _, _, phrases in chosen]
        # Each category's complement (what is bought after it): a fixed random pairing of the shop.
        shop_rng = np.random.Generator(np.random.PCG64(_seed_sequence(shop.shop_seed, 9)))
        n = len(chosen)
        self.complement = ((np.arange(n) + 1 + shop_rng.integers(0, max(n - 1, 1), n)) % n).tolist()
        # tables[category][tier] = (item ids, prices, cumulative weights, total weight)
        self.tables: list[list[tuple[list[str], list[float], list[float], float]]] = []
        next_item = 0
        for base in self.base_price:
            n = int(rng.integers(*_ITEMS_PER_CATEGORY))
            ids = [f"i{next_item + k:06d}" for k in range(n)]
            next_item += n
            prices = np.maximum(np.round(rng.lognormal(math.log(base), _ITEM_PRICE_SIGMA, n), 2), 0.5)
            # Popularity independent of price: ranks are a random permutation.
            popularity = 1.0 / (rng.permutation(n) + 1.0) ** _ZIPF_EXPONENT
            per_tier = []
            for tier in _PRICE_TIERS:
                z = (np.log(prices) - math.log(base * tier)) / _PRICE_PREF_SIGMA
                cum = np.cumsum(popularity * np.exp(-0.5 * z * z))
                per_tier.append((ids, prices.tolist(), cum.tolist(), float(cum[-1])))
            self.tables.append(per_tier)

    def _build_users(self, rng: np.random.Generator) -> None:
        n, n_cat = self.n_users, len(self.categories)
        # Draw every array in one fixed order so that truths never depend on the event count.
        shop = self.shop
        int_ids = rng.random(n) < _INT_ID_FRACTION
        n_favs = rng.integers(2, 4, n)
        # Weighted sampling without replacement, vectorised (Gumbel top-k): some
        # categories are favourites far more often than others.
        cat_pop = rng.dirichlet(np.full(n_cat, 2.0))
        keys = np.log(cat_pop)[None, :] + rng.gumbel(size=(n, n_cat))
        if shop.segments:  # each segment concentrates on its own categories
            seg_rng = np.random.Generator(np.random.PCG64(_seed_sequence(self.seed, 10)))
            segment_pop = seg_rng.dirichlet(np.full(n_cat, 0.3), size=shop.segments)
            self.segment = seg_rng.integers(0, shop.segments, n)
            keys = np.log(segment_pop[self.segment] + 1e-12) + seg_rng.gumbel(size=(n, n_cat))
        else:
            self.segment = np.zeros(n, dtype=np.int64)
        top3 = np.argpartition(-keys, 3, axis=1)[:, :3]
        top3 = np.take_along_axis(top3, np.argsort(-np.take_along_axis(keys, top3, axis=1), axis=1), axis=1)
        price_level = np.clip(rng.lognormal(0.0, 0.4, n), 0.35, 2.8)
        habitual = rng.random(n) < shop.habitual_fraction
        activity = rng.lognormal(-0.5 * shop.activity_sigma**2, shop.activity_sigma, n)
        first = rng.random(n) * (_FIRST_SESSION_WINDOW * self.span_ms)
        quiet = rng.random(n) < shop.quiet_fraction
        quiet_at = rng.uniform(*_QUIET_WINDOW, n) * self.span_ms
        if quiet.all():
            quiet[0] = False  # someone must stay, or an endless stream would end

        self.user_ids: list[str | int] = [_INT_ID_OFFSET + i if int_ids[i] else f"u{i:06d}" for i in range(n)]
        self.activity = activity
        self.first_session_ts = (self.start_ts_ms + first.astype(np.int64)).tolist()
        quiet_ts = self.start_ts_ms + quiet_at.astype(np.int64)
        self.quiet_after = np.where(quiet, quiet_ts, np.iinfo(np.int64).max).tolist()
        self.habitual = habitual.tolist()
        self.p_cart = np.where(habitual, _P_CART[0], _P_CART[1]).tolist()
        self.p_buy = np.where(habitual, _P_BUY[0], _P_BUY[1]).tolist()
        self.tier = np.abs(np.log(price_level)[:, None] - np.log(_PRICE_TIERS)[None, :]).argmin(axis=1).tolist()
        # 0 neutral, 1 budget, 2 premium: which price words the user's searches may use.
        self.price_words = np.select([price_level < 0.7, price_level > 1.45], [1, 2], 0).tolist()
        self.favourites: list[tuple[int, ...]] = []
        self.fav_cum: list[tuple[float, ...]] = []
        cum_by_k = {k: tuple(np.cumsum(w).tolist()) for k, w in _FAVOURITE_WEIGHTS.items()}
        truths: dict[str, UserTruth] = {}
        cats = self.categories
        for i, (uid, k, row) in enumerate(zip(self.user_ids, n_favs.tolist(), top3.tolist())):
            favs = tuple(row[:k])
            self.favourites.append(favs)
            self.fav_cum.append(cum_by_k[k])
            truths[str(uid)] = UserTruth(
                user_id=uid,
                favourite_categories=tuple(cats[c] for c in favs),
                price_level=round(float(price_level[i]), 4),
                habitual_buyer=bool(habitual[i]),
                goes_quiet=bool(quiet[i]),
                quiet_after_ts=int(quiet_ts[i]) if quiet[i] else None,
            )
        self.truths = truths

    def expected_events_per_session(self) -> np.ndarray:
        """Mean events in one (uncut) session of each user, from the session model."""
        p_cart = np.asarray(self.p_cart)
        p_buy = np.asarray(self.p_buy)
        clicks = (1 - _P_MORE_CLICKS ** _MAX_CLICKS) / (1 - _P_MORE_CLICKS)
        searches = _P_SEARCH_FIRST + (clicks - 1) * _P_REFINE_SEARCH
        return searches + clicks * (1 + p_cart + p_cart * p_buy)

    def sessions_per_day(self, events: int | None) -> np.ndarray:
        """Each user's session rate (per day), calibrated so `events` events span about span_days.

        Expected events = sum over users of E[events/session] * (1 + active / period),
        with period = 1 / rate + (minimum gap + session length). Monotone in the
        base rate, so a bisection in log space finds it.
        """
        if events is None:
            return _DEFAULT_SESSIONS_PER_DAY * self.activity
        per_session = self.expected_events_per_session()
        first = np.asarray(self.first_session_ts, dtype=np.float64) - self.start_ts_ms
        end = np.minimum(np.asarray(self.quiet_after, dtype=np.float64) - self.start_ts_ms, self.span_ms)
        active_days = np.maximum(end - first, 0.0) / DAY_MS
        overhead_days = (_MIN_SESSION_GAP_MS + 4 * 60_000) / DAY_MS  # gap floor + a typical session

        def expected(base: float) -> float:
            period = 1.0 / (base * self.activity) + overhead_days
            return float(np.sum(per_session * (1.0 + active_days / period)))

        lo, hi = math.log(1e-9), math.log(1e6)
        if expected(math.exp(lo)) >= events:  # even one session per user is more than asked for
            return math.exp(lo) * self.activity
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if expected(math.exp(mid)) < events else (lo, mid)
        return math.exp(0.5 * (lo + hi)) * self.activity


def _run(world: _World, events: int | None) -> Iterator[dict]:
    """The event loop: pop the user with the earliest pending event, emit it, push its next one."""
    rnd = random.Random(int.from_bytes(_seed_sequence(world.seed, 2).generate_state(4, np.uint32).tobytes(), "little"))
    r = rnd.random
    expo = rnd.expovariate
    log = math.log
    categories, tables, phrases = world.categories, world.tables, world.phrases
    n_cat = len(categories)
    user_ids, favourites, fav_cum, tiers = world.user_ids, world.favourites, world.fav_cum, world.tier
    price_words, p_cart, p_buy, quiet_after = world.price_words, world.p_cart, world.p_buy, world.quiet_after
    # Session rate per ms (expovariate takes the rate, i.e. 1 / mean gap).
    rate_ms = (world.sessions_per_day(events) / DAY_MS).tolist()
    word_lists = (_NEUTRAL_WORDS, _BUDGET_WORDS, _PREMIUM_WORDS)
    q1, q2 = _P_QUANTITY
    (gs_min, gs_mean), (gc_min, gc_mean) = _GAP_SEARCH_CLICK, _GAP_CLICK_CLICK
    (gk_min, gk_mean), (go_min, go_mean) = _GAP_CLICK_CART, _GAP_CHECKOUT
    seed = world.seed
    # Structured shops (ShopParams.draw): what follows a purchase, carts that bring users back, churn
    # that slows users down first. The classic shop takes none of these branches (and no extra draws).
    shop = world.shop
    structured = shop.follow_share > 0 or shop.return_share > 0 or shop.churn_ramp_days > 0
    fav_share, follow_share, return_share = shop.favourite_share, shop.follow_share, shop.return_share
    ramp_ms = shop.churn_ramp_days * DAY_MS
    complement = world.complement
    bought_category = [-1] * world.n_users  # category of the user's last purchase session, -1: none
    abandoned: list[tuple[int, int] | None] = [None] * world.n_users  # (category, item) carted, not bought

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

    def plan_session(u: int, t: int) -> list[dict]:
        """One session of user u starting at t, as events in reverse order (pop() gives the next)."""
        comeback = None
        if structured and abandoned[u] is not None:
            if r() < return_share:
                comeback = abandoned[u]
            abandoned[u] = None
        if comeback is not None:
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
        carted: list[int] = []
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
            nxt = ev["ts"] + _MIN_SESSION_GAP_MS + int(expo(rate))
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
    ``quiet_after_ts`` (see ``user_truths``) in the first half of the span.
    """
    _check_events(events)
    world = _World(users, seed, start_ts_ms, span_days, catalogue_seed, shop)  # validate now, not at the first next()
    return _run(world, None if events is None else int(events))


def user_truths(users: int, seed: int = 0, *, start_ts_ms: int = DEFAULT_START_TS_MS,
                span_days: float = 30.0, catalogue_seed: int = 0, shop: ShopParams | None = None) -> dict[str, UserTruth]:
    """The users that ``iter_events(users, seed, ...)`` simulates, keyed by ``str(user_id)``.

    Independent of the event count: the same seed, start and span give the same truths.
    """
    return _World(users, seed, start_ts_ms, span_days, catalogue_seed, shop).truths


def generate(users: int, events: int, seed: int = 0, *, start_ts_ms: int = DEFAULT_START_TS_MS,
             span_days: float = 30.0, catalogue_seed: int = 0, shop: ShopParams | None = None) -> SyntheticLog:
    """Materialise exactly ``events`` events (the stream of ``iter_events``) plus the truths."""
    if events is None:
        raise ValueError("generate needs a finite event count; use iter_events for an endless stream")
    _check_events(events)
    world = _World(users, seed, start_ts_ms, span_days, catalogue_seed, shop)
    return SyntheticLog(events=list(_run(world, int(events))), users=world.truths,
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
