"""Exact per-user behaviour statistics: what the counting baselines know, kept as state.

A user's profile heads read these beside the GRU state, so a learned field starts from what a
SQL aggregate would publish (a user's own decayed category counts, recency, frequency, purchase
share, carts not bought, the user's visit rhythm) and the sequence model only has to add what
counts cannot see. Counters are much easier to keep than to re-learn from a hidden state.

Every statistic is updated in the batch step for all touched users at once (numpy, no loop over
users or events) and lives in the state table's host columns, so the changelog, snapshots and
restores carry it like the other counters.

Decayed masses are kept "as of the user's last event": a mass m with time scale tau read at a
clock `now` is m * exp(-(now - last_ts) / tau). An update decays the stored mass to the user's new
last event and adds exp(-(last - t) / tau) for each new event at t, so the result does not depend
on how the events were cut into batches (up to float rounding).

Category slots: the user's latest category and the K - 1 others with the most 30-day mass; a category that
falls out of the K loses its mass (a bounded sketch of the user's category counts, exact while a user has at
most K).
"""

from __future__ import annotations

import numpy as np

from stream.events import ADD_TO_CART, PURCHASE, SEARCH
from stream.habit import HABIT_COLUMNS, update_habit

# 6 x (4-byte key + 3 float32 masses + 2 uint16 counts): 120 bytes; the whole model state stays under 512 bytes.
CATEGORY_SLOTS = 6
# Of them, after the latest category's, this many go to the user's freshest other categories (by day mass), the rest
# to those with most 30-day mass: where interests move on, the categories met in the last days come next and their
# month's mass is still small (session 51; docs/model-journal.md).
FRESH_SLOTS = 3
HOUR_MS = 3_600_000.0
MINUTE_MS = 60_000.0
DAY_MS = 24 * HOUR_MS
# Time scales of the decayed masses.
SLOT_TAUS_MS = (HOUR_MS, DAY_MS, 30 * DAY_MS)  # per category slot (the session, the day, the month), plus two counts
# A slot's statistics side by side (_slot_stats): its masses, then its counts.
MASS_1D, MASS_30D, COUNT, VISITS = (len(SLOT_TAUS_MS) - 2, len(SLOT_TAUS_MS) - 1, len(SLOT_TAUS_MS),
                                    len(SLOT_TAUS_MS) + 1)
COUNT_MAX = np.iinfo(np.uint16).max  # a category's counts stop at 65,535 (log 11.1: the rankings do not move)
ACTIVITY_TAUS_MS = (DAY_MS, 7 * DAY_MS, 30 * DAY_MS)  # events
PURCHASE_TAUS_MS = (7 * DAY_MS, 30 * DAY_MS)  # purchases
SESSION_GAP_MS = 30 * 60_000  # a new session starts after this long without events
GAP_RATES = (0.5, 0.1)  # exponential averages of log inter-session (and inter-order) gaps: the recent and usual rhythm
# A purchase more than this after the user's previous one opens an order: a basket bought line by line, or in two
# visits of one day, is one order. The purchase rhythm is of orders (a replenishing user's 3-week cycle, an account's
# weekly order), which the visit rhythm and the purchase counts do not show.
ORDER_GAP_MS = 12 * HOUR_MS
STEP_MIN_MS = 1_000.0  # a visit's gaps count from a second (same-second events: logs in seconds have many)

