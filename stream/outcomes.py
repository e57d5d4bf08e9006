"""What followed the published probabilities, counted by the stream itself: the inputs of the shop's own
calibration (models/stream_calibration.py; docs/model.md, "Calibrated by the stream").

Event time is cut into anchors a purchase horizon apart (7 days). A user who held state at anchor k keeps a
record of it in state columns (ANCHOR_COLUMNS), in the slot k % PHASES (an anchor's churn window spans PHASES
of them): taken at the user's first event after the anchor, before that event is applied, it holds the bins of
what purchase_propensity and churn_risk said at the anchor's clock, when the user came back and when the user
first bought after it. When the clock reaches anchor k + 1, anchor k's purchase window has closed, and at
k + PHASES its return window: its records and the users silent since before it (said at the anchor's clock from
their unchanged state: they did not come back, did not buy) are counted here, for that head, per logit bin and
outcome. Those counts are all that must outlive the users' next records, so they are kept per input partition
(each partition's in its changelog meta record; a member sums those of the partitions it holds) for each head's
latest KEPT_ANCHORS matured anchors. A week after anchor k, who stayed away that week is counted too (the week
series), for the latest two anchors: how churn_risk's map follows a shop that moved since its anchor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stream.anchor_samples import AnchorSamples
from stream.profiles import CHURN_HORIZON_HOURS, PURCHASE_HORIZON_HOURS

ANCHOR_MS = int(PURCHASE_HORIZON_HOURS * 3_600_000)
PHASES = round(CHURN_HORIZON_HOURS / PURCHASE_HORIZON_HOURS)  # anchors whose windows are open at once
PURCHASE_WINDOW_MINUTES = PURCHASE_HORIZON_HOURS * 60
HEADS = ("purchase_propensity", "churn_risk")
PURCHASE_SERIES = HEADS.index("purchase_propensity")
# What is counted at each anchor (the counts' first key): each head's outcome over its horizon, and a fresher one
# for churn_risk, silent for the week after the anchor, which tells how the shop's return rate moved since the
# anchor its map is fitted on (models/stream_calibration.py, drift). Each series' bins are its head's.
SERIES = (*HEADS, "churn_risk_week")
SERIES_HEAD = (0, 1, 1)
WEEK_SERIES = SERIES.index("churn_risk_week")
# Where a table started that way (Outcomes.purchase_sooner), how many anchors before complete_from (two weeks after
# its first events) each series is counted from. purchase_propensity's from a week after them: a purchase within the
# week says the same of a table's second-week users as of later ones (session 62). The week's silence from the
# table's first anchor: a young table's churn_risk is mapped on it (models/stream_calibration.py, with_week), where
# the demo read a young table's silence 0.1-0.4 off (the first month of 30 independent worlds: churn ECE 0.17 ->
# 0.08; docs/model-journal.md, session 74); the first anchor's map moves the level alone (with_week). churn_risk's
# own two weeks stay counted from two weeks: a map fitted nine days in read the classic shop's later users worse
# than none (session 61).
SOONER = {PURCHASE_SERIES: 1, WEEK_SERIES: 2}
# Anchors after which each series' window has closed: a purchase's a week after the anchor, a return's two.
WEEK = round(PURCHASE_HORIZON_HOURS * 3_600_000 / ANCHOR_MS)
MATURES_AFTER = (WEEK, PHASES, WEEK)
# A head's logit is counted in one of BINS bins over [-LOGIT_LIMIT, LOGIT_LIMIT] (a quarter of a logit each:
# the fitted maps came out the same as on exact logits, within 0.001 of ECE, in session 53's prototype).
BINS = 64
LOGIT_LIMIT = 8.0
# Matured anchors the map is fitted on: the latest only (two to three weeks old). Over four cuts of nine worlds
# unlike the demo's shop, the latest two or three gave no better ECEs (the map follows a drifting shop less
# closely); the gate keeps one anchor's noise out.
KEPT_ANCHORS = 1
# The week series keeps the anchor churn_risk's map is fitted on and the latest one after it.
KEPT = (KEPT_ANCHORS, KEPT_ANCHORS, PHASES - WEEK + 1)
# The shop's purchase rate at the latest RATE_ANCHORS anchors (Outcomes.rates): how much it moves week to week
# (models/stream_calibration.py, rate_volatility).
RATE_ANCHORS = 4

# Host columns of the state (stream/state.py COLUMNS): the user's record of the latest anchor it came back after.
ANCHOR_COLUMNS: dict[str, tuple[type, tuple[int, ...], float]] = {
    "anchor": (np.int32, (PHASES,), -1),  # the anchor's number (event time // ANCHOR_MS); -1: none
    "anchor_bins": (np.uint8, (PHASES, len(HEADS)), 0),  # each head's logit bin at the anchor's clock
    "back_minutes": (np.float32, (PHASES,), -1.0),  # from the anchor to the user's first event after it
    "bought_minutes": (np.float32, (PHASES,), -1.0),  # from the anchor to the first purchase after it; -1: none yet
}


def logit_bins(probabilities: np.ndarray) -> np.ndarray:
    """(N, ...) probabilities -> their logits' bins (uint8)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    logit = np.clip(np.log(p) - np.log1p(-p), -LOGIT_LIMIT, LOGIT_LIMIT)
    return np.minimum(((logit + LOGIT_LIMIT) * (BINS / (2 * LOGIT_LIMIT))).astype(np.int64), BINS - 1).astype(np.uint8)


