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

The same contest is also held over spans of two days (session 60), because a week is slow to see a shop turn: a
season that turns after the last week boundary shows in no closed week until the next one closes, and a fashion
shop's users then went to their new season's categories for days while top_categories still ranked their summer
staples (0.155 precision@3 where "most recent categories" had 0.360). Its spans close within days of the turn,
and where they say recency's guess wins far more than the weeks say (TURN), top_categories leans toward the latest
categories as they say. The lean toward the counts reads the weeks alone: over two days the counts' guess wins less
clearly everywhere, and shops whose users keep their staples no longer stand apart (explorers -0.44 to -0.61
against B2B accounts' and loyal-or-once users' -0.38 and -0.40).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DAY_MS = 24 * 3_600_000
WEEK_MS = 7 * DAY_MS
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
# Where the spans of two days say recency's guess wins by this much more than the weeks do (the width of the lean's
# ramp), the shop has turned since its latest weeks closed, and the two days' lean is taken: a fashion shop's new
# season, +0.40 to +0.45 more four to six days after it. Where users move on for good (seasons, DIY projects) the
# two clocks agree within 0.12 at every cut, and the weeks' lean is the shop's habit: the larger of the two taken
# there too put seasons-2's first cut 0.020 lower in precision@3 (the stream's re-ranking, which learns from the
# rankings at its anchors, no longer passed its gate there). Elsewhere the two days' evidence stays below LEAN_FROM.
TURN = LEAN_FULL - LEAN_FROM


@dataclass(frozen=True)
class Contest:
    """The contest on one clock: its spans of event time, counted from the epoch; how many of the latest say how the
    shop is now; and its host columns (the span open, both guesses, the hits in it, how the latest closed one went
    and which one that was)."""

    name: str  # as the metrics' `span` label says it
    span_ms: int
    recent_spans: int
    columns: tuple[str, str, str, str, str]


WEEKS = Contest("week", WEEK_MS, RECENT_WEEKS,
                ("habit_week", "habit_keys", "habit_hits", "habit_last", "habit_last_week"))
# Four spans of two days: the users of the last eight days. Over the 24 logs judged (docs/model.md) this clock's
# evidence stays below LEAN_FROM wherever recency's guess does not win (at most +0.05), and is +0.20 / +0.21 four to
# six days after a fashion shop's new season, where the weeks' still read -0.20 / -0.24.
TWO_DAYS = Contest("two_days", 2 * DAY_MS, 4,
                   ("habit2_span", "habit2_keys", "habit2_hits", "habit2_last", "habit2_last_span"))
CONTESTS = (WEEKS, TWO_DAYS)


def _contest_columns(contest: Contest) -> dict[str, tuple[type, tuple[int, ...], float]]:
    span, keys, hits, last, last_span = contest.columns
    return {
        # the span of the guesses below, since the epoch (0: none yet; weeks of 2026 are 2,917: 16 bits last until
        # the year 2328 for spans of two days)
        span: (np.uint16, (), 0),
        keys: (np.uint32, (2,), 0),  # recency's and the counts' guess (category keys; 0: no category yet)
        hits: (np.uint8, (), 0),  # bit 0: recency's guess engaged with again in this span; bit 1: the counts'
        last: (np.uint8, (), 0),  # the latest closed span: 1 recency's guess alone came again, 2 the counts', 0
        last_span: (np.uint16, (), 0),  # ... and which span that was (0: none closed yet)
    }


# Host columns of the state (stream/state.py COLUMNS, through stream/statistics.py STAT_COLUMNS): 14 bytes per user
# for each clock.
HABIT_COLUMNS: dict[str, tuple[type, tuple[int, ...], float]] = {
    name: spec for contest in CONTESTS for name, spec in _contest_columns(contest).items()}


def update_habit(columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray, ts: np.ndarray,
                 category: np.ndarray, starts: np.ndarray, old_last_ts: np.ndarray, slot_keys: np.ndarray,
                 slot_counts: np.ndarray) -> None:
    """Advance the users `rows` (U,) by their events, sorted by (user, time) as stream/statistics.update gets them,
    on every clock. Reads each user's latest category (`last_category`), latest event time before the batch
    (old_last_ts, (U,)) and category slots before the batch: slot_keys (U, K) and slot_counts (U, K), their event
    counts; call it before the batch moves them."""
    if not len(ts):
        return
    slot_keys = slot_keys.astype(np.int64)
    # The counts' guess as count << 32 | key (a larger key wins a tie): the slots' best before the batch.
    stored_best = np.max(np.where(slot_keys > 0, (slot_counts.astype(np.int64) << 32) | slot_keys, 0), axis=1)
    key = category.astype(np.int64)
    for contest in CONTESTS:
        _advance(contest, columns, rows, user_sorted, ts, key, starts, old_last_ts, slot_keys, slot_counts, stored_best)