# Host columns of the state: name -> (dtype, trailing shape, initial value). See state.COLUMNS.
STAT_COLUMNS: dict[str, tuple[type, tuple[int, ...], float]] = {
    "cat_key": (np.uint32, (CATEGORY_SLOTS,), 0),  # category key of each slot (models.features); 0 = empty
    "cat_mass": (np.float32, (CATEGORY_SLOTS, len(SLOT_TAUS_MS)), 0.0),  # decayed masses
    # All-time events and visits (_visit_starts) of each slot's category, saturating at COUNT_MAX.
    "cat_count": (np.uint16, (CATEGORY_SLOTS, 2), 0),
    "last_category": (np.uint32, (), 0),  # key of the latest event's category that had one
    "last_purchase_ts": (np.int64, (), -1),
    "last_cart_ts": (np.int64, (), -1),
    "carts_pending": (np.int32, (), 0),  # add-to-carts since the user's last purchase
    "activity_mass": (np.float32, (len(ACTIVITY_TAUS_MS),), 0.0),
    "purchase_mass": (np.float32, (len(PURCHASE_TAUS_MS),), 0.0),
    "sessions": (np.int32, (), 0),
    "session_gap": (np.float32, (len(GAP_RATES),), 0.0),  # biased averages; see user_features
    # Sum of the log minutes of the gaps between the user's events within a visit (each at least STEP_MIN_MS):
    # the user's part of the shop's pace (stream/tempo.py), which the heads read idle time against.
    "step_log_minutes": (np.float32, (), 0.0),
    # The user's part of what follows a purchase in this shop (stream/follow.py): the key of the latest
    # purchase's category, and of the first other category engaged with after it (0: none yet).
    "purchase_category": (np.uint32, (), 0),
    "follow_category": (np.uint32, (), 0),
    # Purchase rhythm: orders (ORDER_GAP_MS) and two averages of the log gaps between them, as for sessions.
    "orders": (np.int32, (), 0),
    "order_gap": (np.float32, (len(GAP_RATES),), 0.0),
    # The user's latest visit (events since its latest session opened): how many events, how many of them searches.
    # A visit of searches without clicks is what a user who cannot find what it came for leaves (churn_risk).
    "visit_events": (np.uint16, (), 0),
    "visit_searches": (np.uint16, (), 0),
    # Whether the user came back to its latest category or to its most engaged-with one, week by week
    # (stream/habit.py): the shop's habit, which top_categories leans on.
    **HABIT_COLUMNS,
}

# The columns of the latest visit (changelog format 10): a record of an earlier format restores them as 0.
VISIT_COLUMNS = ("visit_events", "visit_searches")

# The per-user features, in this order (user_features builds them): the heads read the leading HEAD_FEATURES, the
# stream's own fits (models/stream_calibration.py) any of them.
# Times since (idle, the last purchase, the last cart) are log1p of minutes: resolved within a session (a cart
# 2 minutes ago is not one 20 minutes ago; log1p of hours put both near 0) and still spanning years.
USER_FEATURES = (
    "log_idle_minutes", "log_events", "purchase_share", "log_purchases", "has_purchase",
    "log_minutes_since_purchase", "log_carts_pending", "log_minutes_since_cart", "has_cart", "cart_share",
    "log_activity_1d", "log_activity_7d", "log_activity_30d", "log_purchases_7d", "log_purchases_30d",
    "log_sessions", "recent_gap", "usual_gap", "has_gap", "idle_vs_usual_gap",
    # The purchase rhythm (checkpoint format 17): orders, the recent and usual log1p hours between them, the time
    # since the latest purchase against the usual gap (log1p hours; 0 without a rhythm), and how due the next order
    # is, exp(-|that|) - 1/2: +1/2 when the usual gap has just run out, towards -1/2 far before or after it, and 0
    # (as unknown as halfway) for a user with fewer than two orders. A user who reorders every 3 weeks is likeliest
    # to buy when the 3 weeks run out: no count, recency or share says so (an independent replenishment world:
    # "carts not bought" ROC AUC 0.64, the order due rule 0.82; docs/model.md).
    "log_orders", "recent_order_gap", "usual_order_gap", "has_order_gap", "since_purchase_vs_usual_order_gap",
    "order_due",
    # Read by the stream's own fits alone (models/stream_calibration.py), never by the heads (HEAD_FEATURES): the
    # searches' share of the user's latest visit. A visit of search after search with hardly a click is how some
    # users who cannot find what they came for leave (an independent world: days idle and the week's activity rank
    # its next two weeks' churn at ROC AUC 0.72, with the latest visit's share 0.77), where in another shop searches
    # mean something else: heads fitted there with it ranked the project's shops' buyers and churners worse
    # (docs/model-journal.md, session 66). The serving shop's own outcomes weigh it, where they hold out of time.
    "visit_search_share",
)
# How many of USER_FEATURES (the leading ones) the heads read.
HEAD_FEATURES = USER_FEATURES.index("visit_search_share")
# The per-slot features of the repeat distribution, in this order.
SLOT_FEATURES = ("log_mass_1h", "log_mass_1d", "log_mass_30d", "log_count", "share", "is_last",
                 # P(this category | the category of the user's latest purchase) among this shop's users'
                 # follow-ups (stream/follow.py); the same faded by the time since that purchase; and, while the
                 # user has not gone on to another category since it (the follow-up still to come), the share
                 # again (heads before checkpoint format 12: relative to the most frequent follow-up's, 1 for it).
                 "follow_share", "follow_fresh", "follow_pending",
                 # Visits: how many times the user came to the category (a run of its events, see
                 # _visit_starts), and their share. One long browse counts once: a preference, not a session's length.
                 "log_visits", "visit_share",
                 # How many of the shop's other users hold the category, relative to its most held one
                 # (stream/popularity.py).
                 "shop_popularity",
                 # How recently the user last engaged with the category (_freshness): 1 now, 0 a year ago or more.
                 "freshness",
                 # The freshness again, times how far this shop's users come back to their latest categories rather
                 # than their usual ones (stream/habit.py, ShopHabit.recency_lean: 0 in most shops). Its weight is
                 # set, not fitted (models/field_heads.py HABIT_RECENCY_WEIGHT): one shop cannot teach it.
                 "habit_freshness",
                 # Its mirror (session 52): log_count times how far this shop's users come back to the categories
                 # they engaged with most rather than their latest ones (ShopHabit.counts_lean: 0 in most shops);
                 # weight set as well (HABIT_COUNTS_WEIGHT).
                 "habit_count")
