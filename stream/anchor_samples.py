"""Users sampled at each calibration anchor, with what the rules' statistics said of them then: the inputs of the
stream's fit of the published probabilities on those statistics (models/stream_calibration.py, with_statistics;
docs/model.md, "By the stream itself").

The counts of stream/outcomes.py say how often what each head said came true, by its logit alone. Where a shop's
users buy on a rhythm of their own (B2B accounts, replenishment), a rule reading one statistic the state keeps
(how due the next order is, the purchases of the last 7 days) ranks them better than a model trained in another
shop, which weighs that statistic as its own shop taught it. To weigh the statistics as this shop's outcomes
do, the fit needs them user by user: at each anchor the users held with the smallest stable hashes of their ids,
SAMPLE_PER_PARTITION per input partition, are sampled with both heads' logits and the STATISTICS at the anchor's
clock; each head's window closing reads from the state whether they bought (their latest purchase is after the
anchor) and whether they came back (their latest event is). No per-user record is kept, and the sample is the same
whatever the batching and restarts (the hash is of the id, not the process's); a partition's samples travel in its
changelog meta record.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass, field

import numpy as np

SAMPLE_PER_PARTITION = 2048
# The statistics each head's fit may weigh (stream/statistics.py USER_FEATURES), those the simple rules read
# (models/field_evaluation.py baseline_scores): purchase_propensity's order due, purchases of the last 7 days, carts
# not bought and purchase share; churn_risk's idle time, activity of the last 7 days and idle time against the
# user's usual gap between visits.
STATISTICS = (("order_due", "log_purchases_7d", "log_carts_pending", "purchase_share"),
              ("log_idle_minutes", "log_activity_7d", "idle_vs_usual_gap"))
# Columns of a sample's x: both heads' logits, then each head's statistics in turn.
LOGIT_COLUMNS = (0, 1)
STATISTIC_COLUMNS = (tuple(range(2, 2 + len(STATISTICS[0]))),
                     tuple(range(2 + len(STATISTICS[0]), 2 + len(STATISTICS[0]) + len(STATISTICS[1]))))
WIDTH = 2 + sum(map(len, STATISTICS))


def stable_keys(users: np.ndarray) -> np.ndarray:
    """(N,) uint32 CRC-32 of the ids: the same in every process (Python's hash of a str is salted per process)."""
    return np.fromiter((zlib.crc32(str(user).encode()) for user in users), dtype=np.uint32, count=len(users))


def sample_rows(rows: np.ndarray, users: np.ndarray, partitions: np.ndarray) -> np.ndarray:
    """Of these rows (their ids and input partitions), the SAMPLE_PER_PARTITION with the smallest stable keys in
    each partition, by partition then key."""
    order = np.lexsort((stable_keys(users), partitions))
    sorted_partitions = partitions[order]
    rank = np.arange(len(order)) - np.searchsorted(sorted_partitions, sorted_partitions)
    return rows[order[rank < SAMPLE_PER_PARTITION]]


@dataclass
class Sample:
    """One partition's users sampled at one anchor: ids, x (N, WIDTH) float16 (stored as restored: a restart
    fits on the same numbers), per head whether it happened (None while the head's window is open), and per head
    whether it had happened when the user's state expired (--state-ttl: the user is not found when it closes)."""

    users: np.ndarray
    x: np.ndarray
    happened: list[np.ndarray | None] = field(default_factory=lambda: [None, None])
    left: np.ndarray | None = None  # (N, 2) bool: bought, came back, before expiring

    def __post_init__(self) -> None:
        if self.left is None:
            self.left = np.zeros((len(self.users), 2), dtype=bool)

    def to_plain(self) -> list:
        def packed(a: np.ndarray | None) -> str | None:
            return None if a is None else base64.b64encode(np.packbits(a)).decode()
        return [self.users.tolist(), base64.b64encode(self.x.astype("<f2").tobytes()).decode(),
                *map(packed, self.happened), packed(self.left.T.ravel())]

    @classmethod
    def from_plain(cls, plain: list) -> Sample:
        users = np.fromiter(plain[0], dtype=object, count=len(plain[0]))
        x = np.frombuffer(base64.b64decode(plain[1]), dtype="<f2").astype(np.float16).reshape(len(users), WIDTH)

        def unpacked(s: str | None, n: int = len(users)) -> np.ndarray | None:
            return None if s is None else np.unpackbits(np.frombuffer(base64.b64decode(s), np.uint8))[:n].astype(bool)
        return cls(users, x, [unpacked(s) for s in plain[2:4]], unpacked(plain[4], 2 * len(users)).reshape(2, -1).T)


@dataclass
class AnchorSamples:
    """(partition, anchor) -> Sample, for the anchors whose windows are open and each head's latest matured one."""

    samples: dict[tuple[int, int], Sample] = field(default_factory=dict)

    def put(self, anchor: int, partitions: np.ndarray, users: np.ndarray, x: np.ndarray) -> None:
        for partition in np.unique(partitions).tolist():
            mine = partitions == partition
            self.samples[(int(partition), anchor)] = Sample(users[mine], x[mine].astype(np.float16))

    def latest_matured(self, head: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(x float64, happened) of the head's latest matured anchor over the partitions held, or None."""
        matured = [anchor for (_, anchor), s in self.samples.items() if s.happened[head] is not None]
        if not matured:
            return None
        latest = [s for (_, anchor), s in sorted(self.samples.items()) if anchor == max(matured)]
        return (np.concatenate([s.x for s in latest]).astype(np.float64),
                np.concatenate([s.happened[head] for s in latest]))

    def keep_from(self, anchor: int) -> None:
        self.samples = {key: s for key, s in self.samples.items() if key[1] >= anchor}

    def drop_partitions(self, partitions: set[int]) -> None:
        self.samples = {key: s for key, s in self.samples.items() if key[0] not in partitions}

    def of_partition(self, partition: int) -> list:
        return [[anchor, *s.to_plain()] for (p, anchor), s in sorted(self.samples.items()) if p == partition]

    def merge_partition(self, partition: int, plain: list) -> None:
        self.drop_partitions({partition})
        for anchor, *rest in plain:
            self.samples[(partition, int(anchor))] = Sample.from_plain(rest)

    def to_plain(self) -> list:
        return [[p, anchor, *s.to_plain()] for (p, anchor), s in sorted(self.samples.items())]

    @classmethod
    def from_plain(cls, plain: list | None) -> AnchorSamples:
        return cls({(int(p), int(anchor)): Sample.from_plain(rest) for p, anchor, *rest in plain or []})
