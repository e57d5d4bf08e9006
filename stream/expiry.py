"""State that expires (`--state-ttl`): which users have been idle longer than the TTL, in event time.

The rule is per user and needs no wall clock: a user whose last event is more than the TTL older than
the event time of its input partition (the largest event time read from that partition, over the input
topics; one clock for file sources) is expired: dropped from the table, with a changelog tombstone and,
with `--on-expire publish`, a last profile that says `"expired": true`. A user whose next event comes
more than the TTL after its previous one was expired in between, so it starts from a fresh state even
where no scan dropped it yet (both events in one batch, or the scan not yet due): the outcome does not
depend on batch boundaries. A clock per partition, not one for the instance: while a member catches
up a backlog, one partition can be days of event time ahead of another, and its clock must not expire
the users of the one behind.

Finding the idle users is one numpy comparison over the table's `last_ts` column, run at most once per
batch and only when some partition's clock moved a tick (TTL / TICKS_PER_TTL) since the last scan, so a
user is dropped at most a tick after its TTL passed; and once more when the input goes quiet (the
daemon polls nothing) or a replay ends, so that the state then holds exactly the users within the TTL
(docs/operations.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.state import StateTable

TICKS_PER_TTL = 100  # scan the table when a partition's event time moved TTL / 100 since the last scan
# Users expired by one scan at most (their last profiles are encoded at once, as the end of a replay's are
# in chunks); more wait for the next batch, whose scan is then due whatever the clocks did.
EXPIRE_PER_PASS = 50_000

Profiles = list[tuple[bytes, bytes]]


@dataclass
class Expired:
    """Users a batch expired: (user id, input partition or -1) for the changelog tombstones, and their last
    profiles (with `"expired": true`; empty with --on-expire drop), in the order they expired."""

    users: list[tuple[str, int]] = field(default_factory=list)
    profiles: Profiles = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.users)

    def __iadd__(self, other: Expired) -> Expired:
        self.users += other.users
        self.profiles += other.profiles
        return self

    def of_partitions(self, owned: set[int]) -> Expired:
        """The users of these input partitions (and those not from Kafka) with their profiles."""
        keep = {user for user, p in self.users if p < 0 or p in owned}
        return Expired([(u, p) for u, p in self.users if u in keep],
                       [(k, v) for k, v in self.profiles if k.decode("utf-8", "surrogatepass") in keep])


class StateExpiry:
    """The expiry rule over one state table: event-time clocks per input partition, the scan, and the
    restarts of users who come back after more than the TTL."""

    def __init__(self, state: StateTable, ttl_ms: int) -> None:
        self.state = state
        self.ttl_ms = ttl_ms
        self.tick_ms = max(ttl_ms // TICKS_PER_TTL, 1)
        self.clock = np.full(1, -1, dtype=np.int64)  # [partition + 1]: largest event time read; [0]: files
        self._scanned = np.full(1, -1, dtype=np.int64)  # the clocks at the last scan

    def advance(self, partitions: np.ndarray, ts: np.ndarray) -> None:
        """Applied events' input partitions (-1: not from Kafka) and event times move the clocks."""
        if not len(ts):
            return
        slots = partitions + 1
        if slots.max() >= len(self.clock):
            grown = np.full(int(slots.max()) + 1, -1, dtype=np.int64)
            grown[: len(self.clock)] = self.clock
            self.clock = grown
        np.maximum.at(self.clock, slots, ts)

    def idle_rows(self, force: bool = False, settle: bool = False) -> np.ndarray:
        """Rows of the users idle for longer than the TTL at their partition's clock, ascending. Empty
        unless a clock moved a tick since the last scan, or at all with `settle` (the input went quiet), or
        `force` (the end of a replay)."""
        state, clock = self.state, self.clock
        if len(state) == 0 or not (force or self._due(self.tick_ms) or settle and self._due(1)):
            return np.empty(0, dtype=np.int64)
        n = len(state)
        slot = state.partition[:n] + 1
        now = np.full(n, -1, dtype=np.int64)
        known = slot < len(clock)  # users restored on a partition no event was read from yet: no clock
        now[known] = clock[slot[known]]
        last = state.last_ts[:n]
        rows = np.flatnonzero((last >= 0) & (now >= 0) & (now - last > self.ttl_ms))
        if len(rows) <= EXPIRE_PER_PASS:
            self._scanned = clock.copy()  # else the next scan is due at once, for the rest
        return rows[:EXPIRE_PER_PASS]

    def _due(self, tick_ms: int) -> bool:
        """Whether a partition's clock started, or moved `tick_ms`, since the last scan."""
        scanned = np.full(len(self.clock), -1, dtype=np.int64)
        scanned[: len(self._scanned)] = self._scanned
        return bool(((self.clock >= 0) & ((scanned < 0) | (self.clock - scanned >= tick_ms))).any())

    def segments(self, rows: np.ndarray, ts: np.ndarray, record_index: np.ndarray) -> np.ndarray | None:
        """For events about to be applied: how many times its user restarted (a gap of more than the TTL
        since the user's previous event, in event-time order, the state's last event first) up to and
        including each event. None when no event restarts (the common case, found in O(events))."""
        state, ttl = self.state, self.ttl_ms
        if not len(ts):
            return None
        last = state.last_ts[rows]
        if not ((last >= 0) & (ts - last > ttl)).any() and int(ts.max()) - int(ts.min()) <= ttl:
            return None
        order = np.lexsort((record_index, ts, rows))  # as the state step orders a user's events
        r, t = rows[order], ts[order]
        first = np.r_[True, r[1:] != r[:-1]]
        previous = np.empty_like(t)
        previous[1:] = t[:-1]
        previous[first] = state.last_ts[r[first]]
        restart = (previous >= 0) & (t - previous > ttl)
        if not restart.any():
            return None
        total = np.cumsum(restart)
        starts = np.flatnonzero(first)
        before_user = total[starts] - restart[starts]  # restarts counted before each user's first event
        lengths = np.diff(np.r_[starts, len(t)])
        segment = np.empty(len(t), dtype=np.int64)
        segment[order] = total - np.repeat(before_user, lengths)
        return segment

    def reset(self, rows: np.ndarray) -> None:
        """These users start afresh in their rows: zero state, counters and bookkeeping as a new user's."""
        self.state.reset_rows(rows)
