"""Whether this shop's users come back to their latest categories or to their usual ones, learned from the traffic.

In one shop a user's interests move on (this month the garden, next month the kitchen): the categories met last
are the ones of next week. In another, users keep their staples and a category met once is a curiosity: the
categories counted most are next week's. top_categories must rank by recency in the first and by the counts in the
second, and which shop it serves is the shop's own habit: a model trained in one cannot know it (an independent
world whose interests move on put the shipped model's precision@3 0.21 behind "most recent categories").

The stream says which, without labels: at the first event of a user's new week (weeks of event time, counted from
the epoch) it notes the category of the user's latest event before it (recency's guess) and the one the user has
engaged with most (the counts' guess, larger key on ties); when the user comes back in a later week it notes how the
week went (`habit_last`: 1 where only recency's guess was engaged with again, 2 where only the counts', 0 otherwise)
and which week it was (`habit_last_week`): the same whatever the batches, for events in time order (an event that
comes late, from a week already closed, counts in the week open when it arrives). `ShopHabit` counts those outcomes
over the table's users by week, kept as rows change, as `HolderCounts` (stream/popularity.py) keeps the category
holders: a pure function of the table, rebuilt after a restore, nothing written anywhere. The heads read
`recency_lean(now)`, from the users whose latest closed week is one of the last RECENT_WEEKS: the shop's habit as it
is now (a fashion shop whose users all move to the next season's categories within a week leans toward them within
weeks; counted over all history it would not), 0 until recency's guess has won clearly more of them than the counts',
1 where it wins most; and `counts_lean(now)`, its mirror, 0 until the counts' guess has won far more than recency's
(as in most shops it wins somewhat more), 1 where it wins nearly all.
"""

from __future__ import annotations

import numpy as np

WEEK_MS = 7 * 24 * 3_600_000
# Users' latest closed weeks that count as if neither guess had won: a shop's first weeks lean on nothing.
PRIOR_WEEKS = 50.0
# The users whose latest closed week is one of the last RECENT_WEEKS (of the shop's clock) say how the shop is now.
RECENT_WEEKS = 4
# The evidence (recency's wins less the counts', over all wins and PRIOR_WEEKS) from where the heads lean toward
# recency, and where they lean fully: the project's generated shops, a replenishment world, B2B accounts,
# loyal-or-once users, explorers and trend waves measure -0.73 to +0.07; worlds whose users' interests move every few
# weeks (seasons, projects) or all at once (a fashion shop's new season) +0.51 to +0.75.
LEAN_FROM, LEAN_FULL = 0.1, 0.4
# ... and toward the counts (session 52): where users keep their staples and a category met once is a detour that
# does not come again (explorers: -0.49 to -0.73 from a third of their span on), the counts' guess wins six weeks
# in seven. The project's generated shops, the classic shop, replenishment, B2B accounts, loyal-or-once users and
# trend waves stay above -0.37 at every cut of their logs; a fashion shop before its new season -0.39 to -0.58.
COUNTS_LEAN_FROM, COUNTS_LEAN_FULL = -0.45, -0.6

# Host columns of the state (stream/state.py COLUMNS, through stream/statistics.py STAT_COLUMNS).
HABIT_COLUMNS: dict[str, tuple[type, tuple[int, ...], float]] = {
    "habit_week": (np.uint16, (), 0),  # the week of the guesses below, since the epoch (0: none yet; 2026 is 2,917)
    "habit_keys": (np.uint32, (2,), 0),  # recency's and the counts' guess (category keys; 0: no category yet)
    "habit_hits": (np.uint8, (), 0),  # bit 0: recency's guess engaged with again this week; bit 1: the counts'
    "habit_last": (np.uint8, (), 0),  # the latest closed week: 1 recency's guess alone came again, 2 the counts', 0
    "habit_last_week": (np.uint16, (), 0),  # ... and which week that was (0: none closed yet)
}