def _advance(contest: Contest, columns: dict[str, np.ndarray], rows: np.ndarray, user_sorted: np.ndarray,
             ts: np.ndarray, key: np.ndarray, starts: np.ndarray, old_last_ts: np.ndarray, slot_keys: np.ndarray,
             slot_counts: np.ndarray, stored_best: np.ndarray) -> None:
    """update_habit on one clock (key: the events' category keys, 0 for none)."""
    span_column, keys_column, hits_column, last_column, last_span_column = contest.columns
    n, n_users = len(ts), len(rows)
    idx = np.arange(n)
    start_of = starts[user_sorted]
    has = key > 0

    # Spans: an event in a later span than any of its user's before opens one (a late event counts in the current).
    span = ts // contest.span_ms
    stored_span = columns[span_column][rows].astype(np.int64)
    current = _running_max_within(span, user_sorted, stored_span)
    before_it = np.r_[-1, current[:-1]]
    before_it[starts] = stored_span
    opened = span > before_it
    opened_at = np.flatnonzero(opened)

    # Recency's guess where a span opens: the latest categorised event before it (this batch's, unless it came late,
    # older than the user's latest before the batch; else the stored one).
    before = np.r_[-1, np.maximum.accumulate(np.where(has, idx, -1))[:-1]][opened_at]
    user_at = user_sorted[opened_at]
    in_time = (before >= start_of[opened_at]) & (ts[np.maximum(before, 0)] >= old_last_ts[user_at])
    recent = np.where(in_time, key[np.maximum(before, 0)], columns["last_category"][rows].astype(np.int64)[user_at])

    # The counts' guess where a span opens: the most engaged-with category so far: the slots' best, or, where the
    # span opens after the user's first event of the batch (a batch spanning a span's end), the best of the slots'
    # counts plus the batch's events before it.
    usual = stored_best[user_at]
    mid_batch = np.flatnonzero(opened_at != start_of[opened_at])
    if len(mid_batch):
        usual[mid_batch] = np.maximum(usual[mid_batch], _best_before(opened_at[mid_batch], start_of, user_sorted, key,
                                                                     has, slot_keys, slot_counts))
    guesses = np.stack([recent, usual & 0xFFFFFFFF], axis=1)  # (M, 2): recency's and the counts' guess

    # Each event's span: the stored one or the one its latest opening event began, with that event's guesses.
    opener = np.maximum.accumulate(np.where(opened, idx, -1))
    in_batch = opener >= start_of
    nth = np.cumsum(opened) - 1  # each event's latest opening, as a row of guesses
    opening = guesses[np.maximum(nth, 0)] if len(guesses) else np.zeros((n, 2), dtype=np.int64)
    guess = np.where(in_batch[:, None], opening, columns[keys_column][rows].astype(np.int64)[user_sorted])
    hit = np.where(has, (key == guess[:, 0]) * 1 + (key == guess[:, 1]) * 2, 0).astype(np.uint8)

    # The spans this batch closes: the stored one where the user opened a new one, and every opened one but the last.
    stored_hits = columns[hits_column][rows].copy()
    np.bitwise_or.at(stored_hits, user_sorted[~in_batch], hit[~in_batch])
    opened_hits = np.zeros(n, dtype=np.uint8)
    np.bitwise_or.at(opened_hits, opener[in_batch], hit[in_batch])
    last_open = np.full(n_users, -1, dtype=np.int64)
    np.maximum.at(last_open, user_sorted[opened], idx[opened])
    reopened = last_open >= 0
    # Each user's latest closed span: the last opened here but one, else the stored one where a new one opened.
    closed = opened_at != last_open[user_sorted[opened_at]]
    closed_at = opened_at[closed]
    last_closed = np.full(n_users, -1, dtype=np.int64)  # each user's latest of closed_at, as its index there
    np.maximum.at(last_closed, user_sorted[closed_at], np.arange(len(closed_at)))
    stored_closes = reopened & (last_closed < 0) & (stored_span > 0)
    here = last_closed >= 0
    columns[last_column][rows[stored_closes]] = _outcome(columns[keys_column][rows[stored_closes]].astype(np.int64),
                                                         stored_hits[stored_closes])
    columns[last_span_column][rows[stored_closes]] = stored_span[stored_closes]
    at = closed_at[last_closed[here]]
    columns[last_column][rows[here]] = _outcome(guesses[closed][last_closed[here]], opened_hits[at])
    columns[last_span_column][rows[here]] = span[at]

    # The span still open: the last one opened, or the stored one with this batch's hits.
    last = last_open[reopened]
    columns[span_column][rows[reopened]] = span[last]
    columns[keys_column][rows[reopened]] = guesses[nth[last]]
    columns[hits_column][rows] = np.where(reopened, opened_hits[np.maximum(last_open, 0)], stored_hits)


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
    offset = user_sorted.astype(np.int64) << 40  # spans since the epoch stay far below 2**40
    return np.maximum.accumulate(np.maximum(values, stored[user_sorted]) + 1 + offset) - 1 - offset


