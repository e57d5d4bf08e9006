"""Whether this shop's users come back to their latest categories or to their usual ones, learned from the traffic.

In one shop a user's interests move on (this month the garden, next month the kitchen): the categories met last
are the ones of next week. In another, users keep their staples and a category met once is a curiosity: the
categories counted most are next week's. top_categories must rank by recency in the first and by the counts in the
second, and which shop it serves is the shop's own habit: a model trained in one cannot know it (an independent
world whose interests move on put the shipped model's precision@3 0.21 behind "most recent categories").

The stream says which, without labels: at the first event of a user's new week (weeks of event time, counted from
the epoch) it notes the category of the user's latest event before it (recency's guess) and the one the user has
engaged with most (the counts' guess, larger key on ties); when the user comes back in a later week it counts the
week where only one of the two was engaged with again (`habit_weeks`: [recency only, counts only]; the same whatever
the batches, for events in time order: an event that comes late, from a week already closed, counts in the week open
when it arrives). `ShopHabit` sums them over the table's users, kept as rows change, as `ShopTempo` (stream/tempo.py)
keeps the shop's pace: a pure function of the table, rebuilt after a restore, nothing written anywhere. The heads
read `recency_lean()`: 0 until recency's guess has won clearly more weeks than the counts', 1 where it wins most.
"""

from __future__ import annotations

import numpy as np

WEEK_MS = 7 * 24 * 3_600_000
# Closed weeks that count as if neither guess had won: a shop's first weeks lean on nothing.
PRIOR_WEEKS = 50.0
# The evidence (recency's wins less the counts', over all wins and PRIOR_WEEKS) from where the heads lean toward
# recency, and where they lean fully: the project's generated shops, a replenishment world, B2B accounts and
# loyal-or-once users measure -0.34 to 0.00; a world whose users' interests move every 2-4 weeks +0.58.
LEAN_FROM, LEAN_FULL = 0.1, 0.4

# Host columns of the state (stream/state.py COLUMNS, through stream/statistics.py STAT_COLUMNS).
HABIT_COLUMNS: dict[str, tuple[type, tuple[int, ...], float]] = {
    "habit_week": (np.uint16, (), 0),  # the week of the guesses below, since the epoch (0: none yet; 2026 is 2,917)
    "habit_keys": (np.uint32, (2,), 0),  # recency's and the counts' guess (category keys; 0: no category yet)
    "habit_hits": (np.uint8, (), 0),  # bit 0: recency's guess engaged with again this week; bit 1: the counts'
    "habit_weeks": (np.uint16, (2,), 0),  # closed weeks where only recency's guess / only the counts' came again
}
_WINS_MAX = np.iinfo(np.uint16).max


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

    # Recency's guess before each event: the latest categorised event before it (this batch's, unless it came late,
    # older than the user's latest before the batch; else the stored one).
    latest = np.maximum.accumulate(np.where(has, idx, -1))
    before = np.r_[-1, latest[:-1]]
    in_time = (before >= start_of) & (ts[np.maximum(before, 0)] >= old_last_ts[user_sorted])
    recent = np.where(in_time, key[np.maximum(before, 0)], columns["last_category"][rows].astype(np.int64)[user_sorted])

    # Weeks: an event in a later week than any of its user's before opens one (a late event counts in the current).
    week = ts // WEEK_MS
    stored_week = columns["habit_week"][rows].astype(np.int64)
    current = _running_max_within(week, user_sorted, stored_week)
    before_it = np.r_[-1, current[:-1]]
    before_it[starts] = stored_week
    opened = week > before_it
    opened_at = np.flatnonzero(opened)

    # The counts' guess where a week opens: the most engaged-with category so far, as count << 32 | key (a larger key
    # wins a tie): the slots' best, or, where the week opens after the user's first event of the batch (rare: a
    # batch spanning a week's end), the best of the slots' counts plus the batch's events before it.
    slot_keys = slot_keys.astype(np.int64)
    stored_best = np.max(np.where(slot_keys > 0, (slot_counts.astype(np.int64) << 32) | slot_keys, 0), axis=1)
    usual = stored_best[user_sorted[opened_at]]
    late = np.flatnonzero(opened_at != start_of[opened_at])
    if len(late):
        usual[late] = np.maximum(usual[late], _best_before(opened_at[late], start_of, user_sorted, key, has,
                                                           slot_keys, slot_counts))
    guesses = np.stack([recent[opened_at], usual & 0xFFFFFFFF], axis=1)  # (M, 2): recency's and the counts' guess

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
    wins = np.zeros((n_users, 2), dtype=np.int64)
    _count_wins(wins, np.flatnonzero(reopened), columns["habit_keys"][rows][reopened].astype(np.int64),
                stored_hits[reopened])
    closed = opened_at != last_open[user_sorted[opened_at]]
    _count_wins(wins, user_sorted[opened_at[closed]], guesses[closed], opened_hits[opened_at[closed]])
    columns["habit_weeks"][rows] = np.minimum(columns["habit_weeks"][rows].astype(np.int64) + wins, _WINS_MAX)

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


def _count_wins(wins: np.ndarray, users: np.ndarray, guesses: np.ndarray, hits: np.ndarray) -> None:
    """Add to wins (U, 2) the closed weeks where only one guess came again (guesses two distinct categories)."""
    judged = (guesses[:, 0] > 0) & (guesses[:, 1] > 0) & (guesses[:, 0] != guesses[:, 1])
    np.add.at(wins[:, 0], users[judged & (hits == 1)], 1)
    np.add.at(wins[:, 1], users[judged & (hits == 2)], 1)


class ShopHabit:
    """Sums, over the table's users, of the closed weeks won by recency's guess and by the counts'."""

    def __init__(self) -> None:
        self.recency = 0
        self.counts = 0

    @staticmethod
    def parts(columns: dict[str, np.ndarray], rows: np.ndarray | slice) -> tuple[int, int]:
        weeks = columns["habit_weeks"][rows].sum(axis=0, dtype=np.int64).reshape(-1)
        return (int(weeks[0]), int(weeks[1])) if len(weeks) == 2 else (0, 0)

    def rebuild(self, columns: dict[str, np.ndarray], n: int) -> None:
        self.recency, self.counts = self.parts(columns, slice(0, n))

    def change(self, part: tuple[int, int], sign: int) -> None:
        self.recency += sign * part[0]
        self.counts += sign * part[1]

    @property
    def evidence(self) -> float:
        """Recency's wins less the counts', over all wins and PRIOR_WEEKS: -1 to 1, 0 before any."""
        return (self.recency - self.counts) / (self.recency + self.counts + PRIOR_WEEKS)

    def recency_lean(self) -> float:
        """How far top_categories leans toward the user's latest categories in this shop: 0 to 1."""
        return float(np.clip((self.evidence - LEAN_FROM) / (LEAN_FULL - LEAN_FROM), 0.0, 1.0))
