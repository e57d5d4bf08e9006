"""The simulated shop behind the synthetic traffic: its catalogue and its users, and what was decided
about each user (the truth that profiles should recover).

* **Catalogue** -- 40 readable categories (``"shoes.running"``, ...) with a base
  price each; 30-120 items per category with lognormal prices around the base
  and Zipf-like popularity. An item's category and price never change.
* **Users** -- 2-3 ordered favourite categories (about 80% of sessions go to
  them), a price level (budget users pick cheaper items, premium users pricier
  ones), a purchase habit (about 25% are habitual buyers with a high
  click -> cart -> purchase conversion), an activity rate, and about 20% who go
  quiet for good at some time in the first half of the span (a structured shop: at any time after
  the first 15%, see ShopParams.quiet_until). About 10% of users
  have an ``int`` user id, the rest a ``str`` one.

`ShopParams` is the shape of a shop (the classic one by default, or a structured one drawn from a
seed); `World` builds its catalogue and users as plain Python lists, which the event loop of
`stream.generator` reads. Everything is deterministic given the seeds: numpy ``Generator(PCG64)``
on independent ``SeedSequence`` streams (`seed_sequence`). Python's salted ``hash()`` is never used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DAY_MS", "DEFAULT_START_TS_MS", "ShopParams", "UserTruth", "World", "seed_sequence"]

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
_ARRIVING_SHARE = 2 / 3          # in a structured shop this share arrives along the span instead...
_ARRIVAL_WINDOW = 0.90           # ...uniformly within its first 90%
_P_CART = (0.40, 0.08)           # per click (habitual buyer, others)
_P_BUY = (0.70, 0.25)            # per carted item, at checkout (habitual buyer, others)
_REPLENISH_DAYS = (7.0, 35.0)    # a replenisher's cycle: uniform in days
REPLENISH_JITTER = 0.15         # lognormal spread of each cycle around the user's own


@dataclass(frozen=True)
class UserTruth:
    """What the generator decided about a user: the ground truth profiles should recover."""

    user_id: str | int
    favourite_categories: tuple[str, ...]  # most favourite first
    price_level: float                     # multiplier around 1.0 (budget < 1 < premium)
    habitual_buyer: bool
    goes_quiet: bool
    quiet_after_ts: int | None             # epoch ms after which the user emits nothing (None if not quiet)
    replenish_cycle_days: float | None = None  # the staple's rebuy cycle (None: not a replenisher)


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
      quiet_until     quiet users stop between 15% of the span and this share of it: in a structured
                      shop, all along (1.0), so a cut late in the log still finds users slowing down
                      before they stop (the classic shop: by half the span)
    and, not a parameter: two thirds of a structured shop's users arrive along the span (the others are
    customers already, at its start, as every classic shop's user is: World._arrivals), so that a cut finds
    users who have just come as well as users of long standing.

    Visits as real logs show them (REES46, Taobao: a tenth to half of a user's gaps are breaks of 3 to 60
    minutes; carts bought minutes to an hour after they were filled), not only bursts days apart:
      break_share     a session ends in a break, not a goodbye: the next session of the visit follows
                      after break_minutes (exponential mean, one minute at least), in the same category
      break_minutes   the mean of those breaks
      defer_share     a session with a full cart leaves its checkout to the next session of the visit,
                      after a break: carts pending announce a purchase within the hour
      dwell_scale     a multiplier on the mean time between clicks (40 s in the classic shop)

    Purchase rhythms (not drawn with a shop: `profiles generate --replenish-share`, 0 by default, so a shop's
    logs stay what they were without it):
      replenish_share this share of users rebuys a staple (a popular item of their favourite category) on a
                      cycle of their own, 7 to 35 days with 15% jitter, in a short visit straight to it; a user
                      going quiet stretches the cycle (churn_ramp_days). The next order falls due when the
                      user's own cycle runs out: no count, recency or share says when
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
    quiet_until: float = _QUIET_WINDOW[1]  # quiet users stop between 15% of the span and this share of it
    break_share: float = 0.0
    break_minutes: float = 0.0
    defer_share: float = 0.0
    dwell_scale: float = 1.0
    replenish_share: float = 0.0
    shop_seed: int = 0  # which categories, segments and complements (structured shops)

    @property
    def structured(self) -> bool:
        """Whether visits follow purchases, come back for carts, pause, or slow down before going quiet."""
        return (self.follow_share > 0 or self.return_share > 0 or self.churn_ramp_days > 0
                or self.break_share > 0 or self.defer_share > 0)

    @classmethod
    def of_seed(cls, seed: int | None) -> "ShopParams | None":
        """The shop `--shop-seed` names: draw(seed), or None (the classic shop) where no seed is given."""
        return None if seed is None else cls.draw(seed)

    @classmethod
    def draw(cls, seed: int) -> "ShopParams":
        """A structured shop whose parameters depend on the seed."""
        rng = np.random.Generator(np.random.PCG64(seed_sequence(seed, 7)))
        # The visit parameters are drawn after the others, so that every earlier parameter of a seed's
        # shop is what it was before visits had breaks.
        first = dict(n_categories=int(rng.integers(16, len(_CATEGORIES) + 1)),
                     favourite_share=float(rng.uniform(0.55, 0.85)), habitual_fraction=float(rng.uniform(0.12, 0.4)),
                     quiet_fraction=float(rng.uniform(0.12, 0.35)), activity_sigma=float(rng.uniform(0.4, 1.0)),
                     segments=int(rng.integers(3, 9)), follow_share=float(rng.uniform(0.25, 0.55)),
                     return_share=float(rng.uniform(0.3, 0.7)), churn_ramp_days=float(rng.uniform(8.0, 20.0)))
        return cls(**first, quiet_until=1.0, break_share=float(rng.uniform(0.15, 0.5)),
                   break_minutes=float(rng.uniform(5.0, 40.0)), defer_share=float(rng.uniform(0.2, 0.6)),
                   dwell_scale=float(rng.uniform(1.0, 5.0)), shop_seed=int(seed))


def seed_sequence(seed: int, stream: int) -> np.random.SeedSequence:
    """The seed sequence of one of a seed's independent streams (catalogue, users, events, shops...)."""
    # Independent streams for catalogue, users and events: changing how many
    # draws one of them makes never shifts the others.
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return np.random.SeedSequence([int(seed) & 0xFFFF_FFFF_FFFF_FFFF, stream])


