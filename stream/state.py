"""The state table: user -> model state + exact counters, behind a small interface.

A user's model state is the GRU's hidden state followed by its long-term memory (S = H + M
floats, models/profile_model.py). States live in one (capacity, S) tensor on the model's
device; counters live in numpy arrays on the host. Both grow by doubling, so the cost of a
batch depends on the users it touches, not on how many users are in state.

`snapshot()` / `restore()` exchange plain data (numpy arrays, lists, dicts) for
local snapshots; `changelog_values()` / `changelog_loader()` exchange one fixed-layout
binary record per user for the state changelog topic (stream/changelog_records.py: packed
and loaded with numpy, many users at once).

Users are found by id in stream/user_index.py (numpy arrays, not a dict of strings).

Exactly-once bookkeeping lives in the table too: per user, the input partition its
events come from, a watermark per input topic (the offset of the last event applied),
and a ring of the hashes of its last event ids (duplicate redeliveries).

A replayed snapshot can sit under the table as its base (`profiles run --restore-from`):
a member takes only the users of the partitions it owns from it, and the changelog on top.
"""

from __future__ import annotations

import itertools

import os
from typing import Iterable, Sequence

import numpy as np
import torch

from stream.changelog_records import ChangelogLoader, numpy_dtype, pack, record_dtype
from stream.events import EVENT_TYPES
from stream.follow import FollowCounts
from stream.popularity import HolderCounts
from stream.habit import ShopHabit
from stream.outcomes import ANCHOR_COLUMNS, Outcomes
from stream.tempo import ShopTempo
from stream.statistics import STAT_COLUMNS, unheld_keys
from stream.user_index import UserIndex, distinct, hashes_of, objects

SNAPSHOT_FORMAT = 6  # 2: category slots and names by category key (1: by the model's bucket); 3: visit counts;
# 4: the in-visit gaps' log minutes (stream/tempo.py); 5: the purchase rhythm (stream/statistics.py: orders);
# 6: the shop's habit (stream/habit.py)


# Host columns of the state: name -> (dtype, trailing shape, initial value).
COLUMNS: dict[str, tuple[type, tuple[int, ...], float]] = {
    "counts": (np.int64, (len(EVENT_TYPES),), 0),  # exact event counts by type
    # Spend in integer micro-units: exact and independent of summation order (batching invariance).
    "spend_micros": (np.int64, (), 0),
    "last_ts": (np.int64, (), -1),  # latest event time; -1: no event yet
    "price_sum": (np.float64, (), 0.0),  # for the mean engaged price -> price tier
    "price_n": (np.int64, (), 0),
    "scored_at": (np.int64, (), -1),  # event-time clock when the user's profile was last published
    **STAT_COLUMNS,  # the behaviour statistics the field heads read (stream/statistics.py)
    **ANCHOR_COLUMNS,  # the user's records of the calibration anchors whose windows are open (stream/outcomes.py)
}