def update_habit(columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray, ts: np.ndarray,
                 category: np.ndarray, starts: np.ndarray, old_last_ts: np.ndarray, slot_keys: np.ndarray,
                 slot_counts: np.ndarray) -> None:
    """Advance the users `rows` (U,) by their events, sorted by (user, time) as stream/statistics.update gets them.
    Reads each user's latest category (`last_category`), latest event time before the batch (old_last_ts, (U,)) and
    category slots before the batch: slot_keys (U, K) and slot_counts (U, K), their event counts; call it before the
    batch moves them."""
    n, n_users = len(ts), len(rows)
    if not n:
        return
    idx = np.arange(n)
    start_of = starts[user_sorted]
    has = category > 0
    key = category.astype(np.int64)

    # Weeks: an event in a later week than any of its user's before opens one (a late event counts in the current).
    week = ts // WEEK_MS
    stored_week = columns["habit_week"][rows].astype(np.int64)
    current = _running_max_within(week, user_sorted, stored_week)
    before_it = np.r_[-1, current[:-1]]
    before_it[starts] = stored_week
    opened = week > before_it
    opened_at = np.flatnonzero(opened)

    # Recency's guess where a week opens: the latest categorised event before it (this batch's, unless it came late,
    # older than the user's latest before the batch; else the stored one).
    before = np.r_[-1, np.maximum.accumulate(np.where(has, idx, -1))[:-1]][opened_at]
    user_at = user_sorted[opened_at]
    in_time = (before >= start_of[opened_at]) & (ts[np.maximum(before, 0)] >= old_last_ts[user_at])
    recent = np.where(in_time, key[np.maximum(before, 0)], columns["last_category"][rows].astype(np.int64)[user_at])

    # The counts' guess where a week opens: the most engaged-with category so far, as count << 32 | key (a larger key
    # wins a tie): the slots' best, or, where the week opens after the user's first event of the batch (rare: a
    # batch spanning a week's end), the best of the slots' counts plus the batch's events before it.
    slot_keys = slot_keys.astype(np.int64)
    stored_best = np.max(np.where(slot_keys > 0, (slot_counts.astype(np.int64) << 32) | slot_keys, 0), axis=1)
    usual = stored_best[user_at]
    mid_batch = np.flatnonzero(opened_at != start_of[opened_at])
    if len(mid_batch):
        usual[mid_batch] = np.maximum(usual[mid_batch], _best_before(opened_at[mid_batch], start_of, user_sorted, key,
                                                                     has, slot_keys, slot_counts))
    guesses = np.stack([recent, usual & 0xFFFFFFFF], axis=1)  # (M, 2): recency's and the counts' guess

    # Each event's week: the stored one or the one its latest opening event began, with that event's guesses.
    opener = np.maximum.accumulate(np.where(opened, idx, -1))
    in_batch = opener >= start_of
    nth = np.cumsum(opened) - 1  # each event's latest opening, as a row of guesses
    opening = guesses[np.maximum(nth, 0)] if len(guesses) else np.zeros((n, 2), dtype=np.int64)
    guess = np.where(in_batch[:, None], opening, columns["habit_keys"][rows].astype(np.int64)[user_sorted])
    hit = np.where(has, (key == guess[:, 0]) * 1 + (key == guess[:, 1]) * 2, 0).astype(np.uint8)

    # The weeks this batch closes: the stored one where the user opened a new one, and every opened one but the last.
    stored_hits = columns["habit_hits"][rows].copy()
    np.bitwise_or.at(stored_hits, user_sorted[~in_batch], hit[~in_batch])
    opened_hits = np.zeros(n, dtype=np.uint8)
    np.bitwise_or.at(opened_hits, opener[in_batch], hit[in_batch])
    last_open = np.full(n_users, -1, dtype=np.int64)
    np.maximum.at(last_open, user_sorted[opened], idx[opened])
    reopened = last_open >= 0
    # Each user's latest closed week: the last opened here but one, else the stored one where a new one opened.
    closed = opened_at != last_open[user_sorted[opened_at]]
    closed_at = opened_at[closed]
    last_closed = np.full(n_users, -1, dtype=np.int64)  # each user's latest of closed_at, as its index there
    np.maximum.at(last_closed, user_sorted[closed_at], np.arange(len(closed_at)))
    stored_closes = reopened & (last_closed < 0) & (stored_week > 0)
    here = last_closed >= 0
    columns["habit_last"][rows[stored_closes]] = _outcome(columns["habit_keys"][rows[stored_closes]].astype(np.int64),
                                                          stored_hits[stored_closes])
    columns["habit_last_week"][rows[stored_closes]] = stored_week[stored_closes]
    at = closed_at[last_closed[here]]
    columns["habit_last"][rows[here]] = _outcome(guesses[closed][last_closed[here]], opened_hits[at])
    columns["habit_last_week"][rows[here]] = week[at]

    # The week still open: the last one opened, or the stored one with this batch's hits.
    last = last_open[reopened]
    columns["habit_week"][rows[reopened]] = week[last]
    columns["habit_keys"][rows[reopened]] = guesses[nth[last]]
    columns["habit_hits"][rows] = np.where(reopened, opened_hits[np.maximum(last_open, 0)], stored_hits)