class World:
    """Catalogue, users and per-user lookup tables, as plain Python lists for speed (the event loop reads
    them one scalar at a time)."""

    def __init__(self, users: int, seed: int, start_ts_ms: int, span_days: float, catalogue_seed: int = 0,
                 shop: ShopParams | None = None) -> None:
        if isinstance(users, bool) or not isinstance(users, (int, np.integer)) or users < 1:
            raise ValueError(f"users must be a positive int, got {users!r}")
        if not (isinstance(span_days, (int, float)) and math.isfinite(span_days) and span_days > 0):
            raise ValueError(f"span_days must be a positive number, got {span_days!r}")
        self.n_users = int(users)
        self.seed = int(seed)
        self.catalogue_seed = int(catalogue_seed)
        self.start_ts_ms = int(start_ts_ms)
        self.span_ms = span_days * DAY_MS
        self.shop = shop or ShopParams()
        # The catalogue has its own seed: logs of different seeds are different users and behaviour
        # in the same shop, as a model trained last month meets this month's traffic.
        self._build_catalogue(np.random.Generator(np.random.PCG64(seed_sequence(catalogue_seed, 0))))
        self._build_users(np.random.Generator(np.random.PCG64(seed_sequence(seed, 1))))

    def _build_catalogue(self, rng: np.random.Generator) -> None:
        shop = self.shop
        chosen = list(_CATEGORIES)
        if shop.n_categories < len(_CATEGORIES):  # a smaller shop: its own subset of the categories
            pick = np.random.Generator(np.random.PCG64(seed_sequence(shop.shop_seed, 8))).permutation(len(chosen))
            chosen = [chosen[i] for i in sorted(pick[:shop.n_categories].tolist())]
        self.categories = [name for name, _, _ in chosen]
        self.base_price = [base for _, base, _ in chosen]
        self.phrases = [phrases for _, _, phrases in chosen]
        # Each category's complement (what is bought after it): a fixed random pairing of the shop.
        shop_rng = np.random.Generator(np.random.PCG64(seed_sequence(shop.shop_seed, 9)))
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
            seg_rng = np.random.Generator(np.random.PCG64(seed_sequence(self.seed, 10)))
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
        quiet_at = rng.uniform(_QUIET_WINDOW[0], shop.quiet_until, n) * self.span_ms
        if quiet.all():
            quiet[0] = False  # someone must stay, or an endless stream would end
        if shop.structured:
            first, quiet_at = self._arrivals(first, quiet_at)

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
        self._build_replenishers(first)

    def _arrivals(self, first: np.ndarray, quiet_at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A structured shop's first visits and quiet points (ms into the span) with _ARRIVING_SHARE of its users
        arriving along the span, the others customers already (a first visit in its first 10%). An arriving user
        that goes quiet does so as far into the rest of the span, from its arrival, as the drawn point was into all
        of it. Drawn from a stream of their own: every other draw is what it was.

        Why: with every user's first visit in the span's first 10%, a structured log with few events per user was
        its first days' burst and a trickle (shop 3's default log: 68% of its events in its first 3 days of 30), and
        at a cut most users had been idle for weeks. Real logs keep meeting new users."""
        n, span = self.n_users, self.span_ms
        rng = np.random.Generator(np.random.PCG64(seed_sequence(self.seed, 13)))
        arriving = rng.random(n) < _ARRIVING_SHARE
        arrived = np.where(arriving, rng.random(n) * (_ARRIVAL_WINDOW * span), first)
        return arrived, np.where(arriving, arrived + quiet_at / span * (span - arrived), quiet_at)

    def _build_replenishers(self, first: np.ndarray) -> None:
        """Replenishers (ShopParams.replenish_share): the staple (category, item index in the user's price tier's
        table), the cycle in ms and when the first rebuy falls due; None / 0 for other users. Drawn from a stream of
        their own, and only where the share is above 0: without replenishers every other draw is what it was."""
        n = self.n_users
        self.staple: list[tuple[int, int] | None] = [None] * n
        self.cycle_ms = [0] * n
        self.first_due_ts = [0] * n
        if self.shop.replenish_share <= 0:
            return
        rng = np.random.Generator(np.random.PCG64(seed_sequence(self.seed, 11)))
        chosen = rng.random(n) < self.shop.replenish_share
        cycle_days = rng.uniform(*_REPLENISH_DAYS, n)
        phase = rng.random(n)
        pick = rng.random(n)
        for u in np.flatnonzero(chosen).tolist():
            c = self.favourites[u][0]
            _, _, cum, total = self.tables[c][self.tier[u]]
            item = min(int(np.searchsorted(cum, pick[u] * total, side="right")), len(cum) - 1)
            cycle = float(cycle_days[u]) * DAY_MS
            self.staple[u] = (c, item)
            self.cycle_ms[u] = int(cycle)
            # The first rebuy within one cycle of the user's first visit.
            self.first_due_ts[u] = self.start_ts_ms + int(first[u] + phase[u] * cycle)
            uid = str(self.user_ids[u])
            self.truths[uid] = dataclasses.replace(self.truths[uid],
                                                   replenish_cycle_days=round(float(cycle_days[u]), 3))