class StateTable:
    def __init__(self, state_size: int, device: torch.device, capacity: int = 1024, *, watermark_slots: int = 0,
                 dedupe_window: int = 0, recent_items: int = 0, unpublished: bool = False,
                 state_dtype: torch.dtype = torch.float32) -> None:
        self.state_size = state_size
        # float16 halves the model state's bytes per user (10M users: 1.6 GB less); the step computes in
        # float32 and rounds the new states to it when they are stored.
        self.state_dtype = state_dtype
        self.device = device
        self.watermark_slots = watermark_slots
        self.dedupe_window = dedupe_window
        self.spec = {
            **COLUMNS,
            "partition": (np.int64, (), -1),  # input partition of the user's events (-1: not from Kafka)
            "watermark": (np.int64, (watermark_slots,), -1),  # per input topic: offset of the last applied event
            "recent_ids": (np.uint64, (dedupe_window,), 0),  # hashes of the last event ids, a ring...
            "recent_n": (np.int64, (), 0),  # ...filled this far (events applied, ever)
            # The next-item vocabulary rows of the items of the user's latest events, latest first (-1: none),
            # which the next-item scores' bonuses read (models/neighbours.py: RECENT_ITEMS of them); kept
            # (4 bytes each per user) only when profiles publish next_items.
            "recent_items": (np.int32, (recent_items,), -1),
            # 1: the user's state changed since its last published profile (--publish-interval defers it); kept
            # in the changelog (1 byte per user, only with the interval) so a restore publishes it too.
            "unpublished": (np.int8, (int(unpublished),), 0),
        }
        self.user_ids: list[str] = []
        self._index = UserIndex()  # user id -> row (stream/user_index.py)
        self.states = _room(capacity, state_size, device, state_dtype)  # (capacity, S): GRU hidden state + memory
        self.columns = {name: _column(self.spec[name], capacity) for name in self.spec}
        # Category key (models.features.category_keys) -> the category string, so top_categories can name
        # categories as they appear in events (its keys: the categories seen, less those an erasure left
        # unheld; see drop_unengaged_categories).
        self.category_names: dict[int, str] = {}
        # What the shop's users do, counted over the table's users (a pure function of it: see recount).
        self.follow = FollowCounts()  # what follows a purchase (stream/follow.py)
        self.holders = HolderCounts()  # how many users hold each category (stream/popularity.py)
        self.tempo = ShopTempo()  # how fast the users move within a visit (stream/tempo.py)
        self.habit = ShopHabit()  # whether users come back to their latest categories or usual ones (stream/habit.py)
        self.outcomes = Outcomes()  # what followed the published probabilities (stream/outcomes.py)
        self.categories_version = 0  # bumped whenever category_names changes (the changelog re-sends it)
        self.max_event_ts = -1  # largest event time seen: the clock of event-time timers
        self._seen_cache: torch.Tensor | None = None
        self.base: SnapshotBase | None = None  # a replayed snapshot under the table (see attach_base)

    # Named views of the columns, for readers of the pipeline.
    counts = property(lambda self: self.columns["counts"])
    spend_micros = property(lambda self: self.columns["spend_micros"])
    last_ts = property(lambda self: self.columns["last_ts"])
    price_sum = property(lambda self: self.columns["price_sum"])
    price_n = property(lambda self: self.columns["price_n"])
    scored_at = property(lambda self: self.columns["scored_at"])
    partition = property(lambda self: self.columns["partition"])
    watermark = property(lambda self: self.columns["watermark"])
    recent_ids = property(lambda self: self.columns["recent_ids"])
    recent_n = property(lambda self: self.columns["recent_n"])

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def capacity(self) -> int:
        return len(self.states)

    def row(self, user: str) -> int | None:
        """The user's row, or None if the user is not in state."""
        return self._index.get(user)

    def find_rows(self, users: Sequence[str]) -> np.ndarray:
        """Row of each user, -1 where the user is not in state (none is added)."""
        return self._index.rows(users)

    def ids_at(self, rows: np.ndarray) -> np.ndarray:
        """The users of these rows, as an object array."""
        return self._index.names[rows]

    def rows_for(self, users: Iterable[str], from_base: bool = True) -> np.ndarray:
        """Row of each user, adding rows for users not yet in state (in order of first appearance),
        filled from the base snapshot where it has them (unless the caller overwrites them anyway)."""
        users = objects(users if isinstance(users, (list, np.ndarray)) else list(users))
        hashes = hashes_of(users)
        rows = self._index.rows(users, hashes)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            new, rows[missing] = distinct(users, missing, hashes)  # first appearance first
            first = len(self.user_ids)
            rows[missing] += first
            new_users = users[new].tolist()
            self.user_ids.extend(new_users)
            self._index.add(new_users, hashes[new])
            self._ensure_capacity(len(self.user_ids))
            self._initialise(first, len(self.user_ids))
            if self.base is not None and from_base:
                self._copy_from_base(new_users, np.arange(first, first + len(new_users)))
        return rows

    def reset_rows(self, rows: np.ndarray) -> None:
        """These users start afresh in their rows (a return after --state-ttl): zero state, counters and
        bookkeeping as a new user's; their part of the shop's counts goes with them."""
        self.count_rows(rows, -1)
        self.states[torch.from_numpy(rows).to(self.device)] = 0
        for name, (_, _, initial) in self.spec.items():
            self.columns[name][rows] = initial

    def count_rows(self, rows: np.ndarray, sign: int) -> None:
        """Add (sign 1) or take away (sign -1) these rows' users in the shop's counts (follow-ups, holders, pace,
        habit)."""
        self.follow.change(FollowCounts.pairs(self.columns, rows), sign)
        self.holders.change(self.columns["cat_key"][rows], sign)
        self.tempo.change(ShopTempo.parts(self.columns, rows), sign)
        self.habit.change(ShopHabit.parts(self.columns, rows), sign)

    def recount(self) -> None:
        """The shop's counts from the table's rows (after a restore wrote them)."""
        self.follow.rebuild(self.columns, len(self))
        self.holders.rebuild(self.columns, len(self))
        self.tempo.rebuild(self.columns, len(self))
        self.habit.rebuild(self.columns, len(self))

    def _initialise(self, start: int, stop: int) -> None:
        """Rows start..stop-1, new to users: zero states and each column's initial value (see _room)."""
        (self.states.numpy() if self.device.type == "cpu" else self.states)[start:stop] = 0
        for name, (_, _, initial) in self.spec.items():
            self.columns[name][start:stop] = initial

    # ------------------------------------------------------------------ a snapshot as the base

    def attach_base(self, snap: dict, topics: Iterable[str] | None, input_topics: Iterable[str]) -> int:
        """Put a replayed snapshot under the table; returns its number of users.

        Its users enter the table when the partition the snapshot records for them is assigned
        (`load_base_partitions`), or, where it records none (a replay of files), at their first
        event: only the member that owns a user ever holds it, whatever the producers' partitioner.
        `topics` are the snapshot's watermark slots by input topic (None: an older snapshot, whose
        slots are taken to be the daemon's own when their number matches).
        """
        if snap.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(_snapshot_format_error(snap))
        self.base = SnapshotBase(snap, self.spec, topics, list(input_topics))
        self.merge_category_names({int(k): v for k, v in snap["category_names"].items()})
        self.max_event_ts = max(self.max_event_ts, int(snap["max_event_ts"]))
        # The shop's outcomes as the replay counted them: a calibration from the first batch on.
        self.outcomes = Outcomes.from_plain(snap.get("outcomes"), int(snap["max_event_ts"]))
        return len(self.base.user_ids)

    def load_base_partitions(self, partitions: Iterable[int]) -> int:
        """Copy the base's users of these input partitions into the table (those not in it yet:
        the table's state is newer). Returns how many."""
        if self.base is None:
            return 0
        users = self.base.users_of(partitions)
        users = [users[i] for i in np.flatnonzero(self._index.rows(users) < 0).tolist()]
        self.rows_for(users)  # new rows are filled from the base
        return len(users)

    def _copy_from_base(self, users: list[str], rows: np.ndarray) -> None:
        found, base_rows = self.base.lookup(users)
        if not len(found):
            return
        rows = rows[found]
        self.states[torch.from_numpy(rows).to(self.device)] = torch.from_numpy(
            self.base.states[base_rows]).to(self.device, self.state_dtype)
        for name, column in self.columns.items():
            column[rows] = self.base.columns[name][base_rows]
        self.count_rows(rows, 1)  # the rows were new: nothing to take away

    def reserve(self, users: int) -> None:
        """Room for up to this many more users at once (a restore: the changelog's record count). On the CPU
        only, where unused rows cost no memory (see _room), and within half the machine's memory."""
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if self.device.type == "cpu" and users * self.record_dtype().itemsize < memory // 2:
            self._ensure_capacity(len(self) + users)

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity)
        grown = _room(new, self.state_size, self.device, self.state_dtype)
        grown[: self.capacity] = self.states
        self.states = grown
        for name, old in self.columns.items():
            column = _column(self.spec[name], new)
            column[: len(old)] = old
            self.columns[name] = column

    def remember_categories(self, keys: np.ndarray, names: np.ndarray) -> None:
        """Record the category string of each key (key 0 = no category).

        Two categories whose 32-bit keys collide (about one pair among 90,000 categories) share the
        name of the smaller string: a rule that does not depend on arrival order or batch boundaries.
        """
        keep = keys > 0
        if not keep.any():
            return
        seen: dict[int, str] = {}
        for name, key in dict(zip(names[keep].tolist(), keys[keep].tolist())).items():  # distinct names
            if key not in seen or name < seen[key]:
                seen[key] = name
        self.merge_category_names(seen)

    def merge_category_names(self, names: dict[int, str]) -> None:
        """Name keys (from a batch, or a restored changelog) by the smallest-name rule."""
        known = self.category_names
        for bucket, name in names.items():
            current = known.get(bucket)
            if current is None or name < current:
                known[bucket] = name
                self._seen_cache = None  # the seen buckets or their names changed
                self.categories_version += 1

    # ------------------------------------------------------------------ changelog records

    def record_dtype(self) -> np.dtype:
        """The packed layout of one user's changelog record (stream/changelog_records.py)."""
        return record_dtype(self.state_size, self.spec, self.state_dtype)

    def changelog_values(self, rows: np.ndarray) -> list[bytes]:
        """One binary record per row (the user's whole state), packed for all rows at once."""
        return pack(self, rows)

    def changelog_loader(self) -> ChangelogLoader:
        """A loader of changelog records read from the beginning, batch by batch, into this table."""
        return ChangelogLoader(self)

    def load_changelog(self, latest: dict[bytes, bytes | None]) -> int:
        """Upsert users from their latest changelog records (user id bytes -> record; None = erased).
        Returns the number of users loaded. Raises ValueError on records of another layout."""
        loader = ChangelogLoader(self)
        loader.add(list(latest), list(latest.values()), np.zeros(len(latest), dtype=np.int64))
        return loader.finish()

    def drop_rows(self, drop: np.ndarray) -> None:
        """Remove the rows where `drop` (a boolean mask over the users) is true; the rest keep their order.

        In place while the table stays at least half full: the kept rows after the first dropped one
        move down a chunk at a time, into memory the table already has (a copy into new arrays spends
        most of its time faulting in fresh pages). Below half full, into smaller arrays: memory goes back.
        """
        n = len(self)
        gone = np.flatnonzero(drop[:n])
        if not len(gone):
            return
        keep = np.flatnonzero(~drop[:n])
        self.count_rows(gone, -1)
        self._index.keep(keep)
        self.user_ids = self._index.names[: len(keep)].tolist()
        if 2 * len(keep) >= self.capacity:
            first = int(gone[0])  # rows before it stay where they are
            states = self.states.numpy() if self.device.type == "cpu" else self.states
            for table in (states, *self.columns.values()):
                _move_down(table, keep[first:], first)
            return
        cap = max(1024, len(keep))
        states = _room(cap, self.state_size, self.device, self.state_dtype)
        states[: len(keep)] = self.states[torch.from_numpy(keep).to(self.device)]
        self.states = states
        for name, column in self.columns.items():
            fresh = _column(self.spec[name], cap)
            fresh[: len(keep)] = column[keep]
            self.columns[name] = fresh

    def drop_partitions(self, partitions: Iterable[int]) -> int:
        """Drop the users of these input partitions (given up in a rebalance); returns how many."""
        n = len(self)
        partitions = set(partitions)
        drop = np.isin(self.partition[:n], np.fromiter(partitions, dtype=np.int64))
        self.drop_rows(drop)
        self.outcomes.drop_partitions(partitions)
        return int(drop.sum())

    def forget(self, users: Iterable[str]) -> set[str]:
        """Erase these users (right to erasure); returns those that were in state (or in the snapshot base).
        The names of categories no remaining user holds go with them (drop_unengaged_categories)."""
        found = self._drop_users(users)
        self.drop_unengaged_categories()
        return found

    def _drop_users(self, users: Iterable[str]) -> set[str]:
        users = list(users)
        rows = self._index.rows(users)
        found = {users[i] for i in np.flatnonzero(rows >= 0).tolist()}
        if self.base is not None:
            found |= self.base.discard(users)  # or their first event after the erasure would bring them back
        drop = np.zeros(len(self), dtype=bool)
        drop[rows[rows >= 0]] = True
        self.drop_rows(drop)
        return found

    def drop_unengaged_categories(self) -> list[int]:
        """Drop the names of the categories that no user holds (statistics.unheld_keys), of the table or
        still in the base snapshot: a category only an erased user brought leaves the category list, the
        snapshot and the changelog's meta record (re-sent: the version moves). Returns the keys dropped."""
        holders = [(self.columns, slice(0, len(self)))]
        if self.base is not None:
            holders.append((self.base.columns, np.fromiter(self.base.index.values(), dtype=np.int64)))
        gone = unheld_keys(np.fromiter(self.category_names, dtype=np.int64), holders).tolist()
        for key in gone:
            del self.category_names[key]
        if gone:
            self._seen_cache = None
            self.categories_version += 1
        return gone

    def seen_categories(self) -> torch.Tensor:
        """(S,) keys of the categories seen and still named, ascending; cached until they change."""
        if self._seen_cache is None:
            keys = sorted(self.category_names)
            self._seen_cache = torch.tensor(keys, dtype=torch.long, device=self.device)
            self._seen_names = np.array([self.category_names[k] for k in keys] or [""], dtype=object)
        return self._seen_cache

    def seen_category_names(self) -> np.ndarray:
        """(S,) the category names of seen_categories(), aligned with it."""
        self.seen_categories()
        return self._seen_names

    def state_bytes(self) -> dict[str, int]:
        """Bytes held by the state, by device."""
        n = len(self)
        out = {"host": sum(column[:n].nbytes for column in self.columns.values())}
        dev = str(self.device)
        out[dev] = out.get(dev, 0) + n * self.state_size * self.states.element_size()
        return out

    def snapshot(self) -> dict:
        """Plain-data copy of the whole table."""
        n = len(self)
        return {
            "format": SNAPSHOT_FORMAT,
            "user_ids": list(self.user_ids),
            "hidden": self.states[:n].detach().cpu().numpy().copy(),  # key kept: snapshots on disk use it
            **{name: column[:n].copy() for name, column in self.columns.items()},
            "category_names": dict(self.category_names),
            "max_event_ts": self.max_event_ts,
            "outcomes": self.outcomes.to_plain(),
        }

    def restore(self, snap: dict) -> None:
        """Replace the table's content with a snapshot taken by `snapshot()`."""
        if snap.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(_snapshot_format_error(snap))
        users = list(snap["user_ids"])
        n = len(users)
        self.user_ids = users
        self._index.rebuild(users)
        cap = max(1024, n)
        self.states = _room(cap, self.state_size, self.device, self.state_dtype)
        self.states[:n] = torch.as_tensor(snap["hidden"], device=self.device, dtype=self.state_dtype)
        self.columns = _columns_from(snap, self.spec, n, cap)
        self.recount()
        self.category_names = {int(k): v for k, v in snap["category_names"].items()}
        self._seen_cache = None
        self.max_event_ts = int(snap["max_event_ts"])
        self.outcomes = Outcomes.from_plain(snap.get("outcomes"), self.max_event_ts if n else -1)