def _best_before(at: np.ndarray, start_of: np.ndarray, user_sorted: np.ndarray, key: np.ndarray, has: np.ndarray,
                 slot_keys: np.ndarray, slot_counts: np.ndarray) -> np.ndarray:
    """(len(at),) the best count << 32 | key over the batch's categorised events of each event's user before it,
    counting each category from the slots' count: for the events `at` (none the first of its user in the batch)."""
    users = np.unique(user_sorted[at])
    mine = np.flatnonzero(np.isin(user_sorted, users) & has)  # the categorised events of those users, in order
    if not len(mine):
        return np.zeros(len(at), dtype=np.int64)
    pair = (user_sorted[mine].astype(np.int64) << 32) | key[mine]
    order = np.argsort(pair, kind="stable")
    opens = np.r_[True, pair[order][1:] != pair[order][:-1]]
    first = np.maximum.accumulate(np.where(opens, np.arange(len(order)), 0))
    so_far = np.empty(len(mine), dtype=np.int64)
    so_far[order] = np.arange(len(order)) - first + 1  # the batch's events of the category up to this one
    match = slot_keys[user_sorted[mine]] == key[mine, None]
    stored = np.where(match.any(axis=1), slot_counts.astype(np.int64)[user_sorted[mine], match.argmax(axis=1)], 0)
    value = np.zeros(len(user_sorted), dtype=np.int64)
    value[mine] = ((stored + so_far) << 32) | key[mine]
    # max over [first event of the user, the event): reduceat over (start, end) pairs, every other one kept.
    bounds = np.stack([start_of[at], at], axis=1).reshape(-1)
    return np.maximum.reduceat(value, bounds)[::2]


def _running_max_within(values: np.ndarray, user_sorted: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(N,) the largest of each user's stored value and its values up to each event (all of them >= -1)."""
    offset = user_sorted.astype(np.int64) << 40  # weeks since the epoch stay far below 2**40
    return np.maximum.accumulate(np.maximum(values, stored[user_sorted]) + 1 + offset) - 1 - offset


def _outcome(guesses: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """How closed weeks went: 1 where only recency's guess came again, 2 only the counts', 0 otherwise (both, neither,
    one guess for both, or a guess missing)."""
    judged = (guesses[:, 0] > 0) & (guesses[:, 1] > 0) & (guesses[:, 0] != guesses[:, 1])
    return np.where(judged & ((hits == 1) | (hits == 2)), hits, 0).astype(np.uint8)


class ShopHabit:
    """Users by the week of their latest closed week and how it went (recency's guess alone came again, or the
    counts'), over the table's users."""

    def __init__(self) -> None:
        self.weeks: dict[int, list[int]] = {}  # week -> [users whose latest closed week it is: recency won, counts won]

    @staticmethod
    def parts(columns: dict[str, np.ndarray], rows: np.ndarray | slice) -> np.ndarray:
        """These rows' judged latest weeks as week * 2 + (outcome - 1), one entry per user with one."""
        outcome = columns["habit_last"][rows].astype(np.int64)
        judged = outcome > 0
        return columns["habit_last_week"][rows][judged].astype(np.int64) * 2 + outcome[judged] - 1

    def rebuild(self, columns: dict[str, np.ndarray], n: int) -> None:
        self.weeks = {}
        self.change(self.parts(columns, slice(0, n)), 1)

    def change(self, part: np.ndarray, sign: int) -> None:
        """Add (sign 1) or take away (sign -1) what `parts` returned for some rows."""
        if not len(part):
            return
        distinct, n = np.unique(part, return_counts=True)
        for code, count in zip(distinct.tolist(), (sign * n).tolist()):
            counts = self.weeks.setdefault(code // 2, [0, 0])
            counts[code % 2] += count
            if counts == [0, 0]:
                del self.weeks[code // 2]

    def wins(self, now_ms: int) -> tuple[int, int]:
        """(recency's, the counts') among the users whose latest closed week is one of the last RECENT_WEEKS."""
        since = now_ms // WEEK_MS - RECENT_WEEKS
        recent = [counts for week, counts in self.weeks.items() if week >= since]
        return sum(c[0] for c in recent), sum(c[1] for c in recent)

    def evidence(self, now_ms: int) -> float:
        """Recency's wins less the counts', over all wins and PRIOR_WEEKS: -1 to 1, 0 before any."""
        return evidence(*self.wins(now_ms))

    def recency_lean(self, now_ms: int) -> float:
        """How far top_categories leans toward the user's latest categories in this shop now: 0 to 1."""
        return leans(*self.wins(now_ms))[0]

    def counts_lean(self, now_ms: int) -> float:
        """How far top_categories leans toward the categories the user engaged with most, in this shop now: 0 to 1."""
        return leans(*self.wins(now_ms))[1]


def evidence(recency_weeks: int, counts_weeks: int) -> float:
    """Recency's wins less the counts', over all wins and PRIOR_WEEKS: -1 to 1, 0 before any."""
    return (recency_weeks - counts_weeks) / (recency_weeks + counts_weeks + PRIOR_WEEKS)


def leans(recency_weeks: int, counts_weeks: int) -> tuple[float, float]:
    """(toward the latest categories, toward the most engaged-with ones), each 0 to 1 and at most one above 0, from
    the users' latest weeks won each way."""
    e = evidence(recency_weeks, counts_weeks)
    return (float(np.clip((e - LEAN_FROM) / (LEAN_FULL - LEAN_FROM), 0.0, 1.0)),
            float(np.clip((e - COUNTS_LEAN_FROM) / (COUNTS_LEAN_FULL - COUNTS_LEAN_FROM), 0.0, 1.0)))
