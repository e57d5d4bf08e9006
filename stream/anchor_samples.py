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
# A partition's meta record carries the ids of the samples of three anchors: ids may be up to 256 characters
# (stream/events.py MAX_ID_CHARS), and 2,048 of those three times over would pass Kafka's 1 MB record limit. So
# each anchor's sample of a partition stops where its ids reach this many bytes (2,048 ids of up to 44 characters).
SAMPLE_ID_BYTES = 96 * 1024
# Of them, the users with the smallest keys whose top_categories candidates are kept too (CategorySample: about 150
# bytes a user; at 512 a partition's meta record stays well under Kafka's 1 MB; offline, a fit on 512 users held
# the gains of one on every user: docs/model-journal.md, session 55).
CATEGORY_SAMPLE_PER_PARTITION = 512
# The statistics each head's fit may weigh (stream/statistics.py USER_FEATURES), first those the simple rules read
# (models/field_evaluation.py baseline_scores): purchase_propensity's order due, purchases of the last 7 days, carts
# not bought and purchase share; churn_risk's idle time, activity of the last 7 days and idle time against the
# user's usual gap between visits. A sample's x holds them all (older records: the leading ones).
STATISTICS = (("order_due", "log_purchases_7d", "log_carts_pending", "purchase_share",
               "log_purchases_30d", "log_minutes_since_purchase", "usual_order_gap",
               "since_purchase_vs_usual_order_gap", "log_activity_7d", "log_minutes_since_cart", "log_activity_1d",
               "log_activity_30d"),
              ("log_idle_minutes", "log_activity_7d", "idle_vs_usual_gap",
               "log_activity_1d", "log_activity_30d", "usual_gap", "recent_gap", "has_gap", "visit_search_share"))
# How many of each head's STATISTICS the simple rules read: those weighed wherever they gain on the anchor's own
# sample. The others, each head's rhythm beyond the rules' (purchase_propensity: purchases of the last 30 days, the
# time since the latest purchase and cart, the usual gap between orders and the time since the latest against it,
# activity of the last day, week and month; churn_risk: activity of the last day and month, the usual and recent
# gaps between visits, the searches' share of the latest visit; no lifetime count, which grows as the log ages and
# moved the fit's level two weeks on), only where the weights fitted on the previous matured anchor also beat the
# rules' own fit on the latest one (Sample.held_out): fitted on a young table's first weeks, such weights ranked B2B
# accounts' users 0.058 of ROC AUC worse two weeks later (docs/model-journal.md, session 59).
RULE_STATISTICS = (4, 3)
# A sample's x: both heads' logits, then every head's rules' statistics, then the others, head by head, each
# statistic once (a record of session 58 holds the logits and the rules' statistics: the leading columns).
LOGIT_COLUMNS = (0, 1)
SAMPLED_STATISTICS = tuple(dict.fromkeys(
    [*(name for head, rules in enumerate(RULE_STATISTICS) for name in STATISTICS[head][:rules]),
     *(name for head, rules in enumerate(RULE_STATISTICS) for name in STATISTICS[head][rules:])]))
STATISTIC_COLUMNS = tuple(tuple(2 + SAMPLED_STATISTICS.index(name) for name in names) for names in STATISTICS)
WIDTH = 2 + len(SAMPLED_STATISTICS)
# After them, churn_risk's logit over a week (the model's own at the anchor's clock; a record of session 61 or before
# has none): with the week's silence it fits churn_risk's map where no anchor's two weeks have closed yet, and how
# the shop splits the two weeks' hazard (models/stream_calibration.py, with_week, with_share_power).
WEEK_LOGIT_COLUMN = WIDTH
# The statistics a record of session 65 or before lacks (the last of SAMPLED_STATISTICS): restored as 0 before its
# week logit (a fit then weighs them 0). A record names how many statistics it holds since.
ADDED_STATISTICS = ("visit_search_share",)


def stable_keys(users: np.ndarray) -> np.ndarray:
    """(N,) uint32 CRC-32 of the ids: the same in every process (Python's hash of a str is salted per process)."""
    return np.fromiter((zlib.crc32(str(user).encode()) for user in users), dtype=np.uint32, count=len(users))


def sample_rows(rows: np.ndarray, users: np.ndarray, partitions: np.ndarray) -> np.ndarray:
    """Of these rows (their ids and input partitions), the SAMPLE_PER_PARTITION with the smallest stable keys in
    each partition, by partition then key, fewer where their ids run past SAMPLE_ID_BYTES."""
    order = np.lexsort((stable_keys(users), partitions))
    order = order[leading(partitions[order], SAMPLE_PER_PARTITION)]
    sorted_partitions = partitions[order]
    size = np.fromiter((len(str(user).encode("utf-8", "surrogatepass")) + 3 for user in users[order]), np.int64,
                       count=len(order))  # as the meta record writes it: quoted, a comma
    total = np.cumsum(size)
    first = np.searchsorted(sorted_partitions, sorted_partitions)
    return rows[order[total - (total[first] - size[first]) <= SAMPLE_ID_BYTES]]