def _snapshot_format_error(snap: dict) -> str:
    return (f"state snapshot format {snap.get('format')!r} is not {SNAPSHOT_FORMAT} (an earlier release's, which "
            "kept other per-user statistics): rebuild it with profiles replay ... --state-out")


class SnapshotBase:
    """A replayed state snapshot, read-only, columns laid out as the table's (watermark slots
    mapped to the table's input topics by name; partitions kept only where they name the same
    topics' partitions)."""

    def __init__(self, snap: dict, spec: dict, topics: Iterable[str] | None, input_topics: list[str]) -> None:
        self.user_ids: list[str] = list(snap["user_ids"])
        n = len(self.user_ids)
        self.index = {u: i for i, u in enumerate(self.user_ids)}
        self.states = np.asarray(snap["hidden"])  # as the snapshot stores it (float16 or float32): cast as users load
        self.columns = _columns_from(snap, spec, n, n)
        topics = list(topics) if topics is not None else None
        if "watermark" in snap and topics is not None:
            mapped = self.columns["watermark"]
            mapped[:] = -1
            for slot, topic in enumerate(input_topics):
                if topic in topics:
                    mapped[:, slot] = snap["watermark"][:, topics.index(topic)]
        if topics is not None and not set(topics) & set(input_topics):
            self.columns["partition"][:] = -1  # partitions of other topics say nothing about ours
        self.partition = self.columns["partition"]

    def users_of(self, partitions: Iterable[int]) -> list[str]:
        rows = np.flatnonzero(np.isin(self.partition, np.fromiter(partitions, dtype=np.int64)))
        return [self.user_ids[i] for i in rows.tolist() if self.user_ids[i] in self.index]

    def lookup(self, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `users` found in the base, their base rows)."""
        rows = np.fromiter(map(self.index.get, users, itertools.repeat(-1)), dtype=np.int64, count=len(users))
        found = np.flatnonzero(rows >= 0)
        return found, rows[found]

    def discard(self, users: Iterable[str]) -> set[str]:
        """Leave these users out from now on; returns those the base held."""
        return {user for user in users if self.index.pop(user, None) is not None}


MOVE_CHUNK = 16_384  # rows moved at a time by drop_rows: a few MB of scratch, not a copy of the table


def _move_down(table: np.ndarray | torch.Tensor, rows: np.ndarray, to: int) -> None:
    """Move the rows `rows` (ascending, each at or after its destination) to to, to + 1, ...: chunk by chunk,
    each chunk read (into scratch) before it is written, and written only over rows already moved or
    dropped, since a row never moves up."""
    index = rows if isinstance(table, np.ndarray) else torch.from_numpy(rows).to(table.device)
    for at in range(0, len(rows), MOVE_CHUNK):
        chunk = index[at:at + MOVE_CHUNK]
        table[to + at:to + at + len(chunk)] = table[chunk]


def _room(capacity: int, state_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Room for `capacity` users' states, uninitialised (rows_for zeroes a row when a user takes it): on the
    CPU, numpy's big arrays take huge pages as they are written (torch.zeros writes every page at once)."""
    if device.type == "cpu":
        return torch.from_numpy(np.empty((capacity, state_size), dtype=numpy_dtype(dtype)))
    return torch.zeros(capacity, state_size, device=device, dtype=dtype)


def _column(spec: tuple[type, tuple[int, ...], float], capacity: int) -> np.ndarray:
    """Room for a column of `capacity` rows: as _room, rows_for gives a row its initial value."""
    dtype, shape, _ = spec
    return np.empty((capacity, *shape), dtype=dtype)


def _columns_from(snap: dict, spec: dict, n: int, capacity: int) -> dict[str, np.ndarray]:
    """The table's columns (of `capacity` rows) holding a snapshot's n users in the first rows."""
    columns = {}
    for name, column_spec in spec.items():
        column = _column(column_spec, capacity)
        if name in snap and snap[name].shape[1:] == column.shape[1:]:
            column[:n] = snap[name]  # (a column the snapshot lacks, or shaped otherwise, starts fresh)
        else:
            column[:n] = column_spec[2]
        columns[name] = column
    return columns