# A year of minutes on a log scale: freshness 0.5 is half a day old, 0.3 a week, 0.19 a month.
FRESHNESS_LOG_MINUTES = float(np.log1p(365 * DAY_MS / MINUTE_MS))


def update(columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray, ts: np.ndarray,
           type_idx: np.ndarray, category: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
           gap_ms: np.ndarray, first_ever: np.ndarray, old_last_ts: np.ndarray) -> None:
    """Advance the statistics of the users `rows` (U,) by their new events.

    Events are sorted by (user, time): user_sorted (N,) is each event's user index 0..U-1, starts and
    lengths (U,) each user's run; category (N,) category keys (0: none); gap_ms (N,) time since the
    user's previous event; first_ever (N,) the user's first event ever; old_last_ts (U,) each user's
    last event time before the batch (-1: none).
    """
    if not len(ts):
        return
    last_in_batch = ts[starts + lengths - 1]
    ref = np.maximum(old_last_ts, last_in_batch)  # the new "as of" time of every mass
    had = old_last_ts >= 0
    since = np.where(had, ref - old_last_ts, 0).astype(np.float64)  # (U,)
    age = (ref[user_sorted] - ts).astype(np.float64)  # (N,) how old each event is at ref
    n_users = len(rows)
    purchase, cart = type_idx == PURCHASE, type_idx == ADD_TO_CART

    def decayed(name: str, taus: tuple[float, ...], mask: np.ndarray | None) -> None:
        mass = columns[name][rows].astype(np.float64)
        for j, tau in enumerate(taus):
            w = np.exp(-age / tau)
            add = np.bincount(user_sorted, weights=w if mask is None else w * mask, minlength=n_users)
            mass[:, j] = mass[:, j] * np.exp(-since / tau) + add
        columns[name][rows] = mass

    decayed("activity_mass", ACTIVITY_TAUS_MS, None)
    decayed("purchase_mass", PURCHASE_TAUS_MS, purchase)

    _update_orders(columns, rows, user_sorted, ts, purchase)

    # Latest purchase and cart; carts since the latest purchase (this batch's, or the stored count plus).
    idx = np.arange(len(ts))
    last_purchase_idx = _last_where(purchase, user_sorted, idx, n_users)
    last_cart_idx = _last_where(cart, user_sorted, idx, n_users)
    bought = last_purchase_idx >= 0
    lp, lc = columns["last_purchase_ts"], columns["last_cart_ts"]
    lp[rows[bought]] = np.maximum(lp[rows[bought]], ts[last_purchase_idx[bought]])
    carted = last_cart_idx >= 0
    lc[rows[carted]] = np.maximum(lc[rows[carted]], ts[last_cart_idx[carted]])
    after_purchase = cart & (idx > np.where(bought, last_purchase_idx, -1)[user_sorted])
    new_carts = np.bincount(user_sorted, weights=after_purchase, minlength=n_users).astype(np.int64)
    pending = columns["carts_pending"]
    pending[rows] = np.where(bought, new_carts, pending[rows] + new_carts)

    _update_follow(columns, rows, user_sorted, category, purchase, idx, last_purchase_idx)
    # Before the latest category and the slots move: the week's guesses are made from what came before.
    update_habit(columns, rows, user_sorted, ts, category, starts, old_last_ts, columns["cat_key"][rows],
                 columns["cat_count"][rows][:, :, 0])

    has_category = category > 0
    visit = _visit_starts(columns["last_category"][rows], user_sorted, category, has_category, gap_ms, first_ever)
    last_cat_idx = _last_where(has_category, user_sorted, idx, n_users)
    # A batch whose categorised events all came late (older than the user's latest event before it) leaves the
    # latest category as it was: what a batch of them arriving in time order would have left.
    seen = (last_cat_idx >= 0) & (ts[np.maximum(last_cat_idx, 0)] >= old_last_ts)
    columns["last_category"][rows[seen]] = category[last_cat_idx[seen]]

    # Visit rhythm: every session opening after the first adds its log gap (hours) to two averages.
    opens = first_ever | (gap_ms > SESSION_GAP_MS)
    columns["sessions"][rows] += np.bincount(user_sorted, weights=opens, minlength=n_users).astype(np.int64)
    steps = ~opens  # the gaps within a visit: the shop's pace (stream/tempo.py)
    step_log = np.log(np.maximum(gap_ms[steps], STEP_MIN_MS) / MINUTE_MS)
    columns["step_log_minutes"][rows] += np.bincount(user_sorted[steps], weights=step_log, minlength=n_users)
    gaps = opens & ~first_ever
    _average_gaps(columns, "session_gap", rows, user_sorted[gaps], gap_ms[gaps], n_users)
    _update_visit(columns, rows, user_sorted, type_idx == SEARCH, opens, idx, n_users)

    _update_slots(columns, rows, user_sorted, category, visit, age, since)


