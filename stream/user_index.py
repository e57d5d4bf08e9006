"""The state table's index, user id -> row, held in numpy arrays rather than a dict of strings.

Open addressing with linear probing over a power-of-two array of 64-bit slots, kept at most half
full, keyed by Python's hash of the id (64-bit SipHash, salted per process: the index lives in
memory only and is rebuilt wherever the table is; a str caches its hash). A slot holds the row + 1
(0: empty) in its low 32 bits and the high 32 bits of the id's hash in its high ones, so a probe
rarely has to look at an id that is not the one looked up; a row is taken only where its id equals
that one, so two ids whose hashes collide stay two users. A batch of lookups or inserts is a few
array operations per probe round; the last few stragglers of a long probe finish in a plain loop.

Per user it holds a reference to its id (8 bytes, an object array beside the table's list, for
comparisons in bulk) and two to four 8-byte slots, where a dict held its entry, its slot and the
row's int object (about 65 bytes per user at 10M users).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_SLOTS = 1024
STRAGGLERS = 16  # fewer lookups than this still probing: finish them one by one
ROW_BITS = np.int64(0xFFFFFFFF)


def hashes_of(users: Sequence[str]) -> np.ndarray:
    return np.fromiter(map(hash, users), dtype=np.int64, count=len(users))


def objects(users: Sequence[str]) -> np.ndarray:
    """The ids as a 1-D object array (as given, if they are one)."""
    if isinstance(users, np.ndarray) and users.dtype == object and users.ndim == 1:
        return users
    # Never np.array(values): it would make ragged lists 2-D; fromiter neither looks into the values.
    return np.fromiter(users, dtype=object, count=len(users))


class UserIndex:
    """Row of each id: row i holds the i-th id added (or kept)."""

    def __init__(self) -> None:
        self.rebuild([])

    def rebuild(self, ids: Sequence[str]) -> None:
        """Index `ids` from scratch, row i for ids[i]."""
        n = len(ids)
        self.n = n
        self.names = np.empty(max(n, MIN_SLOTS // 2), dtype=object)
        self.names[:n] = objects(ids)
        self.slots = np.zeros(_slots_for(n), dtype=np.int64)
        self._place(np.arange(n, dtype=np.int64), hashes_of(self.names[:n]))

    def keep(self, rows: np.ndarray) -> None:
        """The table kept these rows (ascending), now numbered 0..len(rows)-1."""
        self.rebuild(self.names[rows])

    def get(self, user: str) -> int | None:
        h = hash(user)
        found = self._probe_one(user, h >> 32, h & (len(self.slots) - 1))
        return None if found < 0 else found

    def rows(self, users: Sequence[str], hashes: np.ndarray | None = None) -> np.ndarray:
        """Row of each user, -1 where absent."""
        users = objects(users)
        h = hashes_of(users) if hashes is None else hashes
        out = np.full(len(users), -1, dtype=np.int64)
        active, high = np.arange(len(users)), h >> 32
        mask = len(self.slots) - 1
        pos = h & mask
        while len(active) >= STRAGGLERS:
            slot = self.slots[pos]
            probing = slot != 0  # an empty slot ends the probe: absent
            same = np.flatnonzero(probing & ((slot >> 32) == high))
            if len(same):
                row = (slot[same] & ROW_BITS) - 1
                equal = users[active[same]] == self.names[row]
                out[active[same[equal]]] = row[equal]
                probing[same[equal]] = False
            active, high, pos = active[probing], high[probing], (pos[probing] + 1) & mask
        for i, p in zip(active.tolist(), pos.tolist()):
            out[i] = self._probe_one(users[i], int(h[i]) >> 32, p)
        return out

    def add(self, users: Sequence[str], hashes: np.ndarray) -> None:
        """Index these ids (none of them indexed yet) as the next rows."""
        first, n = self.n, self.n + len(users)
        if n > len(self.names):
            grown = np.empty(max(n, 2 * len(self.names)), dtype=object)
            grown[:first] = self.names[:first]
            self.names = grown
        self.names[first:n] = objects(users)
        self.n = n
        if _slots_for(n) > len(self.slots):
            self.slots = np.zeros(_slots_for(n), dtype=np.int64)
            self._place(np.arange(n, dtype=np.int64), hashes_of(self.names[:n]))
        else:
            self._place(np.arange(first, n, dtype=np.int64), hashes)

    def _place(self, rows: np.ndarray, hashes: np.ndarray) -> None:
        """Put these rows in free slots along their probe sequences."""
        mask = len(self.slots) - 1
        pos, value = hashes & mask, ((hashes >> 32) << 32) | (rows + 1)
        while len(value):
            free = np.flatnonzero(self.slots[pos] == 0)
            self.slots[pos[free]] = value[free]  # rows aiming at one free slot: one of them lands there...
            placed = np.zeros(len(value), dtype=bool)
            placed[free] = self.slots[pos[free]] == value[free]  # ...and the others go on probing
            value, pos = value[~placed], (pos[~placed] + 1) & mask

    def _probe_one(self, user: str, high: int, pos: int) -> int:
        slots, names, mask = self.slots, self.names, len(self.slots) - 1
        while True:
            slot = int(slots[pos])
            if slot == 0:
                return -1
            if slot >> 32 == high and names[(slot & 0xFFFFFFFF) - 1] == user:
                return (slot & 0xFFFFFFFF) - 1
            pos = (pos + 1) & mask


def _slots_for(n: int) -> int:
    """A power of two at least twice n (the table at most half full)."""
    return max(MIN_SLOTS, 1 << int(2 * n - 1).bit_length()) if n else MIN_SLOTS


def distinct(users: Sequence[str], at: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids among users[at], in order of first appearance: their positions in `users`, and
    for each of `at` the number of its id among them. `hashes`: of every id in `users`."""
    _, firsts, inverse = np.unique(hashes[at], return_index=True, return_inverse=True)
    if len(firsts) < len(at):  # repeated hashes: the same ids, unless two ids share a hash
        users = objects(users)
        if not (users[at] == users[at[firsts[inverse]]]).all():
            return _distinct_by_dict(users, at)
    order = np.argsort(firsts)
    rank = np.empty(len(firsts), dtype=np.int64)
    rank[order] = np.arange(len(firsts))
    return at[firsts[order]], rank[inverse]


def _distinct_by_dict(users: Sequence[str], at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    number: dict[str, int] = {}
    of = np.fromiter((number.setdefault(users[i], len(number)) for i in at.tolist()), dtype=np.int64, count=len(at))
    return at[np.unique(of, return_index=True)[1]], of