def bin_logits() -> np.ndarray:
    """(BINS,) the logit at each bin's middle."""
    width = 2 * LOGIT_LIMIT / BINS
    return -LOGIT_LIMIT + width * (np.arange(BINS) + 0.5)


def anchor_of(ts_ms: int) -> int:
    return int(ts_ms) // ANCHOR_MS


@dataclass
class Outcomes:
    """Matured anchors' counts, series by series: (series, partition, anchor) -> (BINS, 2) users by logit bin and
    outcome (0: did not happen, 1: did; for churn_risk 1 is "did not come back within the horizon", for its week
    series "within a week"). An anchor matures for purchase_propensity and the week series a week after it and for
    churn_risk two weeks after it (MATURES_AFTER)."""

    counts: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)
    # Users who left the table (their state expired) while an anchor's window was open, counted when they left:
    # added to the anchor's counts when it matures.
    pending: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)
    # Anchors before this one are not counted: records may be missing (state restored from a release that kept
    # none), or the table held events for less than a churn horizon before them. None: every anchor counts.
    complete_from: int | None = None
    # The SOONER series' anchors (purchase_propensity's and, since session 74, the week series') are counted from
    # before complete_from: set at a table's first events, whose first two weeks are left out of churn_risk's counts
    # (models/stream_calibration.py, parts); a partition's record without it (an older release's, or a table
    # restored from one) clears it, and every series counts from complete_from; None: not set.
    purchase_sooner: bool | None = None
    version: int = 0  # bumped at each change (the changelog re-sends the meta records)
    # The users sampled at the latest anchors, with the rules' statistics then (stream/anchor_samples.py).
    samples: AnchorSamples = field(default_factory=AnchorSamples)
    # (partition, anchor) -> the users' events and purchases at the anchor's clock, each faded with a week's time
    # constant (the state's activity and purchase masses), summed: the shop's purchase rate of about the week
    # before, at the latest RATE_ANCHORS anchors a sample was taken at.
    rates: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)

    def add(self, series: int, anchor: int, partitions: np.ndarray, bins: np.ndarray, happened: np.ndarray,
            pending: bool = False) -> None:
        """One series' matured anchor: its users' input partitions, bins and outcomes (N,), with the users counted
        as they left before it matured. `pending`: users leaving now, before it matures."""
        into = self.pending if pending else self.counts
        for partition in np.unique(partitions).tolist():
            mine = partitions == partition
            grid = np.zeros((BINS, 2), dtype=np.int64)
            np.add.at(grid, (bins[mine].astype(np.int64), happened[mine].astype(np.int64)), 1)
            key = (series, int(partition), anchor)
            into[key] = into.get(key, 0) + grid
        if not pending:
            for key in [key for key in self.pending if key[0] == series and key[2] <= anchor]:  # earlier: never counted
                if key[2] == anchor:
                    self.counts[key] = self.counts.get(key, 0) + self.pending[key]
                del self.pending[key]
            self._keep_latest()
        self.version += 1

    def note_rate(self, anchor: int, partitions: np.ndarray, events: np.ndarray, purchases: np.ndarray) -> None:
        """The faded events and purchases (N,) of the users held at the anchor's clock, with their partitions."""
        for partition in np.unique(partitions).tolist():
            mine = partitions == partition
            self.rates[(int(partition), anchor)] = np.array([events[mine].sum(), purchases[mine].sum()])
        kept = sorted({anchor for _, anchor in self.rates})[-RATE_ANCHORS:]
        self.rates = {key: sums for key, sums in self.rates.items() if key[1] in kept}
        self.version += 1

    def rate_sums(self) -> list[tuple[int, float, float]]:
        """(anchor, faded events, faded purchases) of each anchor noted, over every partition held, in time order."""
        out: dict[int, np.ndarray] = {}
        for (_, anchor), sums in self.rates.items():
            out[anchor] = out.get(anchor, 0) + sums
        return [(anchor, float(sums[0]), float(sums[1])) for anchor, sums in sorted(out.items())]

    def counted(self, anchor: int, series: int | None = None) -> bool:
        """Whether the anchor's users are counted for the series (complete_from; the SOONER series' from that many
        anchors before where purchase_sooner); series None: for every series."""
        sooner = SOONER.get(series, 0) if self.purchase_sooner else 0
        return anchor >= 0 and (self.complete_from is None or anchor >= self.complete_from - sooner)

    def anchors(self, series: int) -> list[int]:
        return sorted({anchor for h, _, anchor in self.counts if h == series})

    def total(self) -> np.ndarray:
        """(len(HEADS), BINS, 2) over every partition held and each head's kept anchors."""
        return np.stack([self.of_anchor(head) for head in range(len(HEADS))])

    def of_anchor(self, series: int, anchor: int | None = None) -> np.ndarray:
        """(BINS, 2) of one series' anchor (None: its kept anchors) over every partition held."""
        out = np.zeros((BINS, 2), dtype=np.int64)
        for (s, _, a), grid in self.counts.items():
            if s == series and anchor in (None, a):
                out += grid
        return out

    def _keep_latest(self) -> None:
        kept = {(series, anchor) for series, latest in enumerate(KEPT) for anchor in self.anchors(series)[-latest:]}
        self.counts = {key: grid for key, grid in self.counts.items() if (key[0], key[2]) in kept}

    def drop_partitions(self, partitions: set[int]) -> None:
        if any(key[1] in partitions for key in [*self.counts, *self.pending]) or any(
                key[0] in partitions for key in [*self.samples.samples, *self.rates]):
            self.counts = {key: grid for key, grid in self.counts.items() if key[1] not in partitions}
            self.pending = {key: grid for key, grid in self.pending.items() if key[1] not in partitions}
            self.rates = {key: sums for key, sums in self.rates.items() if key[0] not in partitions}
            self.samples.drop_partitions(partitions)
            self.version += 1

    def of_partition(self, partition: int) -> dict:
        """A partition's counts as the changelog's meta record carries them."""
        return {"complete_from": self.complete_from, "purchase_sooner": self.purchase_sooner,
                "samples": self.samples.of_partition(partition),
                "rates": [[anchor, *sums.tolist()] for (p, anchor), sums in sorted(self.rates.items())
                          if p == partition],
                **{name: [[head, anchor, grid.tolist()] for (head, p, anchor), grid in sorted(kept.items())
                          if p == partition]
                   for name, kept in (("counts", self.counts), ("pending", self.pending))}}

    def merge_partition(self, partition: int, plain: dict) -> None:
        """A partition's counts read back (replacing what this member had of it)."""
        for name in ("counts", "pending"):
            kept = {key: grid for key, grid in getattr(self, name).items() if key[1] != partition}
            for head, anchor, grid in plain.get(name, []):
                kept[(int(head), partition, int(anchor))] = np.asarray(grid, dtype=np.int64).reshape(BINS, 2)
            setattr(self, name, kept)
        self.samples.merge_partition(partition, plain.get("samples", []))
        self.rates = {key: sums for key, sums in self.rates.items() if key[0] != partition} | {
            (partition, int(anchor)): np.array([events, purchases], dtype=np.float64)
            for anchor, events, purchases in plain.get("rates", [])}  # none in a record before session 68
        if plain.get("complete_from") is not None:
            self.complete_from = max(self.complete_from or plain["complete_from"], plain["complete_from"])
        theirs = bool(plain.get("purchase_sooner"))
        self.purchase_sooner = theirs if self.purchase_sooner is None else self.purchase_sooner and theirs
        self._keep_latest()
        self.version += 1

    def to_plain(self) -> dict:
        """For a state snapshot (JSON)."""
        return {"complete_from": self.complete_from, "purchase_sooner": self.purchase_sooner,
                "samples": self.samples.to_plain(),
                "rates": [[*key, *sums.tolist()] for key, sums in sorted(self.rates.items())],
                **{name: [[*key, grid.tolist()] for key, grid in sorted(kept.items())]
                   for name, kept in (("counts", self.counts), ("pending", self.pending))}}

    @classmethod
    def from_plain(cls, plain: dict | None, clock_ms: int) -> Outcomes:
        """Counts of a snapshot; one of an earlier release (None) kept no records: counting starts at the next
        anchor."""
        if plain is None:
            return cls(complete_from=anchor_of(clock_ms) + 1 if clock_ms >= 0 else None)
        counts, pending = ({(int(h), int(p), int(a)): np.asarray(g, dtype=np.int64).reshape(BINS, 2)
                            for h, p, a, g in plain.get(name, [])} for name in ("counts", "pending"))
        rates = {(int(p), int(a)): np.array([events, purchases], dtype=np.float64)
                 for p, a, events, purchases in plain.get("rates", [])}
        return cls(counts, pending, plain.get("complete_from"), plain.get("purchase_sooner"),
                   samples=AnchorSamples.from_plain(plain.get("samples")), rates=rates)