def _update_orders(columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray, ts: np.ndarray,
                   purchase: np.ndarray) -> None:
    """Count the orders the batch's purchases open (ORDER_GAP_MS after the user's previous purchase, this batch's
    or the stored latest one) and average the gaps between orders. Reads last_purchase_ts before it moves. Only
    the buyers' rows are read and written: most users of a batch buy nothing."""
    at = np.flatnonzero(purchase)
    if not len(at):
        return
    user, when = user_sorted[at], ts[at]
    first_of_user = np.r_[True, user[1:] != user[:-1]]
    buyer_rows = rows[user[first_of_user]]
    buyer = np.cumsum(first_of_user) - 1  # each purchase's buyer, 0..B-1
    previous = np.empty_like(when)
    previous[1:] = when[:-1]
    previous[first_of_user] = columns["last_purchase_ts"][buyer_rows]
    had = previous >= 0
    opens = ~had | (when - previous > ORDER_GAP_MS)
    columns["orders"][buyer_rows] += np.bincount(buyer, weights=opens, minlength=len(buyer_rows)).astype(np.int64)
    gaps = opens & had
    _average_gaps(columns, "order_gap", buyer_rows, buyer[gaps], (when - previous)[gaps], len(buyer_rows))


def _average_gaps(columns: dict[str, np.ndarray], name: str, rows: np.ndarray, g_user: np.ndarray,
                  gap_ms: np.ndarray, n_users: int) -> None:
    """Add each user's new gaps (g_user ascending, in time order within a user), as log1p of hours, to the
    exponential averages of column `name` (one per GAP_RATES): the last gap weighs rate, earlier ones less."""
    if not len(g_user):
        return
    g_value = np.log1p(gap_ms / HOUR_MS)
    n_gaps = np.bincount(g_user, minlength=n_users)
    # k-th gap of its user in this batch (0-based)
    first_gap = np.zeros(n_users, dtype=np.int64)
    np.cumsum(n_gaps[:-1], out=first_gap[1:])
    k = np.arange(len(g_user)) - first_gap[g_user]
    averages = columns[name][rows].astype(np.float64)
    for j, rate in enumerate(GAP_RATES):
        keep = (1 - rate) ** (n_gaps[g_user] - 1 - k)
        add = np.bincount(g_user, weights=rate * keep * g_value, minlength=n_users)
        averages[:, j] = averages[:, j] * (1 - rate) ** n_gaps + add
    columns[name][rows] = averages


