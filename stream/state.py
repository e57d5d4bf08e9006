"""The state table: user -> hidden state + exact counters, behind a small interface.

Hidden states live in one (capacity, H) tensor on the model's device; counters
live in numpy arrays on the host. Both grow by doubling, so the cost of a batch
depends on the users it touches, not on how many users are in state.

`snapshot()` / `restore()` exchange plain data (numpy arrays, lists, dicts): the
changelog and local snapshots of a later issue build on them.
"""

from __future__ import annotations

import itertools

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import orjson
import torch

from stream.events import EVENT_TYPES

SNAPSHOT_FORMAT = 1


# Host columns of the state: name -> (dtype, trailing shape, initial value).
COLUMNS: dict[str, tuple[type, tuple[int, ...], float]] = {
    "counts": (np.int64, (len(EVENT_TYPES),), 0),  # exact event counts by type
    # Spend in integer micro-units: exact and independent of summation order (batching invariance).
    "spend_micros": (np.int64, (), 0),
    "last_ts": (np.int64, (), -1),  # latest event time; -1: no event yet
    "price_sum": (np.float64, (), 0.0),  # for the mean engaged price -> price tier
    "price_n": (np.int64, (), 0),
    "scored_at": (np.int64, (), -1),  # event-time clock when the user's profile was last published
}


class StateTable:
    def __init__(self, hidden_size: int, device: torch.device, capacity: int = 1024) -> None:
        self.hidden_size = hidden_size
        self.device = device
        self._index: dict[str, int] = {}
        self.user_ids: list[str] = []
        self.hidden = torch.zeros(capacity, hidden_size, device=device)  # (capacity, H)
        self.columns = {name: _column(name, capacity) for name in COLUMNS}
        # Category bucket -> the category string seen in it, so top_categories can name
        # categories as they appear in events (its keys are the buckets ever seen).
        self.category_names: dict[int, str] = {}
        self.max_event_ts = -1  # largest event time seen: the clock of event-time timers
        self._seen_cache: torch.Tensor | None = None

    # Named views of the columns, for readers of the pipeline.
    counts = property(lambda self: self.columns["counts"])
    spend_micros = property(lambda self: self.columns["spend_micros"])
    last_ts = property(lambda self: self.columns["last_ts"])
    price_sum = property(lambda self: self.columns["price_sum"])
    price_n = property(lambda self: self.columns["price_n"])
    scored_at = property(lambda self: self.columns["scored_at"])

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def capacity(self) -> int:
        return len(self.hidden)

    def rows_for(self, users: Iterable[str]) -> np.ndarray:
        """Row of each user, adding rows for users not yet in state (in order of first appearance)."""
        users = users if isinstance(users, (list, np.ndarray)) else list(users)
        index = self._index
        rows = np.fromiter(map(index.get, users, itertools.repeat(-1)), dtype=np.int64, count=len(users))
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            absent = [users[i] for i in missing.tolist()]
            new_users = list(dict.fromkeys(absent))  # distinct, first appearance first
            first = len(self.user_ids)
            index.update(zip(new_users, range(first, first + len(new_users))))
            self.user_ids.extend(new_users)
            rows[missing] = np.fromiter(map(index.__getitem__, absent), dtype=np.int64, count=len(absent))
            self._ensure_capacity(len(self.user_ids))
        return rows

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new = max(needed, 2 * self.capacity)
        grown = torch.zeros(new, self.hidden_size, device=self.device)
        grown[: self.capacity] = self.hidden
        self.hidden = grown
        for name, old in self.columns.items():
            column = _column(name, new)
            column[: len(old)] = old
            self.columns[name] = column

    def remember_categories(self, buckets: np.ndarray, names: np.ndarray) -> None:
        """Record the category strings seen in each bucket (bucket 0 = no category).

        When two categories collide in a bucket, the bucket is named by the smaller
        string: a rule that does not depend on arrival order or batch boundaries.
        """
        keep = buckets > 0
        if not keep.any():
            return
        known = self.category_names
        for name, bucket in dict(zip(names[keep].tolist(), buckets[keep].tolist())).items():  # distinct names
            current = known.get(bucket)
            if current is None:
                self._seen_cache = None  # a new bucket
            if current is None or name < current:
                known[bucket] = name

    def seen_categories(self) -> torch.Tensor:
        """(S,) buckets that ever carried a category, ascending; cached until a new one appears."""
        if self._seen_cache is None:
            buckets = sorted(self.category_names)
            self._seen_cache = torch.tensor(buckets, dtype=torch.long, device=self.device)
            self._seen_names = np.array([self.category_names[b] for b in buckets] or [""], dtype=object)
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
        out[dev] = out.get(dev, 0) + n * self.hidden_size * self.hidden.element_size()
        return out

    def snapshot(self) -> dict:
        """Plain-data copy of the whole table."""
        n = len(self)
        return {
            "format": SNAPSHOT_FORMAT,
            "user_ids": list(self.user_ids),
            "hidden": self.hidden[:n].detach().cpu().numpy().copy(),
            **{name: column[:n].copy() for name, column in self.columns.items()},
            "category_names": dict(self.category_names),
            "max_event_ts": self.max_event_ts,
        }

    def restore(self, snap: dict) -> None:
        """Replace the table's content with a snapshot taken by `snapshot()`."""
        if snap.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"state snapshot format {snap.get('format')!r} is not {SNAPSHOT_FORMAT}")
        users = list(snap["user_ids"])
        n = len(users)
        self._index = {u: i for i, u in enumerate(users)}
        self.user_ids = users
        cap = max(1024, n)
        self.hidden = torch.zeros(cap, self.hidden_size, device=self.device)
        self.hidden[:n] = torch.as_tensor(snap["hidden"], device=self.device)
        for name in COLUMNS:
            column = _column(name, cap)
            column[:n] = snap[name]
            self.columns[name] = column
        self.category_names = {int(k): v for k, v in snap["category_names"].items()}
        self._seen_cache = None
        self.max_event_ts = int(snap["max_event_ts"])


def _column(name: str, capacity: int) -> np.ndarray:
    dtype, shape, initial = COLUMNS[name]
    return np.full((capacity, *shape), initial, dtype=dtype)


def write_snapshot(directory: str | Path, snapshot: dict, meta: dict) -> None:
    """A state snapshot on disk: arrays in state.npz, the rest (and `meta`) in state.json.

    Written to a temporary name and renamed, so a reader never sees half a snapshot.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in snapshot.items() if isinstance(v, np.ndarray)}
    plain = {k: v for k, v in snapshot.items() if not isinstance(v, np.ndarray)}
    plain["category_names"] = {str(k): v for k, v in plain["category_names"].items()}
    tmp_npz, tmp_json = directory / ".state.npz.tmp", directory / ".state.json.tmp"
    with open(tmp_npz, "wb") as fh:
        np.savez(fh, **arrays)
    tmp_json.write_bytes(orjson.dumps({"snapshot": plain, "meta": meta}))
    os.replace(tmp_npz, directory / "state.npz")
    os.replace(tmp_json, directory / "state.json")


def read_snapshot(directory: str | Path) -> tuple[dict, dict]:
    """(snapshot for StateTable.restore, meta) from a directory written by write_snapshot."""
    directory = Path(directory)
    try:
        doc = orjson.loads((directory / "state.json").read_bytes())
        with np.load(directory / "state.npz", allow_pickle=False) as arrays:
            snapshot = {**doc["snapshot"], **{k: arrays[k] for k in arrays.files}}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(directory)!r} holds no readable state snapshot ({exc})") from None
    return snapshot, doc.get("meta", {})
