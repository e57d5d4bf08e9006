"""The state changelog's records: one fixed-layout binary record per user, packed and loaded column-wise.

`record_dtype` is the layout (the table's state vector, then its columns; little-endian, no padding);
`pack` writes rows' records for the changelog topic; `ChangelogLoader` loads a changelog read from the
beginning into a StateTable batch by batch: per user the latest record wins, a tombstone (None) erases
the user, and each partition's latest meta record (model version, the calibration's counts) is kept for the
caller, with the category names it lists.

The names travel in records of their own beside the meta record (NAMES_KEY and the part's number, each at most
NAME_PART_BYTES of them), so that a shop's many or long category names never pass Kafka's 1 MB record limit. A
name's part is set by its key (a hash), so a new name changes one part: only that one is written again, in a new
generation, and the meta record says which generation each part is at (`name_generations`; a meta record of
session 57 or before: every part at `names_generation`). The parts come before their meta record, so a write cut
short (a crashed transaction's records, which some brokers show) leaves the meta record before it with every part
it names: at each meta record the loader keeps the parts it names, and reads on.

"Latest" is that of a changelog read partition by partition in ascending order: within a partition
the highest offset wins, and between partitions (a user whose records are in two, after its
partition changed) the highest partition. The loader reaches the same result whatever order the
partitions' records interleave in, so it can take them as the consumer delivers them, and it never
depends on compaction: every record of a user is looked at, only the latest one stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import orjson
import torch

from stream.events import RESERVED_ID_PREFIX
from stream.habit import TWO_DAYS
from stream.settings import STATE_DTYPES
from stream.statistics import VISIT_COLUMNS

if TYPE_CHECKING:
    from stream.state import StateTable

CHANGELOG_FORMAT = 10  # 2: with the behaviour statistics; 3: categories by key (models.features.category_keys);
# 4: category visit counts; 5: the in-visit gaps' log minutes (stream/tempo.py); 6: the purchase rhythm (orders);
# 7: the shop's habit, week by week (stream/habit.py); 8: the calibration anchors (stream/outcomes.py); 9: the
# shop's habit over two-day spans as well; 10: the latest visit's events and searches (stream/statistics.py)
# Earlier formats that restore: format -> the columns it lacks, which start afresh (their initial values).
READABLE_FORMATS: dict[int, tuple[str, ...]] = {9: VISIT_COLUMNS, 8: TWO_DAYS.columns + VISIT_COLUMNS}
# How the model state may be stored (--state-dtype): its torch dtype by name.
STATE_DTYPE_NAMES = {name: getattr(torch, name) for name in STATE_DTYPES}
# Changelog key of the per-partition metadata record (model version, the calibration's counts, which names): no
# user's (stream/decode.py refuses user ids that start so).
META_KEY = RESERVED_ID_PREFIX.encode() + b"meta"
NAMES_KEY = META_KEY + b"/names/"  # + the part's number: the category names (module docstring)
# JSON bytes of names in one part at most: a record of its own, as the meta record is (up to 0.77 MB of anchor
# samples, stream/anchor_samples.py), each under librdkafka's 1 MB message.max.bytes. 4,000 names of 64 characters.
NAME_PART_BYTES = 300_000
# ... and on average at most (name_parts): what a new name writes again to each partition a member owns.
NAME_PART_AVERAGE_BYTES = 50_000


def name_parts(names: dict[int, str]) -> list[dict[str, str]]:
    """The category names (key -> name) in parts of at most NAME_PART_BYTES of JSON, a name in part key % N: the
    keys are hashes, so a new name changes one part (not every part after it, as parts cut in key order would). N
    is the smallest power of two with parts of NAME_PART_AVERAGE_BYTES at most on average (doubled while one would
    overflow): the parts all change only when N does, at each doubling of the names. At least one part."""
    size = {key: len(name.encode("utf-8", "surrogatepass")) + 16 for key, name in names.items()}  # key, quotes, comma
    count = 1
    while count * NAME_PART_AVERAGE_BYTES < sum(size.values()):
        count *= 2
    while True:
        parts: list[dict[str, str]] = [{} for _ in range(count)]
        used = [0] * count
        for key in sorted(names):
            parts[key % count][str(key)] = names[key]
            used[key % count] += size[key]
        if max(used) <= NAME_PART_BYTES or count >= len(names):
            return parts
        count *= 2


def named_parts(meta: dict) -> list[tuple[int, int]]:
    """(part, generation) of each part of the category names a meta record names, in order."""
    if "name_generations" in meta:
        return list(enumerate(meta["name_generations"]))
    return [(number, meta.get("names_generation", 0)) for number in range(meta.get("name_parts", 0))]

LOAD_CHUNK = 1024  # records copied into the table's columns at a time (~600 KiB: within a core's cache)

# What the latest record seen so far made of a row, during one load.
UNTOUCHED, LIVE, ERASED, REFUSED = 0, 1, 2, 3


def user_ids(keys: list[bytes]) -> list[str]:
    """The user ids of changelog keys (UTF-8, surrogates passed through, as the changelog writes them): decoded
    all at once where no key holds a newline."""
    joined = b"\n".join(keys)
    if joined.count(b"\n") == len(keys) - 1:
        return joined.decode("utf-8", "surrogatepass").split("\n")
    return [key.decode("utf-8", "surrogatepass") for key in keys]


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """numpy's dtype for a torch dtype (the state table's, on the host and in its records)."""
    return torch.empty(0, dtype=dtype).numpy().dtype


def record_dtype(state_size: int, spec: dict, state_dtype: torch.dtype = torch.float32) -> np.dtype:
    """The packed layout of one user's changelog record (little-endian, no padding); the state vector is
    stored as the table stores it (float16 by default, or float32: --state-dtype)."""
    # The state vector's field is named "hidden" (it holds the memory too): the name is part of the
    # record layout that changelog topics already hold, so it stays.
    hidden = numpy_dtype(state_dtype).newbyteorder("<")
    return np.dtype([("format", "u1"), ("hidden", hidden, (state_size,))] + [
        (name, np.dtype(dtype).newbyteorder("<"), shape) for name, (dtype, shape, _) in spec.items()])


def pack(table: StateTable, rows: np.ndarray) -> list[bytes]:
    """One binary record per row (the user's whole state), packed for all rows at once."""
    records = np.zeros(len(rows), dtype=table.record_dtype())
    records["format"] = CHANGELOG_FORMAT
    records["hidden"] = table.states[torch.from_numpy(rows).to(table.device)].cpu().numpy()
    for name, column in table.columns.items():
        records[name] = column[rows]
    size, buf = records.dtype.itemsize, records.tobytes()
    return [buf[i:i + size] for i in range(0, len(buf), size)]


class RefusedRecords(ValueError):
    """Users' latest changelog records are of another layout (the first such record's partition)."""

    def __init__(self, message: str, partition: int) -> None:
        super().__init__(message)
        self.partition = partition


@dataclass
class Refused:
    """Latest records of another layout: written by another model or settings."""

    partition: int
    sizes: set[int] = field(default_factory=set)
    formats: set[int] = field(default_factory=set)


class ChangelogLoader:
    """Load changelog records into `table`, batch by batch; `finish()` drops the erased users and says
    how many were loaded. Each user gets a row at its first record (a user whose latest record turns
    out to be a tombstone leaves at `finish`), so a batch is applied with a few array operations."""

    def __init__(self, table: StateTable) -> None:
        self.table = table
        self.dtype = table.record_dtype()
        # A record of either --state-dtype loads (its state vector cast to the table's), told apart by its size:
        # the state vector is the only field whose width the setting changes. So a daemon restarted with the
        # other setting, or after the default moved to float16, keeps its state. So does a record of a readable
        # earlier format (READABLE_FORMATS), by its size too (where two layouts are as long, this format's wins):
        # size -> (its layout, the format its records must say).
        self.layouts: dict[int, tuple[np.dtype, int]] = {}
        for form, lacks in [(CHANGELOG_FORMAT, ())] + list(READABLE_FORMATS.items()):
            spec = {name: column for name, column in table.spec.items() if name not in lacks}
            for dtype in STATE_DTYPE_NAMES.values():
                layout = record_dtype(table.state_size, spec, dtype)
                self.layouts.setdefault(layout.itemsize, (layout, form))
        self.metas: dict[int, bytes | None] = {}  # partition -> its latest meta record
        # partition -> generation -> part -> names: the parts its latest meta record names, and those read since
        self.names: dict[int, dict[int, dict[int, dict[str, str]]]] = {}
        self.generation = 0  # the latest generation of names read
        self.refused: dict[int, Refused] = {}  # row -> why its latest record cannot be loaded
        self.keyless = 0  # records without a key, left out
        # Per row of the table: the partition of its latest record (-1: none yet) and what it made of it.
        self._partition = np.full(0, -1, dtype=np.int64)
        self._status = np.zeros(0, dtype=np.int8)

    def add(self, keys: list[bytes], values: list[bytes | None], partitions: np.ndarray) -> None:
        """Records in the order read (offset order within a partition): keys, values (None: tombstone)
        and their partitions."""
        if min(filter(None, keys), default=b"\x01") < b"\x01":  # in C: a key that starts with a NUL
            keys, values, partitions = self._take_meta(keys, values, partitions)
        try:
            users = user_ids(keys)
        except TypeError:  # records without a key: no user's (the daemon keys every record it writes)
            keyed = [i for i, key in enumerate(keys) if key is not None]
            self.keyless += len(keys) - len(keyed)
            keys, values, partitions = [keys[i] for i in keyed], [values[i] for i in keyed], partitions[keyed]
            users = user_ids(keys)
        if not users:
            return
        rows = self.table.rows_for(users, from_base=False)
        self._track(len(self.table))
        # Per row, the batch's record of the highest partition, the last one read of it (lexsort is stable),
        # and only if that partition is not below the one of the row's latest record so far. A batch of
        # distinct users in row order (a restore's usual one: users new to the table) needs no sort.
        if (rows[1:] > rows[:-1]).all():
            chosen = np.arange(len(rows))
        else:
            order = np.lexsort((partitions, rows))
            ordered = rows[order]
            last = np.ones(len(order), dtype=bool)
            last[:-1] = ordered[1:] != ordered[:-1]
            chosen = order[last]
        chosen = chosen[partitions[chosen] >= self._partition[rows[chosen]]]
        rows = rows[chosen]
        self._partition[rows] = partitions[chosen]
        if self.refused:  # a newer record replaces a refused one
            for row in rows.tolist():
                self.refused.pop(row, None)
        if len(chosen) < len(values):
            values = list(map(values.__getitem__, chosen.tolist()))
        else:  # each record is its user's latest (the usual batch): in the order of their rows, as `chosen`
            values = values if (chosen[1:] > chosen[:-1]).all() else list(map(values.__getitem__, chosen.tolist()))
        self._apply(rows, values, partitions[chosen])

    def _apply(self, rows: np.ndarray, values: list[bytes | None], partitions: np.ndarray) -> None:
        status = np.full(len(rows), LIVE, dtype=np.int8)
        try:
            sizes = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        except TypeError:  # tombstones among them
            erased = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
            status[erased] = ERASED
            sizes = np.fromiter((0 if v is None else len(v) for v in values), dtype=np.int64, count=len(values))
        wrong = (sizes != self.dtype.itemsize) & (status == LIVE)
        if wrong.any():
            wrong &= ~np.isin(sizes, list(self.layouts))
            status[wrong] = REFUSED
            for i in np.flatnonzero(wrong).tolist():
                self._refuse(int(rows[i]), int(partitions[i])).sizes.add(int(sizes[i]))
        live = np.flatnonzero(status == LIVE)
        live_sizes = sizes[live]
        # One layout as a rule; a batch that holds both (records written before a switch) is loaded layout by layout.
        for group in [live] if (live_sizes == self.dtype.itemsize).all() else [
                live[live_sizes == size] for size in np.unique(live_sizes).tolist()]:
            self._load_live(rows, partitions, values, group, status)
        self._status[rows] = status

    def _load_live(self, rows: np.ndarray, partitions: np.ndarray, values: list[bytes | None], live: np.ndarray,
                   status: np.ndarray) -> None:
        """The records `live` (positions in the batch, all of one size) into their rows, but for those of another
        changelog format (refused)."""
        if len(live):
            live_values = values if len(live) == len(values) else map(values.__getitem__, live.tolist())
            layout, form = self.layouts[len(values[live[0]])]
            records = np.frombuffer(b"".join(live_values), dtype=layout)
            formats = records["format"]
            if (formats != form).any():
                other = np.flatnonzero(formats != form)
                status[live[other]] = REFUSED
                for i in other.tolist():
                    self._refuse(int(rows[live[i]]), int(partitions[live[i]])).formats.add(int(formats[i]))
                keep = formats == form
                live, records = live[keep], records[keep]
            self._load(rows[live], records)

    def _load(self, rows: np.ndarray, records: np.ndarray) -> None:
        """Records into the table's rows (ascending): a slice when they are consecutive, as the rows of users
        new to the table are (much faster than scattering each of the table's columns)."""
        table = self.table
        if not len(rows):
            return
        if table.device.type != "cpu":
            # A copy, not ascontiguousarray: one record's field view counts as contiguous but keeps the
            # record's stride, which torch refuses.
            table.states[torch.from_numpy(rows).to(table.device)] = torch.from_numpy(
                records["hidden"].copy()).to(table.device, table.state_dtype)
        states = table.states.numpy() if table.device.type == "cpu" else None  # numpy: torch's strided copy is slow
        # In chunks that stay in the CPU's cache while each field of theirs is copied to its column.
        for start in range(0, len(rows), LOAD_CHUNK):
            part, chunk = rows[start:start + LOAD_CHUNK], records[start:start + LOAD_CHUNK]
            at = slice(int(part[0]), int(part[-1]) + 1) if part[-1] - part[0] == len(part) - 1 else part
            if states is not None:
                states[at] = chunk["hidden"]
            for name, column in table.columns.items():  # a column an earlier format lacks starts afresh
                column[at] = chunk[name] if name in chunk.dtype.fields else table.spec[name][2]

    def _refuse(self, row: int, partition: int) -> Refused:
        return self.refused.setdefault(row, Refused(partition))

    def _take_meta(self, keys: list[bytes], values: list[bytes | None],
                   partitions: np.ndarray) -> tuple[list[bytes], list[bytes | None], np.ndarray]:
        """Keep each partition's latest meta record, the name parts it names and those read since; return the batch
        without them."""
        at = [i for i, key in enumerate(keys) if key == META_KEY or key and key.startswith(NAMES_KEY)]  # rare
        for i in at:  # in the order read: the last one of a partition wins
            partition, value = int(partitions[i]), values[i]
            if keys[i] == META_KEY:
                self.metas[partition] = value
                named = set(named_parts(orjson.loads(value))) if value is not None else set()
                held = self.names.get(partition, {})
                for generation, parts in list(held.items()):
                    for number in [n for n in parts if (n, generation) not in named]:
                        del parts[number]
                    if not parts:
                        del held[generation]
            elif value is not None:
                part = orjson.loads(value)
                self.generation = max(self.generation, part["generation"])
                self.names.setdefault(partition, {}).setdefault(part["generation"], {})[part["part"]] = part["names"]
        keys, values = list(keys), list(values)
        for i in reversed(at):
            del keys[i], values[i]
        return keys, values, np.delete(partitions, at)

    def names_of(self, partition: int, meta: dict) -> dict[str, str]:
        """The category names the partition's meta record lists (parsed): in the parts it names, or in itself
        (written so before the names had parts). Raises ValueError where a part it names was not read."""
        if "category_names" in meta:
            return meta["category_names"]
        held = self.names.get(partition, {})
        named = named_parts(meta)
        missing = [(number, generation) for number, generation in named if number not in held.get(generation, {})]
        if missing:
            raise ValueError(f"the category names of its meta record lack part(s) {[n for n, _ in missing]} of "
                             f"{len(named)} (generation(s) {sorted({g for _, g in missing})})")
        return {key: name for number, generation in named for key, name in held[generation][number].items()}

    def _track(self, n: int) -> None:
        """Room for n rows in the per-row arrays (grown geometrically: the table grows batch by batch)."""
        have = len(self._status)
        if n <= have:
            return
        grown = max(n, 2 * have)
        self._partition = np.concatenate([self._partition, np.full(grown - have, -1, dtype=np.int64)])
        self._status = np.concatenate([self._status, np.zeros(grown - have, dtype=np.int8)])

    def finish(self) -> int:
        """Drop the users whose latest record is a tombstone, advance the table's event-time clock to the
        loaded users' latest event, and return how many users were loaded. Raises RefusedRecords (a ValueError)
        if a user's latest record is of another layout."""
        if self.refused:
            raise RefusedRecords(self._refusal(), next(iter(self.refused.values())).partition)
        table = self.table
        table.recount()  # records overwrote rows: count them again
        status = self._status[:len(table)]
        live = np.flatnonzero(status == LIVE)
        if len(live):
            table.max_event_ts = max(table.max_event_ts, int(table.last_ts[live].max()))
        erased = np.flatnonzero(status == ERASED)
        if len(erased):
            # Tombstones drop users but no category names: the meta record restored beside them lists the
            # names as they were after the erasure.
            table._drop_users([table.user_ids[r] for r in erased.tolist()])
        return len(live)

    def _refusal(self) -> str:
        sizes = sorted(set().union(*(r.sizes for r in self.refused.values())))
        formats = sorted(set().union(*(r.formats for r in self.refused.values())))
        if sizes:
            expected = " or ".join(str(size) for size, (_, form) in sorted(self.layouts.items())
                                   if form == CHANGELOG_FORMAT)
            return (f"changelog records of {sizes} bytes, expected {expected} (float16 or float32 states): written "
                    "by another model or settings (state size, input topics, dedupe window); use a new changelog "
                    "topic for them")
        return f"changelog record format {formats} is not {CHANGELOG_FORMAT} (nor a readable earlier one)"