def _visit_starts(old_last: np.ndarray, user_sorted: np.ndarray, category: np.ndarray, has: np.ndarray,
                  gap_ms: np.ndarray, first_ever: np.ndarray) -> np.ndarray:
    """(N,) whether each categorised event opens a visit to its category: the user's previous categorised
    event (in this batch, else old_last (U,), the stored latest category) was of another category, or a new
    session opens with it. The same whatever the batches, as old_last carries the previous one across."""
    at = np.flatnonzero(has)
    user, cat = user_sorted[at], category[at]
    prev = np.empty_like(cat)
    prev[1:] = cat[:-1]
    first_of_user = np.r_[True, user[1:] != user[:-1]] if len(at) else np.zeros(0, dtype=bool)
    prev[first_of_user] = old_last[user[first_of_user]]
    visit = np.zeros(len(category), dtype=bool)
    visit[at] = (cat != prev) | (gap_ms[at] > SESSION_GAP_MS) | first_ever[at]
    return visit


def _update_follow(columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray, category: np.ndarray,
                   purchase: np.ndarray, idx: np.ndarray, last_purchase_idx: np.ndarray) -> None:
    """The latest purchase's category, and the first other category engaged with after it (kept until
    the next purchase): the same whatever the batches, as a purchase resets both wherever it falls."""
    bought = last_purchase_idx >= 0
    old_a, old_follow = columns["purchase_category"][rows], columns["follow_category"][rows]
    a = np.where(bought, category[np.maximum(last_purchase_idx, 0)], old_a).astype(np.int64)  # (U,)
    after = np.where(bought, last_purchase_idx, -1)[user_sorted]  # events after the latest purchase count
    a_of = a[user_sorted]
    candidate = (idx > after) & (category > 0) & (category != a_of) & (a_of > 0)
    first = np.full(len(rows), len(idx), dtype=np.int64)
    np.minimum.at(first, user_sorted[candidate], idx[candidate])
    found = np.where(first < len(idx), category[np.minimum(first, len(idx) - 1)], 0)
    columns["purchase_category"][rows] = a
    columns["follow_category"][rows] = np.where(bought | (old_follow == 0), found, old_follow)


def _update_visit(columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray, search: np.ndarray,
                  opens: np.ndarray, idx: np.ndarray, n_users: int) -> None:
    """The latest visit's events and searches: counted from the batch's last session opening where the user has
    one in it, else added to the stored counts (saturating at COUNT_MAX)."""
    last_open = _last_where(opens, user_sorted, idx, n_users)
    in_visit = idx >= last_open[user_sorted]  # every event where the user opened none in the batch (-1)
    events = np.bincount(user_sorted, weights=in_visit, minlength=n_users)
    searches = np.bincount(user_sorted, weights=in_visit & search, minlength=n_users)
    carried = last_open < 0
    for name, new in (("visit_events", events), ("visit_searches", searches)):
        total = new + np.where(carried, columns[name][rows], 0)
        columns[name][rows] = np.minimum(total, COUNT_MAX)


def _last_where(mask: np.ndarray, user_sorted: np.ndarray, idx: np.ndarray, n_users: int) -> np.ndarray:
    """(U,) index of each user's last event where mask holds, -1 where none."""
    out = np.full(n_users, -1, dtype=np.int64)
    np.maximum.at(out, user_sorted[mask], idx[mask])
    return out