def _outcome(guesses: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """How closed weeks went: 1 where only recency's guess came again, 2 only the counts', 0 otherwise (both, neither,
    one guess for both, or a guess missing)."""
    judged = (guesses[:, 0] > 0) & (guesses[:, 1] > 0) & (guesses[:, 0] != guesses[:, 1])
    return np.where(judged & ((hits == 1) | (hits == 2)), hits, 0).astype(np.uint8)


class ShopHabit:
    """Users by the span of their latest closed span and how it went (recency's guess alone came again, or the
    counts'), over the table's users: on each clock of CONTESTS."""

    def __init__(self) -> None:
        # per clock: span -> [users whose latest closed span it is: recency won, counts won]
        self.spans: tuple[dict[int, list[int]], ...] = tuple({} for _ in CONTESTS)

    @staticmethod
    def parts(columns: dict[str, np.ndarray], rows: np.ndarray | slice) -> tuple[np.ndarray, ...]:
        """These rows' judged latest spans as span * 2 + (outcome - 1), one entry per user with one: per clock."""
        out = []
        for contest in CONTESTS:
            *_, last_column, last_span_column = contest.columns
            outcome = columns[last_column][rows].astype(np.int64)
            judged = outcome > 0
            out.append(columns[last_span_column][rows][judged].astype(np.int64) * 2 + outcome[judged] - 1)
        return tuple(out)

    def rebuild(self, columns: dict[str, np.ndarray], n: int) -> None:
        self.spans = tuple({} for _ in CONTESTS)
        self.change(self.parts(columns, slice(0, n)), 1)

    def change(self, parts: tuple[np.ndarray, ...], sign: int) -> None:
        """Add (sign 1) or take away (sign -1) what `parts` returned for some rows."""
        for spans, part in zip(self.spans, parts):
            if not len(part):
                continue
            distinct, n = np.unique(part, return_counts=True)
            for code, count in zip(distinct.tolist(), (sign * n).tolist()):
                counts = spans.setdefault(code // 2, [0, 0])
                counts[code % 2] += count
                if counts == [0, 0]:
                    del spans[code // 2]

    def wins(self, now_ms: int, contest: Contest = WEEKS) -> tuple[int, int]:
        """(recency's, the counts') among the users whose latest closed span is one of the clock's recent ones."""
        since = now_ms // contest.span_ms - contest.recent_spans
        recent = [counts for span, counts in self.spans[CONTESTS.index(contest)].items() if span >= since]
        return sum(c[0] for c in recent), sum(c[1] for c in recent)

    def evidence(self, now_ms: int, contest: Contest = WEEKS) -> float:
        """Recency's wins less the counts', over all wins and PRIOR_WEEKS: -1 to 1, 0 before any."""
        return evidence(*self.wins(now_ms, contest))

    def leans(self, now_ms: int) -> tuple[float, float]:
        """(toward the latest categories, toward the most engaged-with ones), each 0 to 1: the weeks', but where the
        shop has turned (the two days' evidence TURN or more above the weeks') the larger of the two clocks' lean
        toward the latest categories, and the weeks' toward the counts fading as that one rises."""
        weekly = self.wins(now_ms, WEEKS)
        (toward_latest, toward_counts), weeks = leans(*weekly), evidence(*weekly)
        for contest in CONTESTS[1:]:
            recency, counts = self.wins(now_ms, contest)
            if evidence(recency, counts) - weeks >= TURN:
                toward_latest = max(toward_latest, leans(recency, counts)[0])
        return toward_latest, toward_counts * (1.0 - toward_latest)

    def recency_lean(self, now_ms: int) -> float:
        """How far top_categories leans toward the user's latest categories in this shop now: 0 to 1."""
        return self.leans(now_ms)[0]

    def counts_lean(self, now_ms: int) -> float:
        """How far top_categories leans toward the categories the user engaged with most, in this shop now: 0 to 1."""
        return self.leans(now_ms)[1]


def evidence(recency_weeks: int, counts_weeks: int) -> float:
    """Recency's wins less the counts', over all wins and PRIOR_WEEKS: -1 to 1, 0 before any."""
    return (recency_weeks - counts_weeks) / (recency_weeks + counts_weeks + PRIOR_WEEKS)


def leans(recency_weeks: int, counts_weeks: int) -> tuple[float, float]:
    """(toward the latest categories, toward the most engaged-with ones), each 0 to 1 and at most one above 0, from
    the users' latest weeks won each way."""
    e = evidence(recency_weeks, counts_weeks)
    return (float(np.clip((e - LEAN_FROM) / (LEAN_FULL - LEAN_FROM), 0.0, 1.0)),
            float(np.clip((e - COUNTS_LEAN_FROM) / (COUNTS_LEAN_FULL - COUNTS_LEAN_FROM), 0.0, 1.0)))
