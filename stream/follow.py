"""What follows a purchase in this shop, learned from the users in state: the explore side no sequence
model trained elsewhere can know.

In many shops a purchase sends the user on to a category of its own (a phone, then its cases; a tent,
then sleeping bags). Which one is the shop's own, so a model trained in another shop cannot name it
(on the generator's shops, precision@3 of top_categories could gain ~0.07 over counting from it; see
docs/model-journal.md). Each user's state keeps its part of it (stream/statistics.py): the category of its latest
purchase and the first other category it engaged with after that purchase. `FollowCounts` is the sum of
those pairs over the users in the table, kept exactly as rows change: a pure function of the table, so a
restore, a replay and the daemon agree on it without writing it anywhere (a rebuild from the restored
rows gives the same counts), and it covers the users this member holds.

A profile then reads, for each of the user's categories, P(category | the user's latest purchase's
category) among the other users' pairs (its own left out), and one more candidate: the most frequent
follow-up of that purchase when it is not among the user's own categories (`with_follow_ups`). While the
user has not gone on to another category since the purchase, the same share is read once more as
`follow_pending`: the follow-up still to come.
"""

from __future__ import annotations

import numpy as np

from stream.statistics import HOUR_MS, SLOT_FEATURES

FOLLOW_SHARE = SLOT_FEATURES.index("follow_share")
FOLLOW_FRESH = SLOT_FEATURES.index("follow_fresh")
FOLLOW_PENDING = SLOT_FEATURES.index("follow_pending")
FRESH_HOURS = 7 * 24.0  # follow_fresh = follow_share * exp(-hours since the purchase / FRESH_HOURS)