def week_known(sample: "Sample") -> bool:
    """Whether the sample says who stayed away the week after its anchor, and has churn_risk's logit over a week
    to read it with (none in a record of session 61 or before)."""
    return sample.week_silent is not None and sample.x.shape[1] > WIDTH


def leading(sorted_partitions: np.ndarray, n: int) -> np.ndarray:
    """(N,) bool: the first n rows of each partition in rows sorted by partition."""
    return np.arange(len(sorted_partitions)) - np.searchsorted(sorted_partitions, sorted_partitions) < n


def packed(a: np.ndarray | None) -> str | None:
    return None if a is None else base64.b64encode(np.packbits(a.ravel())).decode()


def unpacked(s: str | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if s is None:
        return None
    return np.unpackbits(np.frombuffer(base64.b64decode(s), np.uint8))[:int(np.prod(shape))].astype(bool).reshape(shape)


def encoded(a: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode()


def decoded(s: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype=dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))


@dataclass
class CategorySample:
    """The top_categories candidates of a partition's first users sampled at an anchor (models/category_calibration.py):
    keys (N, C) uint32 category keys (0: none), the user's K slots first; x (N, C, 1 + F) float16 each candidate's
    log P(c) (-inf: none) then the slot's CATEGORY_STATISTICS (0 for explore's); counts (N, K) uint16 the slots'
    all-time event counts then. When the week closes (`matured`): the weights fitted on which candidates were
    engaged with (None while the week is open), and `gain`, the previous anchor's weights' precision@3 over the
    published ranking's on these users (None: no previous weights) with its standard error, and `judged`, the (gain,
    standard error) of the latest weeks up to this one (None where a week was not judged), oldest first; where there
    were no previous weights, `cross_gain`: the weights' gain on these users, cross-validated, with its standard error.
    The candidates are then dropped (only the weights and gains are needed after)."""

    keys: np.ndarray
    x: np.ndarray
    counts: np.ndarray
    left: np.ndarray | None = None  # (N, C) engaged with before the user's state expired (--state-ttl)
    weights: tuple[float, ...] | None = None
    gain: float | None = None
    gain_se: float | None = None
    users: int = 0  # how many users the weights were fitted on
    judged: tuple[tuple[float, float] | None, ...] = ()
    cross_gain: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.left is None:
            self.left = np.zeros(self.keys.shape, dtype=bool)

    def matured(self, weights: tuple[float, ...], gain: tuple[float, float] | None, users: int,
                judged: tuple[tuple[float, float] | None, ...] = (), cross_gain: tuple[float, float] | None = None
                ) -> None:
        self.weights, (self.gain, self.gain_se), self.users, self.judged = weights, gain or (None, None), users, judged
        self.cross_gain = cross_gain
        self.keys, self.x, self.counts, self.left = self.keys[:0], self.x[:0], self.counts[:0], self.left[:0]

    def to_plain(self) -> list:
        return [[list(a.shape) for a in (self.keys, self.x, self.counts)], encoded(self.keys, "<u4"),
                encoded(self.x, "<f2"), encoded(self.counts, "<u2"), packed(self.left), self.weights, self.gain,
                self.gain_se, self.users, [None if week is None else list(week) for week in self.judged],
                None if self.cross_gain is None else list(self.cross_gain)]

    @classmethod
    def from_plain(cls, plain: list) -> CategorySample:
        shapes = [tuple(shape) for shape in plain[0]]
        keys, x, counts = (decoded(s, dtype, shape) for s, dtype, shape in zip(plain[1:4], ("<u4", "<f2", "<u2"),
                                                                                  shapes))
        return cls(keys, x, counts, unpacked(plain[4], shapes[0]),
                   weights=None if plain[5] is None else tuple(plain[5]), gain=plain[6],
                   gain_se=None if plain[6] is None else standard_error(plain[7]),
                   users=plain[8], judged=tuple(None if week is None else (week[0], standard_error(week[1]))
                                                for week in plain[9])
                   if len(plain) > 9 else (),  # a meta record of session 57 or before: no weeks kept
                   cross_gain=(plain[10][0], standard_error(plain[10][1])) if len(plain) > 10 and plain[10] is not None
                   else None)


def standard_error(written: float | None) -> float:
    """A gain's standard error as a meta record wrote it: JSON has no infinity, and a gain judged on fewer than two
    users (models/category_calibration.py mean_and_error), or cross-validated on too few, has an infinite error,
    written as null (a restart read it as no error at all, and the gate's arithmetic on it stopped the daemon)."""
    return float("inf") if written is None else written


@dataclass
class Sample:
    """One partition's users sampled at one anchor: ids, x (N, WIDTH) float16 (stored as restored: a restart
    fits on the same numbers), per head whether it happened (None while the head's window is open), and per head
    whether it had happened when the user's state expired (--state-ttl: the user is not found when it closes)."""

    users: np.ndarray
    x: np.ndarray  # (N, WIDTH), or fewer columns (the leading ones) in a record of an older release
    happened: list[np.ndarray | None] = field(default_factory=lambda: [None, None])
    left: np.ndarray | None = None  # (N, 2) bool: bought, came back, before expiring
    # The candidates of top_categories of the first CATEGORY_SAMPLE_PER_PARTITION users (None: none taken).
    categories: CategorySample | None = None
    # Per head, once its window closed: how many nats better the previous matured anchor's weights on all the head's
    # STATISTICS said these users' outcomes than its weights on the rules' statistics alone (None: not judged), and
    # its weights on the rules' statistics than its affine map of the logit alone (None: not judged).
    held_out: list[float | None] = field(default_factory=lambda: [None, None])
    rules_held_out: list[float | None] = field(default_factory=lambda: [None, None])
    # Whether each user stayed away the week after the anchor (None until that week closed).
    week_silent: np.ndarray | None = None
    # Once churn_risk's window closed: how many nats better the previous matured anchor's fit on churn_risk's
    # statistics bent in the user's idle time (models/stream_calibration.py, idle_gain) said these users than
    # its fit without the bend (None: not judged; a record of session 66 or before).
    idle_held_out: float | None = None
    # Who bought in the week after the anchor, where purchase_propensity's series does not count it (a table's first
    # anchor, stream/outcomes.py SOONER): its young map (models/stream_calibration.py, with_first_purchases). None
    # elsewhere, until that week closed, and in a record of session 76 or before.
    week_bought: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.left is None:
            self.left = np.zeros((len(self.users), 2), dtype=bool)

    def to_plain(self) -> list:
        return [self.users.tolist(), encoded(self.x, "<f2"), *(packed(h) for h in self.happened),
                packed(self.left.T), None if self.categories is None else self.categories.to_plain(),
                self.held_out, self.rules_held_out, packed(self.week_silent), len(SAMPLED_STATISTICS),
                self.idle_held_out, packed(self.week_bought)]

    @classmethod
    def from_plain(cls, plain: list) -> Sample:
        users = np.fromiter(plain[0], dtype=object, count=len(plain[0]))
        categories = CategorySample.from_plain(plain[5]) if len(plain) > 5 and plain[5] is not None else None
        # A record of session 58 or before: fewer statistics (the leading columns), none judged held out; of session
        # 60 or before: the rules' statistics not judged held out; of session 61 or before: no week's silence; of
        # session 65 or before: not the latest visit's searches.
        x = decoded(plain[1], "<f2", (len(users), -1 if len(users) else WIDTH + 1))
        held = plain[9] if len(plain) > 9 else len(SAMPLED_STATISTICS) - len(ADDED_STATISTICS)
        if x.shape[1] > 2 + held:  # its week logit follows its statistics: those it lacks go in before it, as 0
            x = np.insert(x, [2 + held] * (len(SAMPLED_STATISTICS) - held), 0.0, axis=1)
        return cls(users, x,
                   [unpacked(s, (len(users),)) for s in plain[2:4]], unpacked(plain[4], (2, len(users))).T,
                   categories, list(plain[6]) if len(plain) > 6 else [None, None],
                   list(plain[7]) if len(plain) > 7 else [None, None],
                   unpacked(plain[8], (len(users),)) if len(plain) > 8 else None,
                   plain[10] if len(plain) > 10 else None,
                   unpacked(plain[11], (len(users),)) if len(plain) > 11 else None)


def joined_x(samples: list[Sample]) -> np.ndarray:
    """The samples' x (several partitions' of one anchor) one under the other as float64, in the columns every one
    has (a partition's record of an older release has fewer)."""
    width = min(s.x.shape[1] for s in samples)
    return np.concatenate([s.x[:, :width] for s in samples]).astype(np.float64)


@dataclass
class AnchorSamples:
    """(partition, anchor) -> Sample, for the anchors whose windows are open and each head's latest matured one."""

    samples: dict[tuple[int, int], Sample] = field(default_factory=dict)

    def put(self, anchor: int, partitions: np.ndarray, users: np.ndarray, x: np.ndarray,
            categories: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
        """Rows by partition then key; categories: (keys, x float16, counts) of CategorySample for each partition's
        first CATEGORY_SAMPLE_PER_PARTITION rows (those where leading(partitions) holds), in the same order."""
        first = partitions[leading(partitions, CATEGORY_SAMPLE_PER_PARTITION)]
        for partition in np.unique(partitions).tolist():
            mine = partitions == partition
            candidates = None if categories is None else CategorySample(*(a[first == partition] for a in categories))
            self.samples[(int(partition), anchor)] = Sample(users[mine], x[mine].astype(np.float16),
                                                            categories=candidates)

    def open_categories(self, anchor: int | None = None) -> list[tuple[Sample, CategorySample]]:
        """The samples (of one anchor; None: any) whose candidates' week is open, with their candidates."""
        return [(s, s.categories) for (_, at), s in sorted(self.samples.items())
                if s.categories is not None and s.categories.weights is None and anchor in (None, at)]

    def category_fit(self, anchor: int | None = None) -> tuple[int, CategorySample] | None:
        """(anchor, its matured candidates) of an anchor (None: the latest matured), of its lowest partition (each
        partition's holds the fit on every partition its member held when the week closed)."""
        matured = [(at, p) for (p, at), s in self.samples.items()
                   if s.categories is not None and s.categories.weights is not None and anchor in (None, at)]
        if not matured:
            return None
        at, partition = min(matured, key=lambda k: (-k[0], k[1]))
        return at, self.samples[(partition, at)].categories

    def latest_matured(self, head: int) -> tuple[np.ndarray, np.ndarray, float | None, float | None, float | None
                                                 ] | None:
        """(x float64, happened, held_out, rules_held_out, idle_held_out) of the head's latest matured anchor over the
        partitions held, or None; the verdicts the least of theirs (None where one was not judged; idle_held_out is
        churn_risk's, whatever the head: only its fit reads it)."""
        anchor = self.latest_matured_anchor(head)
        return None if anchor is None else self.matured_at(anchor, head)

    def latest_matured_anchor(self, head: int) -> int | None:
        return max((anchor for (_, anchor), s in self.samples.items() if s.happened[head] is not None), default=None)

    def matured_at(self, anchor: int, head: int) -> tuple[np.ndarray, np.ndarray, float | None, float | None,
                                                            float | None] | None:
        """As latest_matured, of one anchor where the head's window has closed (None: no such sample held). Where a
        partition's record is of an older release, only the columns every sample has."""
        samples = [s for (_, at), s in sorted(self.samples.items()) if at == anchor and s.happened[head] is not None]
        if not samples:
            return None
        judged, rules = [s.held_out[head] for s in samples], [s.rules_held_out[head] for s in samples]
        idle = [s.idle_held_out for s in samples]
        return (joined_x(samples), np.concatenate([s.happened[head] for s in samples]),
                None if None in judged else min(judged),
                None if None in rules else min(rules), None if None in idle else min(idle))

    def latest_taken(self) -> np.ndarray | None:
        """x float64 of the latest anchor sampled, over the partitions held (the columns every one has), or None."""
        latest = max((at for _, at in self.samples), default=None)
        if latest is None:
            return None
        return joined_x([s for (_, at), s in sorted(self.samples.items()) if at == latest])

    def latest_week(self, anchor: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """(x float64, silent) of the latest anchor whose week after it has closed (or of `anchor`, where it has),
        over the partitions held whose samples have churn_risk's logit over a week (none in a record of session 61
        or before), or None."""
        closed = self.latest_week_anchor(anchor)
        if closed is None:
            return None
        samples = [s for (_, at), s in sorted(self.samples.items()) if at == closed and week_known(s)]
        return (np.concatenate([s.x[:, :WIDTH + 1] for s in samples]).astype(np.float64),
                np.concatenate([s.week_silent for s in samples]))

    def first_purchases(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(x float64, bought) of the latest anchor whose week's purchases were noted outside purchase_propensity's
        series (Sample.week_bought), over the partitions held, or None."""
        noted = max((at for (_, at), s in self.samples.items() if s.week_bought is not None), default=None)
        if noted is None:
            return None
        samples = [s for (_, at), s in sorted(self.samples.items()) if at == noted and s.week_bought is not None]
        return joined_x(samples), np.concatenate([s.week_bought for s in samples])

    def latest_week_anchor(self, anchor: int | None = None) -> int | None:
        """The anchor latest_week reads (None: none)."""
        return max((at for (_, at), s in self.samples.items() if week_known(s) and anchor in (None, at)), default=None)

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