def _update_slots(columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray,
                  category: np.ndarray, visit: np.ndarray, age: np.ndarray, since: np.ndarray) -> None:
    """Merge each user's new categorised events into their K slots; keep the latest category, the FRESH_SLOTS
    others with most day mass, and the rest with most 30-day mass.
    visit: (N,) the events that open a visit to their category (_visit_starts)."""
    has = category > 0
    old_mass = _slot_stats(columns, rows)  # (U, K, T + 2)
    for j, tau in enumerate(SLOT_TAUS_MS):
        old_mass[:, :, j] *= np.exp(-since / tau)[:, None]
    if not has.any():  # no new category: only the decay
        columns["cat_mass"][rows] = old_mass[:, :, :COUNT]
        return
    k, n_users = CATEGORY_SLOTS, len(rows)
    old_key = columns["cat_key"][rows]  # (U, K)
    filled = old_key > 0
    user = np.concatenate([np.nonzero(filled)[0], user_sorted[has]])
    key = np.concatenate([old_key[filled], category[has]]).astype(np.int64)
    # Group the entries by (user, category): one stable sort of user and key packed into one int64 (keys are
    # 32-bit), as lexsort((key, user)) would order them in six times the time.
    pair = (user << 32) | key
    order = np.argsort(pair, kind="stable")
    opens = np.r_[True, pair[order[1:]] != pair[order[:-1]]]
    group = np.empty(len(pair), dtype=np.int64)
    group[order] = np.cumsum(opens) - 1
    user, key = user[order[opens]], key[order[opens]]
    # Each group's masses and counts: the slot's, plus each new event's (its weight at ref, 1, opens a visit).
    old_filled = old_mass[filled]
    new_columns = (*(np.exp(-age[has] / tau) for tau in SLOT_TAUS_MS), np.ones(int(has.sum())), visit[has])
    mass = np.stack([np.bincount(group, weights=np.concatenate([old_filled[:, j], column]), minlength=len(user))
                     for j, column in enumerate(new_columns)], axis=1)
    # Per user: the latest category first, then the FRESH_SLOTS others with most day mass, then most 30-day mass
    # (then count, then key), keep the first K. The groups are in key order and lexsort is stable: the key needs no
    # pass of its own. Why: by 30-day mass alone, a category met in this visit or these days (a mass of its few
    # events) gave way to six a user came to often weeks ago, and where interests move on the ones met last are the
    # likeliest next (sessions 43 and 51).
    # Groups are sorted by user, and stay so in every order below: a group's place among its user's is its
    # position less where the user's groups start.
    place = np.arange(len(user)) - np.searchsorted(user, np.arange(n_users))[user]
    latest = key == columns["last_category"][rows][user].astype(np.int64)
    by_day = np.lexsort((-mass[:, MASS_30D], -mass[:, MASS_1D], ~latest, user))
    fresh = np.empty(len(user), dtype=np.int64)  # each group's place in its user's order by day mass
    fresh[by_day] = place
    tier = np.where(latest, 0, np.where(fresh <= FRESH_SLOTS, 1, 2))  # the latest, if the user has one, is place 0
    order = np.lexsort((-mass[:, COUNT], -mass[:, MASS_30D], tier, user))
    user, key, mass = user[order], key[order], mass[order]
    slot = place
    keep = slot < k
    out_key = np.zeros((n_users, k), dtype=np.uint32)
    out_mass = np.zeros((n_users, k, mass.shape[1]), dtype=np.float64)
    out_key[user[keep], slot[keep]] = key[keep]
    out_mass[user[keep], slot[keep]] = mass[keep]
    columns["cat_key"][rows] = out_key
    columns["cat_mass"][rows] = out_mass[:, :, :COUNT]
    columns["cat_count"][rows] = np.minimum(out_mass[:, :, COUNT:], COUNT_MAX)