def _pair_keys(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One uint64 per (purchase key, follow-up key): both are 32-bit."""
    return (a.astype(np.uint64) << np.uint64(32)) | b.astype(np.uint64)


class FollowCounts:
    """Counts of (purchase category, follow-up category) pairs over the table's users."""

    def __init__(self) -> None:
        self.counts: dict[int, dict[int, int]] = {}  # purchase key -> follow-up key -> users

    @staticmethod
    def pairs(columns: dict[str, np.ndarray], rows: np.ndarray | slice) -> np.ndarray:
        """(n,) pair keys of these rows' users; 0 where a user has no follow-up yet."""
        a, b = columns["purchase_category"][rows], columns["follow_category"][rows]
        return np.where((a > 0) & (b > 0), _pair_keys(a, b), np.uint64(0))

    def rebuild(self, columns: dict[str, np.ndarray], n: int) -> None:
        self.counts = {}
        self.change(self.pairs(columns, slice(0, n)), 1)

    def change(self, pairs: np.ndarray, sign: int) -> None:
        """Add (sign 1) or remove (sign -1) these users' pairs."""
        pairs = pairs[pairs != 0]
        if not len(pairs):
            return
        keys, n = np.unique(pairs, return_counts=True)
        for key, count in zip(keys.tolist(), (sign * n).tolist()):
            followers = self.counts.setdefault(key >> 32, {})
            left = followers.get(key & 0xFFFFFFFF, 0) + count
            if left:
                followers[key & 0xFFFFFFFF] = left
            else:
                del followers[key & 0xFFFFFFFF]
                if not followers:
                    del self.counts[key >> 32]

    def replace(self, old: np.ndarray, new: np.ndarray) -> None:
        """Rows whose pairs went from `old` to `new`."""
        changed = old != new
        self.change(old[changed], -1)
        self.change(new[changed], 1)

    def with_follow_ups(self, keys: np.ndarray, feats: np.ndarray, purchase: np.ndarray,
                        hours_since_purchase: np.ndarray, own: np.ndarray,
                        relative_pending: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The users' slots (keys (U, K), features (U, K, F)) with their follow-up features filled in and
        one more slot: the purchase's most frequent follow-up where no slot holds it (else empty).
        purchase: (U,) key of each user's latest purchase's category (0: none); own: (U,) the user's own
        follow-up of it (0: none yet, the follow-up still pending). relative_pending: follow_pending as heads
        fitted before checkpoint format 12 read it (relative to the top follow-up's share, 1 for it).

        Leave one out: a user's own pair is taken out of the counts it reads, so the shares say what the
        shop's other users did (a user alone with a rarely bought category would otherwise read its own
        follow-up as the shop's certain one)."""
        u, k = keys.shape
        keys = np.concatenate([keys, np.zeros((u, 1), dtype=keys.dtype)], axis=1)
        feats = np.concatenate([feats, np.zeros((u, 1, feats.shape[2]), dtype=feats.dtype)], axis=1)
        distinct = [a for a in np.unique(purchase[purchase > 0]).tolist() if a in self.counts]
        if not distinct:
            return keys, feats
        n = len(distinct)
        table_keys, table_counts = [], []
        total, best, best_count = np.zeros(n), np.zeros(n, np.int64), np.zeros(n)
        second, second_count = np.zeros(n, np.int64), np.zeros(n)
        for i, a in enumerate(distinct):  # one pass per purchased category in the batch, not per user
            followers = self.counts[a]
            b = np.fromiter(followers, dtype=np.int64, count=len(followers))
            c = np.fromiter(followers.values(), dtype=np.float64, count=len(followers))
            table_keys.append(_pair_keys(np.full(len(b), a), b))
            table_counts.append(c)
            ranked = np.lexsort((b, -c))  # ties: the smallest key (not the dict's order, which a rebuild changes)
            total[i], best[i], best_count[i] = c.sum(), b[ranked[0]], c[ranked[0]]
            if len(ranked) > 1:
                second[i], second_count[i] = b[ranked[1]], c[ranked[1]]
        order = np.argsort(np.concatenate(table_keys))
        pair_keys, counts = np.concatenate(table_keys)[order], np.concatenate(table_counts)[order]
        distinct = np.asarray(distinct)
        which = np.searchsorted(distinct, purchase).clip(max=n - 1)
        has = (purchase > 0) & (distinct[which] == purchase)
        mine = has & (own > 0)  # the user's own pair is among the counts: take it out
        others = np.where(has, total[which] - mine, 0.0)  # (U,) the other users' follow-ups of the purchase

        def share_of(candidates: np.ndarray) -> np.ndarray:
            """(U, C) the other users' share of each candidate follow-up key (0: none)."""
            query = np.where(candidates > 0, _pair_keys(np.broadcast_to(purchase[:, None], candidates.shape),
                                                        candidates), np.uint64(0))  # no pair is 0
            at = np.searchsorted(pair_keys, query).clip(max=len(pair_keys) - 1)
            c = np.where(pair_keys[at] == query, counts[at], 0.0) - (mine[:, None] & (candidates == own[:, None]))
            return np.where(others[:, None] > 0, c / np.maximum(others, 1.0)[:, None], 0.0)

        share = share_of(keys[:, :k])
        fresh = np.exp(-np.maximum(hours_since_purchase, 0.0) / FRESH_HOURS)[:, None]
        feats[:, :k, FOLLOW_SHARE] = share
        feats[:, :k, FOLLOW_FRESH] = share * fresh
        # The purchase's most frequent follow-up among the other users: the runner-up where the user's own
        # pair made the top one (and without it the runner-up leads, or ties with the smaller key).
        best, best_count, second, second_count = best[which], best_count[which], second[which], second_count[which]
        demoted = mine & (own == best) & ((best_count - 1 < second_count) |
                                          ((best_count - 1 == second_count) & (second < best)))
        top = np.where(demoted, second, np.where(has, best, 0))
        top_share = share_of(top[:, None])[:, 0]
        # Pending (no follow-up yet: the user's own pair is not among the counts): the share itself, so that it
        # says how sure the shop's follow-up is. Relative to the top follow-up (1 for it, as heads before format
        # 12 read it), a shop without follow-ups of its own still had a top one at full strength: its most
        # popular category, put among every new buyer's top categories (the classic shop, docs/model-journal.md).
        pending = (own == 0).astype(share.dtype)
        if relative_pending:
            pending = np.where(top_share > 0, pending / np.maximum(top_share, 1e-12), 0.0)
        feats[:, :k, FOLLOW_PENDING] = share * pending[:, None]
        held = (keys[:, :k] == top[:, None]).any(axis=1)
        extra = has & ~held & (top > 0) & (top_share > 0)
        keys[extra, k] = top[extra]
        feats[extra, k, FOLLOW_SHARE] = top_share[extra]
        feats[extra, k, FOLLOW_FRESH] = top_share[extra] * fresh[extra, 0]
        feats[extra, k, FOLLOW_PENDING] = (top_share * pending)[extra]
        return keys, feats


def hours_since(now_ms: int | np.ndarray, at_ms: np.ndarray) -> np.ndarray:
    return np.where(at_ms >= 0, (np.asarray(now_ms, dtype=np.float64) - at_ms) / HOUR_MS, np.inf)