def _slot_stats(columns: dict[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """(U, K, T + 2) float64: each slot's decayed masses, then its event and visit counts."""
    return np.concatenate([columns["cat_mass"][rows], columns["cat_count"][rows]], axis=2, dtype=np.float64)


def unheld_keys(keys: np.ndarray, holders: list[tuple[dict[str, np.ndarray], np.ndarray | slice]]) -> np.ndarray:
    """Those of the category `keys` that no user holds: none of the `holders` (columns, rows) has
    them in a category slot or as the latest event's category. A user's slots are what the state still
    knows of the categories it engaged with."""
    held = np.concatenate([np.concatenate([columns["cat_key"][rows].ravel(), columns["last_category"][rows].ravel()])
                           for columns, rows in holders]).astype(np.int64)
    return keys[~np.isin(keys, held)]


def masses_now(columns: dict[str, np.ndarray], name: str, taus: tuple[float, ...], rows: np.ndarray,
               elapsed: np.ndarray) -> np.ndarray:
    """(N, len(taus)) float64 the users' masses `name` (decayed to their last event) faded on by `elapsed` (N,) ms."""
    return columns[name][rows].astype(np.float64) * np.exp(-elapsed[:, None] / np.asarray(taus, dtype=np.float64))


def week_masses(columns: dict[str, np.ndarray], last_ts: np.ndarray, rows: np.ndarray, now: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(N,) each user's events and purchases faded with a week's time constant to the clock `now` (its activity and
    purchase masses)."""
    week, elapsed = 7 * DAY_MS, np.maximum(now - last_ts[rows].astype(np.float64), 0.0)
    return (masses_now(columns, "activity_mass", ACTIVITY_TAUS_MS, rows, elapsed)[:, ACTIVITY_TAUS_MS.index(week)],
            masses_now(columns, "purchase_mass", PURCHASE_TAUS_MS, rows, elapsed)[:, PURCHASE_TAUS_MS.index(week)])


def user_features(columns: dict[str, np.ndarray], counts: np.ndarray, last_ts: np.ndarray, rows: np.ndarray,
                  now_ms: int | np.ndarray) -> np.ndarray:
    """(U, len(USER_FEATURES)) float32 features of the users `rows` read at the clock now_ms.
    counts: the table's (capacity, 4) event counts; last_ts: its (capacity,) last event times."""
    last = last_ts[rows].astype(np.float64)
    now = np.maximum(np.asarray(now_ms, dtype=np.float64), last)
    idle_h = np.where(last >= 0, (now - last) / HOUR_MS, 0.0)
    c = counts[rows].astype(np.float64)
    events = np.maximum(c.sum(axis=1), 1.0)
    purchases, carts = c[:, PURCHASE], c[:, ADD_TO_CART]

    def minutes_since(name: str) -> tuple[np.ndarray, np.ndarray]:
        at = columns[name][rows].astype(np.float64)
        has = at >= 0
        return np.where(has, np.log1p(np.maximum(now - at, 0.0) / MINUTE_MS), 0.0), has.astype(np.float64)

    def mass_now(name: str, taus: tuple[float, ...]) -> list[np.ndarray]:
        return list(np.log1p(masses_now(columns, name, taus, rows, now - last)).T)

    since_purchase, has_purchase = minutes_since("last_purchase_ts")
    since_cart, has_cart = minutes_since("last_cart_ts")
    sessions = columns["sessions"][rows].astype(np.float64)
    corrected, has_gap = _gap_averages(columns["session_gap"][rows], sessions)
    log_idle = np.log1p(idle_h)  # the rhythm's unit (the session gaps are averaged as log1p of hours)
    orders = columns["orders"][rows].astype(np.float64)
    order_gap, has_order_gap = _gap_averages(columns["order_gap"][rows], orders)
    last_purchase = columns["last_purchase_ts"][rows].astype(np.float64)
    hours_since_purchase = np.log1p(np.maximum(now - last_purchase, 0.0) / HOUR_MS)
    purchase_vs_usual = (hours_since_purchase - order_gap[1]) * has_order_gap
    features = [
        np.log1p(idle_h * 60), np.log1p(events), purchases / events, np.log1p(purchases), has_purchase,
        since_purchase, np.log1p(columns["carts_pending"][rows].astype(np.float64)), since_cart, has_cart,
        carts / events, *mass_now("activity_mass", ACTIVITY_TAUS_MS), *mass_now("purchase_mass", PURCHASE_TAUS_MS),
        np.log1p(sessions), corrected[0], corrected[1], has_gap, (log_idle - corrected[1]) * has_gap,
        np.log1p(orders), order_gap[0], order_gap[1], has_order_gap, purchase_vs_usual,
        order_due(purchase_vs_usual, has_order_gap),
        columns["visit_searches"][rows] / np.maximum(columns["visit_events"][rows].astype(np.float64), 1.0),
    ]
    return float32_columns(features)


def float32_columns(features: list[np.ndarray]) -> np.ndarray:
    """The equal-shaped `features` side by side on a new last axis, as float32. Why not np.stack(axis=-1): it
    builds a float64 array a column at a time and converts it after; at the final profiles of 50,000 users (6 slots,
    15 features) that took 0.3 s of a 4.2 s replay of bench500k, writing straight into float32 0.02 s."""
    out = np.empty((*np.shape(features[0]), len(features)), dtype=np.float32)
    for j, feature in enumerate(features):
        out[..., j] = feature
    return out


def order_due(since_vs_usual: np.ndarray, has_rhythm: np.ndarray) -> np.ndarray:
    """How due a user's next order is (USER_FEATURES' order_due, and the evaluation's "order due" rule): exp(-|log1p
    hours since the latest purchase - the usual log1p hours between orders|) - 1/2 where the user has a rhythm, 0
    (as unknown as halfway) where not."""
    return np.where(has_rhythm > 0, np.exp(-np.abs(since_vs_usual)) - 0.5, 0.0)


def _gap_averages(averages: np.ndarray, opened: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The recent and usual gap (log1p hours) of users whose `opened` sessions or orders left the exponential
    `averages` (U, len(GAP_RATES)), and whether they have one (0 where fewer than two opened)."""
    n_gaps = np.maximum(opened - 1, 0)
    averages = averages.astype(np.float64)
    # The averages start from 0: divide by the weight they have gathered (bias correction, as in Adam).
    corrected = [np.where(n_gaps > 0, averages[:, j] / np.maximum(1 - (1 - rate) ** n_gaps, 1e-9), 0.0)
                 for j, rate in enumerate(GAP_RATES)]
    return corrected, (n_gaps > 0).astype(np.float64)


def slot_features(columns: dict[str, np.ndarray], last_ts: np.ndarray, rows: np.ndarray,
                  now_ms: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, K) category keys of the users' slots (0: empty) and (U, K, len(SLOT_FEATURES)) their
    features read at now_ms: the repeat side of top_categories."""
    bucket = columns["cat_key"][rows].astype(np.int64)
    mass = _slot_stats(columns, rows)
    last = last_ts[rows].astype(np.float64)
    elapsed = np.maximum(np.asarray(now_ms, dtype=np.float64) - last, 0.0)[:, None]
    decayed = [mass[:, :, j] * np.exp(-elapsed / tau) for j, tau in enumerate(SLOT_TAUS_MS)]
    count, visits = mass[:, :, COUNT], mass[:, :, VISITS]
    share = count / np.maximum(count.sum(axis=1, keepdims=True), 1.0)
    visit_share = visits / np.maximum(visits.sum(axis=1, keepdims=True), 1.0)
    is_last = (bucket == columns["last_category"][rows][:, None]) & (bucket > 0)
    follow = np.zeros_like(share)  # filled by stream/follow.py, popularity.py and habit.py, which know the shop
    feats = float32_columns([*(np.log1p(d) for d in decayed), np.log1p(count), share, is_last, follow, follow, follow,
                             np.log1p(visits), visit_share, follow, _freshness(decayed), follow, follow])
    return bucket, feats


def _freshness(decayed: list[np.ndarray]) -> np.ndarray:
    """(U, K) how recently each slot's category was last engaged with, read from its masses decayed to the
    clock: 1 - log1p(age in minutes) / FRESHNESS_LOG_MINUTES, clipped to [0, 1]; 0 for an empty slot.

    Why: the masses rank by frequency as much as by recency, and log1p of a day's mass tells a category of 3 days
    ago (0.05) from one of 6 (0.0025) by too little for a linear score to see. No new state: a mass sum_i
    exp(-age_i / tau) gives -tau * log(mass) = the latest event's age less at most tau * log(its events), so the
    finest tau whose mass has not run out of float32 (the hour's lasts about 4 days, the day's 3 months) reads the
    age within hours, or within a day or two beyond."""
    age = np.full(decayed[0].shape, np.inf)
    for mass, tau in zip(reversed(decayed), reversed(SLOT_TAUS_MS)):  # coarse to fine: the finest that holds wins
        held = mass > 0
        age = np.where(held, -tau * np.log(np.where(held, mass, 1.0)), age)
    minutes = np.maximum(age, 0.0) / MINUTE_MS
    return np.clip(1.0 - np.log1p(minutes) / FRESHNESS_LOG_MINUTES, 0.0, 1.0)  # inf (never): 0


def stat_bytes_per_user() -> int:
    """Bytes of statistics per user in the state table."""
    return sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for dtype, shape, _ in STAT_COLUMNS.values())
