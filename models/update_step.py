"""One batch through the profile pipeline: records -> state updated by the GRU -> profiles.

Source- and sink-agnostic, so the Kafka daemon, replays, bench, inspect, evaluation and training
share it. `ProfileUpdater.process` runs the stages in order: expire (with --state-ttl: the rule is
stream/expiry.py's, so replay and daemon expire the same users), decode, place and skip_applied (the
checks of models/admission.py), apply (the state step: one GRU call for every touched user's new
events, exact statistics and counters, numpy over the whole batch), choose_rows, encode (heads for
the chosen users only).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import orjson
import torch

from models.admission import Admission, ToApply
from models.features import build_features, buckets_of_keys
from models.neighbours import RECENT_ITEMS
from models.profile_model import full_float32, idle_hours, price_tier_index
from models.field_heads import FieldInputs
from models.checkpoint_io import LoadedModel
from models.category_calibration import CATEGORY_STATISTIC_INDEX, CATEGORY_STATISTICS, CATEGORY_TERMS
from models.stream_calibration import HORIZONS_HOURS, LogitMap, StreamCalibration
from stream import statistics
from stream.follow import FollowCounts, hours_since
from stream.habit import ShopHabit
from stream.tempo import ShopTempo
from stream.changelog_records import STATE_DTYPE_NAMES
from stream.decode import DecodedRecords, decode_batch
from stream.events import PURCHASE, DeadLetter, EventColumns, RecordBatch
from stream.expiry import Expired, StateExpiry
from stream.profiles import ProfileColumns, encode_profiles
from stream.pseudonyms import Pseudonymizer
from stream.runtime import torch_threads, usable_cores
from stream.settings import Settings
from stream.sources import RangeCut, TimeRange
from stream.state import StateTable

log = logging.getLogger(__name__)

TOP_CATEGORIES = 3
SHOP_POPULARITY = statistics.SLOT_FEATURES.index("shop_popularity")
FRESHNESS, HABIT_FRESHNESS, LOG_COUNT, HABIT_COUNT = (statistics.SLOT_FEATURES.index(name) for name in (
    "freshness", "habit_freshness", "log_count", "habit_count"))
# Batches at least this large run the GRU on `gru_threads` threads, beside the statistics (start_advance; smaller
# ones: thread start-up would cost more than it saves, and the daemon's small batches leave the cores to decoding
# and Kafka).
WIDE_BATCH_EVENTS = 4096


@dataclass
class BatchResult:
    """What one batch produced: built by keyword in ProfileUpdater.process."""

    profiles: list[tuple[bytes, bytes]]  # (key, value) per touched user
    dead_letters: list[DeadLetter]
    events: EventColumns  # the valid events that were applied
    out_of_range: int = 0  # valid events outside the requested event-time range (replays), not applied
    stage_seconds: dict[str, float] = field(default_factory=dict)
    # State rows changed (written to the changelog): those published, and with --publish-interval those deferred.
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    replayed: int = 0  # events at or below their user's watermark: applied before (re-consumed), skipped
    duplicates: int = 0  # events whose event_id the user's recent events already had: skipped
    # Users erased by forget records: (user id, input partition or -1). Their state is gone; the
    # daemon writes tombstones for them (changelog, output) before this batch's other records.
    erased: list[tuple[str, int]] = field(default_factory=list)
    forgotten: int = 0  # of the erased, users that had state or earlier events in this batch (not unknown ones)
    # Replays with an end bound: per input partition, the first offset of an event at or after it
    # (not applied; where a daemon started from the replay's snapshot must begin reading).
    first_after_range: dict[int, int] = field(default_factory=dict)
    # Users whose state expired (--state-ttl) in this batch, before its events: their changelog tombstones
    # and last profiles go out before the batch's other records.
    expired: Expired = field(default_factory=Expired)


class ProfileUpdater:
    """Owns the model and the state table; turns record batches into profiles."""

    def __init__(self, loaded: LoadedModel, device: torch.device, *, max_event_bytes: int, emit_embedding: bool,
                 idle_rescore_ms: int = 0, next_items: int = 0, pseudonymize_key: str = "",
                 input_topics: tuple[str, ...] = (), dedupe_window: int = 0, gru_threads: int = 0,
                 state_ttl_ms: int = 0, on_expire: str = "publish", publish_interval_ms: int = 0,
                 state_dtype: torch.dtype = STATE_DTYPE_NAMES[Settings.state_dtype], max_ahead_ms: int = 0,
                 stream_calibration: bool = Settings.stream_calibration, max_categories: int = 0) -> None:
        self.model = loaded.model.to(full_float32(device)).eval()
        self.model_version = loaded.version
        self.state_version = loaded.state_version  # what the changelog and snapshots are checked against
        self.config = loaded.model.config
        # How the model's heads read follow_pending (checkpoint format 12; stream/follow.py): read once, here.
        self.relative_pending = bool(loaded.model.fields.relative_pending)
        self.device = device
        self.max_event_bytes = max_event_bytes
        self.emit_embedding = emit_embedding
        self.item_vocab = np.asarray(loaded.item_vocab, dtype=object)
        self.item_index = {item: i for i, item in enumerate(loaded.item_vocab)}
        # Threads for the GRU over a large batch (0: as many as the other kernels); CPU only.
        self.gru_threads = gru_threads if device.type == "cpu" else 0
        self._gru_thread: ThreadPoolExecutor | None = None  # where a wide batch's GRU runs (start_advance)
        # Top-k next items per profile: only a trained model has an item vocabulary to rank.
        self.next_items = min(next_items, len(self.item_vocab))
        if next_items and not self.next_items:
            log.warning("--next-items needs a trained model with a next-item head: next_items left out")
        # Exactly-once bookkeeping: a watermark per user and input topic (records at or below it were
        # applied already: skipped when re-consumed), and the user's last `dedupe_window` event ids.
        self.topic_slot = {topic: i for i, topic in enumerate(input_topics)}
        self.state = StateTable(self.config.state_size, device, watermark_slots=len(input_topics),
                                dedupe_window=dedupe_window, recent_items=RECENT_ITEMS if self.next_items else 0,
                                unpublished=publish_interval_ms > 0, state_dtype=state_dtype)
        # --publish-interval: changed users are marked unpublished, and all of them published together once
        # per interval (wall clock), so each user at most once per interval, with its latest profile.
        self.publish_interval_s = publish_interval_ms / 1000.0
        self._publish_at = time.monotonic() + self.publish_interval_s
        # With a key, user ids are replaced by their HMAC right after decoding: state, profiles and
        # their keys only ever see pseudonyms. (Dead letters keep the original bytes: that is their job.)
        self.pseudonymize = Pseudonymizer(pseudonymize_key) if pseudonymize_key else None
        # Users who go quiet send no event that would refresh their churn risk: re-publish them
        # after this much event time without an update (0 disables). The scan runs once per tick.
        self.idle_rescore_ms = idle_rescore_ms
        self._idle_tick_ms = max(idle_rescore_ms // 24, 1)
        self._next_idle_scan = -1
        # The checks around the state step: decoding, partitioning policy, erasure, exactly-once skips.
        # How the state's users are named: raw ids, or pseudonyms under one key (snapshots record it).
        self.user_ids = f"pseudonyms {self.pseudonymize.fingerprint}" if self.pseudonymize else "raw"
        self.admission = Admission(self.state, self.topic_slot, self.pseudonymize, max_event_bytes, max_ahead_ms,
                                   max_categories, self.config.hash_seed + 1)
        self._seen_buckets: tuple[torch.Tensor | None, torch.Tensor] = (None, torch.empty(0, dtype=torch.long))
        # State that expires: users idle longer than the TTL in event time leave the table (0: never).
        self.expiry = StateExpiry(self.state, state_ttl_ms) if state_ttl_ms else None
        self.publish_expired = on_expire == "publish"  # a last profile saying "expired": true, or nothing
        # The shop's own outcomes calibrate the published probabilities (models/stream_calibration.py).
        self.calibration = (StreamCalibration(self.state, self.head_probabilities, self.category_candidates)
                            if stream_calibration else None)
        self.warm_up()

    def warm_up(self) -> None:
        """Run the batch step once on a scratch table. The first call of each kernel pays for loading it (on
        CUDA also for choosing cuDNN's algorithms): without this, the first batch after a start or a rebalance
        carries that cost. The real table, its counts and its caches are left as they were."""
        table, cached = self.state, self._seen_buckets
        self.state = StateTable(self.config.state_size, self.device,
                                recent_items=RECENT_ITEMS if self.next_items else 0, state_dtype=table.state_dtype)
        try:
            self.profiles_for(self.apply(decode_batch(RecordBatch.of(WARM_UP_EVENTS, topic="warm-up"),
                                                      self.max_event_bytes)[0]))
        finally:
            self.state, self._seen_buckets = table, cached

    def process(self, records: RecordBatch, time_range: TimeRange | None = None, *, profiles: bool = True,
                ahead: DecodedRecords | None = None) -> BatchResult:
        """The batch step, stage by stage: decode -> place -> skip_applied -> apply -> choose_rows -> encode.
        With `time_range`, only events whose event time lies in it are applied. `profiles=False` skips
        encoding the touched users' profiles (a replay that writes only final ones); the last profiles of
        users that expire are encoded either way (with --on-expire publish). `ahead`: the records' decoding, where
        it was done ahead (a replay's worker: stream/decode_ahead.py)."""
        t0 = time.perf_counter()
        expired = self.expire_idle()  # first: the batch's rows are looked up in the table without them
        t_expire = time.perf_counter() - t0
        decoded = self.admission.decode(records, ahead)  # valid events and dead letters; erasures done
        cut = RangeCut()
        if time_range is not None:  # replays of a kafka:// range, evaluations at a cut: the others are not applied
            decoded.events, cut = time_range.split(records, decoded.events)
        t1 = time.perf_counter()
        placed = self.admission.place(records, decoded)  # state rows; events on a wrong partition out
        todo = self.admission.skip_applied(placed)  # events already applied (re-read, duplicated) out
        touched = self.apply_admitted(todo, expired)
        rows = self.choose_rows(touched, todo.again)
        published = rows
        if self.publish_interval_s:  # mark the changed users; publish every marked one when the interval is up
            self.state.columns["unpublished"][rows, 0] = 1
            published = self.publish_due()
            if len(published):  # their marks were cleared: a state change the changelog must see too
                rows = np.union1d(rows, published)
        t2 = time.perf_counter()
        encoded = self.profiles_for(published) if profiles else []
        t3 = time.perf_counter()
        return BatchResult(profiles=encoded, dead_letters=placed.dead_letters, events=todo.events,
                           out_of_range=cut.outside, first_after_range=cut.first_after,
                           stage_seconds={"decode": t1 - t0 - t_expire, "model": t2 - t1 + t_expire,
                                          "encode": t3 - t2},
                           rows=rows, replayed=todo.replayed, duplicates=todo.duplicates,
                           erased=decoded.erased, forgotten=decoded.forgotten, expired=expired)

    def apply_admitted(self, todo: ToApply, expired: Expired) -> np.ndarray:
        """apply_part over the batch, in parts split at the calibration anchors it crosses (the anchors mature
        between them: models/stream_calibration.py); returns the touched rows."""
        if self.calibration is None or not len(todo.events):
            return self.apply_part(todo, expired)
        touched = []
        for anchor, take in self.calibration.parts(todo.events.ts):
            part = todo if take is None else todo.take(take)
            self.calibration.record(part.events, part.rows, anchor)  # from the users' state before the part
            touched.append(self.apply_part(part, expired))
            self.calibration.note_purchases(part.events, part.rows, anchor)
        return touched[0] if len(touched) == 1 else np.unique(np.concatenate(touched))

    def apply_part(self, todo: ToApply, expired: Expired) -> np.ndarray:
        """apply, then remember (watermarks, partitions, recent event ids); returns the touched rows. With a
        TTL, a user whose event comes more than the TTL after its previous one is expired there (added to
        `expired`) and starts afresh with that event: the events are applied in as many passes as a user
        restarted in this batch (one, nearly always)."""
        segment = self.expiry.segments(todo.rows, todo.events.ts, todo.events.record_index) if self.expiry else None
        if segment is None:
            touched = self.apply(todo.events, todo.rows)
            self.admission.remember(todo)
        else:
            passes = []
            for restarts in range(int(segment.max()) + 1):
                part = todo.take(segment == restarts)
                if restarts:  # each of these users restarts at its first event of this pass
                    back = np.unique(part.rows)
                    expired += self.last_of(back)
                    if self.calibration is not None:
                        self.calibration.leaving(back)
                    self.expiry.reset(back)
                passes.append(self.apply(part.events, part.rows))
                self.admission.remember(part)
            touched = np.unique(np.concatenate(passes))
        if self.expiry is not None:
            slot, partition, _ = todo.positions
            self.expiry.advance(np.where(slot >= 0, partition, -1), todo.events.ts)
        return touched

    def expire_idle(self, force: bool = False, settle: bool = False) -> Expired:
        """Drop the users idle longer than the TTL (when a scan is due; `settle`: the input went quiet;
        `force`: the end of a replay); returns them and, with --on-expire publish, their last profiles."""
        if self.expiry is None:
            return Expired()
        rows = self.expiry.idle_rows(force, settle)
        if not len(rows):
            return Expired()
        expired = self.last_of(rows)
        if self.calibration is not None:
            self.calibration.leaving(rows)
        drop = np.zeros(len(self.state), dtype=bool)
        drop[rows] = True
        self.state.drop_rows(drop)
        if self.state.base is not None:  # or the user's next event would bring its snapshot state back
            self.state.base.discard([user for user, _ in expired.users])
        log.debug("expired %d user(s) idle for over %d ms of event time", len(rows), self.expiry.ttl_ms)
        return expired

    def last_of(self, rows: np.ndarray) -> Expired:
        """Expiring users: (user, input partition) for their tombstones, and their last profiles."""
        state = self.state
        users = list(zip(map(state.user_ids.__getitem__, rows.tolist()), state.partition[rows].tolist()))
        return Expired(users, self.profiles_for(rows, expired=True) if self.publish_expired else [])

    def choose_rows(self, touched: np.ndarray, again: np.ndarray) -> np.ndarray:
        """The state rows whose profiles this batch publishes: the users it applied events to, those whose
        events it skipped as re-consumed, and idle users due a re-score (once each). Marks them scored."""
        rows = np.union1d(touched, again) if len(again) else touched
        if self.idle_rescore_ms:  # idle users not already touched by this batch: one profile per user
            rows = np.concatenate([rows, np.setdiff1d(self.idle_users(), rows, assume_unique=True)])
        self.state.scored_at[rows] = self.state.max_event_ts
        return rows

    def publish_due(self, force: bool = False) -> np.ndarray:
        """The unpublished users, once the interval has passed since the last time (or with `force`: at a
        shutdown or rebalance, nothing left behind); their marks are cleared. Empty otherwise."""
        if not self.publish_interval_s:
            return np.empty(0, dtype=np.int64)
        now = time.monotonic()
        if not force and now < self._publish_at:
            return np.empty(0, dtype=np.int64)
        self._publish_at = now + self.publish_interval_s
        marks = self.state.columns["unpublished"][: len(self.state), 0]
        due = np.flatnonzero(marks)
        marks[due] = 0
        return due

    @torch.inference_mode()
    def apply(self, ev: EventColumns, event_rows: np.ndarray | None = None) -> np.ndarray:
        """Apply valid events to the state; return the state rows of the touched users.
        `event_rows`: each event's state row, when the caller already looked them up."""
        if len(ev) == 0:
            return np.empty(0, dtype=np.int64)
        state = self.state
        if event_rows is None:
            event_rows = state.rows_for(ev.user_id)  # new users get rows here
        # Users by state row: grouping integers is cheaper than strings.
        rows, user_of_event = np.unique(event_rows, return_inverse=True)  # (U,), (N,)

        # Each user's events in event-time order; arrival order breaks ties.
        order = np.lexsort((ev.record_index, ev.ts, user_of_event))
        user_sorted = user_of_event[order]
        ts = ev.ts[order]
        lengths = np.bincount(user_sorted, minlength=len(rows))
        starts = np.zeros_like(lengths)
        np.cumsum(lengths[:-1], out=starts[1:])
        position = np.arange(len(order)) - starts[user_sorted]

        # Time since the same user's previous event: from state for the first event of the batch.
        previous = np.empty_like(ts)
        previous[1:] = ts[:-1]
        first_in_batch = position == 0
        previous[first_in_batch] = state.last_ts[rows[user_sorted[first_in_batch]]]
        first_ever = previous < 0
        gap_seconds = np.where(first_ever, 0.0, (ts - previous) / 1000.0)

        cfg = self.config
        price = ev.price[order]
        category = ev.category[order]
        feats = build_features(
            ev.type_idx[order], ev.item_id[order], category, price, ev.query[order], gap_seconds, first_ever,
            item_buckets=cfg.item_buckets, category_buckets=cfg.category_buckets,
            query_buckets=cfg.query_buckets, hash_seed=cfg.hash_seed, device=self.device,
            item_index=self.item_index, catalogue=self.model.catalogue,
        )
        rows_t = torch.from_numpy(rows).to(self.device)
        x = self.model.embed(feats)  # (N, F)
        # Events per user before this batch (the memory's age): the counters are updated below.
        advanced = self.start_advance(state.states[rows_t].float(), x, user_sorted, position, lengths,
                                      state.counts[rows].sum(axis=1))
        keys = feats.category_key  # the categories exactly, where buckets may collide
        state.remember_categories(keys, category)
        # The exact statistics the field heads read (before last_ts moves: they decay from it).
        follow_before, keys_before = FollowCounts.pairs(state.columns, rows), state.columns["cat_key"][rows]
        tempo_before, habit_before = ShopTempo.parts(state.columns, rows), ShopHabit.parts(state.columns, rows)
        statistics.update(state.columns, rows, user_sorted, ts, ev.type_idx[order], keys, starts,
                          lengths, gap_seconds * 1000.0, first_ever, state.last_ts[rows].copy())
        state.follow.replace(follow_before, FollowCounts.pairs(state.columns, rows))
        state.habit.change(habit_before, -1)
        state.habit.change(ShopHabit.parts(state.columns, rows), 1)
        state.holders.replace(keys_before, state.columns["cat_key"][rows])

        # Exact counters, vectorised (np.add.at accumulates repeated rows).
        event_rows = rows[user_sorted]
        type_idx = ev.type_idx[order]
        np.add.at(state.counts, (event_rows, type_idx), 1)
        purchase = (type_idx == PURCHASE) & ~np.isnan(price)
        add_spend(state.spend_micros, event_rows[purchase], np.rint(price[purchase] * ev.quantity[order][purchase] * 1e6))
        priced = ~np.isnan(price)
        np.add.at(state.price_sum, event_rows[priced], price[priced])
        np.add.at(state.price_n, event_rows[priced], 1)
        last_of_user = ts[starts + lengths - 1]
        if self.next_items:  # the items the next-item bonuses read: the latest events' (the state is after them)
            recent = state.columns["recent_items"]
            recent[rows] = shift_in(recent[rows], feats.item_vocab.cpu().numpy(), starts, lengths)
        state.tempo.change(tempo_before, -1)  # (after the counters: a user's in-visit gaps are events less sessions)
        state.tempo.change(ShopTempo.parts(state.columns, rows), 1)
        state.last_ts[rows] = np.maximum(state.last_ts[rows], last_of_user)
        state.max_event_ts = max(state.max_event_ts, int(ts.max()))
        state.states[rows_t] = advanced().to(state.state_dtype)
        return rows

    def start_advance(self, s0: torch.Tensor, x: torch.Tensor, user_sorted: np.ndarray, position: np.ndarray,
                      lengths: np.ndarray, events_before: np.ndarray) -> Callable[[], torch.Tensor]:
        """ProfileModel.advance over a batch, started; returns what waits for its (U, S) states. Over a wide batch
        on the CPU it runs in a thread while the caller advances the behaviour statistics, which read nothing it
        writes: torch releases the GIL in its kernels, and the GRU was the largest step left in the replay's loop
        once the decoding ran ahead (bench500k on two cores: docs/benchmarks.md, session 75). The recurrent pass
        over a wide batch is also the one kernel big enough to gain from more threads (gru_threads)."""
        threads = self.gru_threads if len(x) >= WIDE_BATCH_EVENTS else 0  # (0 on a GPU: __init__)

        def advance() -> torch.Tensor:
            with torch.inference_mode(), torch_threads(threads):
                return self.model.advance(s0, x, user_sorted, position, lengths, events_before)

        if not threads:
            states = advance()
            return lambda: states
        if self._gru_thread is None:
            self._gru_thread = ThreadPoolExecutor(1, thread_name_prefix="gru")
        return self._gru_thread.submit(advance).result

    def idle_users(self) -> np.ndarray:
        """Rows of users whose last published profile is `idle_rescore_ms` of event time old.

        Event time is the largest event time seen, so replays behave like live runs. Scans the
        whole table, but only when that clock has moved a tick (1/24 of the period) since the last scan.
        """
        state = self.state
        now = state.max_event_ts
        if now < self._next_idle_scan or len(state) == 0:
            return np.empty(0, dtype=np.int64)
        self._next_idle_scan = now + self._idle_tick_ms
        scored = state.scored_at[: len(state)]
        return np.flatnonzero((scored >= 0) & (now - scored >= self.idle_rescore_ms))

    def all_profiles(self, chunk_users: int = 50_000) -> Iterator[list[tuple[bytes, bytes]]]:
        """Every user's current profile, in chunks (the end of a replay)."""
        for first in range(0, len(self.state), chunk_users):
            yield self.profiles_for(np.arange(first, min(first + chunk_users, len(self.state))))

    def seen_category_buckets(self) -> torch.Tensor:
        """(S,) the model's bucket of each of state.seen_categories() (keys): the columns the category
        heads score. Two categories may share a bucket; their repeat sides (the user's slots) stay apart."""
        seen = self.state.seen_categories()
        if self._seen_buckets[0] is not seen:  # the state's cache is rebuilt whenever the categories change
            self._seen_buckets = (seen, torch.from_numpy(
                buckets_of_keys(seen.cpu().numpy(), self.config.category_buckets)).to(self.device))
        return self._seen_buckets[1]

    def slots(self, rows: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """(U, K + 1) category keys and (U, K + 1, len(SLOT_FEATURES)) features of the users' category
        slots, and a last slot: the most frequent follow-up of the user's latest purchase in this shop
        (stream/follow.py), where none of the user's slots holds it."""
        state = self.state
        keys, feats = statistics.slot_features(state.columns, state.last_ts, rows, now_ms)
        purchase = state.columns["purchase_category"][rows].astype(np.int64)
        since = hours_since(now_ms, state.columns["last_purchase_ts"][rows])
        own = state.columns["follow_category"][rows].astype(np.int64)
        keys, feats = state.follow.with_follow_ups(keys, feats, purchase, since, own, self.relative_pending)
        held = np.zeros(keys.shape, dtype=bool)
        held[:, :-1] = keys[:, :-1] > 0  # the user's own slots; the last is the follow-up it has not
        feats[:, :, SHOP_POPULARITY] = state.holders.popularity(keys, held)
        toward_latest, toward_counts = self.habit_leans(now_ms)
        feats[:, :, HABIT_FRESHNESS] = feats[:, :, FRESHNESS] * toward_latest
        feats[:, :, HABIT_COUNT] = feats[:, :, LOG_COUNT] * toward_counts
        return keys, feats

    def habit_leans(self, now_ms: int) -> tuple[float, float]:
        """How far top_categories leans toward the users' latest categories, and toward their most engaged-with ones,
        in this shop at now_ms (stream/habit.py), beyond the leans the heads learned in (models/field_heads.py)."""
        heads = self.model.fields
        trained = torch.stack([heads.habit_lean_trained, heads.habit_counts_lean_trained]).tolist()  # one device read
        return tuple(max(lean - fitted, 0.0) for lean, fitted in zip(self.state.habit.leans(now_ms), trained))

    def field_inputs(self, rows: np.ndarray, now_ms: int,
                     slots: tuple[np.ndarray, np.ndarray] | None = None) -> FieldInputs:
        """The statistics the field heads read for these rows at the clock now_ms; slots as columns of
        state.seen_categories(). Serving and the field heads' training both read them here. slots: what
        self.slots(rows, now_ms) returns, where the caller has it already."""
        seen = self.state.seen_categories()
        user, idle_steps = self.user_inputs(rows, now_ms)
        keys, slot = self.slots(rows, now_ms) if slots is None else slots
        b = torch.from_numpy(keys).to(self.device)
        cols = torch.searchsorted(seen, b).clamp(max=max(len(seen) - 1, 0))
        valid = (b > 0) & (seen[cols] == b) if len(seen) else torch.zeros_like(b, dtype=torch.bool)
        return FieldInputs(user, cols, valid, torch.from_numpy(slot).to(self.device), idle_steps)

    def user_inputs(self, rows: np.ndarray, now_ms: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, len(USER_FEATURES)) user statistics and (U,) idle steps at the clock now_ms: all that the two
        probability heads read besides the state (the category slots are top_categories')."""
        state = self.state
        user = statistics.user_features(state.columns, state.counts, state.last_ts, rows, now_ms)
        # Idle time in the shop's own pace (stream/tempo.py): what the session processes of the heads decay by.
        idle_minutes = np.expm1(user[:, statistics.USER_FEATURES.index("log_idle_minutes")].astype(np.float64))
        idle_steps = torch.from_numpy((idle_minutes / state.tempo.step_minutes).astype(np.float32))
        return torch.from_numpy(user).to(self.device), idle_steps.to(self.device)

    @torch.inference_mode()
    def head_probabilities(self, rows: np.ndarray, now_ms: int, hours: tuple[float, float] = HORIZONS_HOURS,
                           chunk_users: int = 50_000) -> np.ndarray:
        """(U, 2) purchase_propensity and churn_risk of these users at the clock now_ms over the contract's horizons
        (or other hours), as the model says them (no calibration map): what the calibration anchors record."""
        out = np.empty((len(rows), 2), dtype=np.float32)
        for a in range(0, len(rows), chunk_users):
            part = rows[a:a + chunk_users]
            s = self.state.states[torch.from_numpy(part).to(self.device)].float()
            user, idle_steps = self.user_inputs(part, now_ms)
            no_slots = torch.zeros(len(part), 0, dtype=torch.long, device=self.device)
            inputs = FieldInputs(user, no_slots, no_slots.bool(), user.new_zeros(len(part), 0, 0), idle_steps)
            purchase, churn = self.model.field_probabilities(s, inputs, *hours)
            out[a:a + len(part)] = torch.stack([purchase, churn], dim=1).cpu().numpy()
        return out

    @torch.inference_mode()
    def category_candidates(self, rows: np.ndarray, now_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """top_categories' candidates of these users at the clock now_ms, as profiles_for ranks them (before any
        re-ranking): (U, C) category keys (0: none) and (U, C, 1 + len(CATEGORY_STATISTICS)) float16, each
        candidate's log P(c) (-inf: none) and its slot's statistics (0 for explore's)."""
        s, idle, inputs = self.serving_inputs(rows, now_ms)
        p, cols = self.model.category_candidates(s, self.model.next_visit_idle(idle), self.seen_category_buckets(),
                                                 inputs, TOP_CATEGORIES)
        held = (p >= 0).cpu().numpy()
        keys = np.where(held, self.state.seen_categories()[cols].cpu().numpy(), 0).astype(np.uint32)
        x = np.zeros((*keys.shape, 1 + len(CATEGORY_STATISTICS)), dtype=np.float16)
        x[:, :, 0] = np.where(held, np.log(np.maximum(p.double().cpu().numpy(), 1e-30)), -np.inf)
        x[:, :inputs.slot.shape[1], 1:] = inputs.slot[:, :, list(CATEGORY_STATISTIC_INDEX)].cpu().numpy()
        return keys, x

    def serving_inputs(self, rows: np.ndarray, now_ms: int) -> tuple[torch.Tensor, torch.Tensor, FieldInputs]:
        """What the heads read of these users at the clock now_ms: their (U, S) states (GRU hidden state + memory),
        (U,) idle hours and field inputs."""
        s = self.state.states[torch.from_numpy(rows).to(self.device)].float()
        idle = torch.from_numpy(idle_hours(now_ms, self.state.last_ts[rows])).float().to(self.device)
        return s, idle, self.field_inputs(rows, now_ms)

    def slot_weights(self, shop_map: LogitMap) -> torch.Tensor | None:
        """(len(SLOT_FEATURES) + 1,) the shop's re-ranking of top_categories: the weights on the slots' statistics,
        then on the candidates' log P(c) (models/category_calibration.py CATEGORY_TERMS); None where the map does
        not re-rank."""
        if not shop_map.reranks():
            return None
        weights = torch.zeros(len(statistics.SLOT_FEATURES) + 1, dtype=torch.float64)
        on_statistics = shop_map.category_weights[:len(CATEGORY_STATISTICS)]
        weights[list(CATEGORY_STATISTIC_INDEX)] = torch.tensor(on_statistics, dtype=torch.float64)
        weights[-1] = shop_map.category_weights[CATEGORY_TERMS.index("log_p")]
        return weights.to(self.device)

    @torch.inference_mode()
    def profiles_for(self, rows: np.ndarray, horizons_hours: tuple[float, float] | None = None, *,
                     expired: bool = False) -> list[tuple[bytes, bytes]]:
        """Profiles of the given state rows, encoded for the output topic. horizons_hours: (purchase, churn)
        horizons other than the contract's (the evaluation's, where a log ends before them). expired: the
        users' last profiles before their state expires (they say so)."""
        if len(rows) == 0:
            return []
        state, cfg = self.state, self.config
        s, idle, inputs = self.serving_inputs(rows, state.max_event_ts)
        # Top categories: a distribution over the category list (those seen in events, less those an
        # erasure dropped), computed for those columns only (S categories, not every bucket).
        seen = self.seen_category_buckets()  # (S,) each listed category's bucket
        shop_map = self.calibration.shop_map() if self.calibration is not None else LogitMap()
        heads = self.model.heads(s, idle, seen, TOP_CATEGORIES, inputs, horizons_hours, self.slot_weights(shop_map))
        purchase, churn = heads.purchase_propensity, heads.churn_risk
        if self.calibration is not None:  # the map of the contract's horizons (over an evaluation's shorter ones,
            # carried over from the model's probabilities over the horizons); inputs.user: the rules' statistics too
            purchase_h, churn_h = horizons_hours or (None, None)
            short = horizons_hours is not None and tuple(horizons_hours) != HORIZONS_HOURS and any(shop_map.kept)
            at_horizon = self.model.field_probabilities(s, inputs, *HORIZONS_HOURS) if short else (None, None)
            purchase = shop_map.apply(0, purchase, purchase_h, inputs.user, at_horizon[0])
            churn = shop_map.apply(1, churn, churn_h, inputs.user, at_horizon[1])
        top_cols, top_scores = heads.top_category_cols, heads.top_category_probs
        top_names = state.seen_category_names()[top_cols.cpu().numpy()].tolist()  # (U, k) names, best first
        top_scores = np.round(top_scores.double().cpu().numpy(), 6).tolist()

        price_n = state.price_n[rows]
        mean_price = np.divide(state.price_sum[rows], price_n, out=np.full(len(rows), np.nan), where=price_n > 0)
        # Tier names by index, "unknown" (no priced event yet) at -1: one gather, no loop over users.
        tier_names = np.array([*cfg.price_tier_names, "unknown"], dtype=object)
        tiers = tier_names[price_tier_index(mean_price, cfg)].tolist()

        next_items = None
        if self.next_items:
            recent = torch.from_numpy(state.columns["recent_items"][rows].astype(np.int64)).to(self.device)
            best = self.model.item_scores(s, current=recent[:, 0], recent=recent).topk(self.next_items, dim=1
                                                                                        ).indices.cpu().numpy()
            next_items = self.item_vocab[best].tolist()
        cols = ProfileColumns(
            user_ids=list(map(state.user_ids.__getitem__, rows.tolist())),
            last_event_ts=state.last_ts[rows],
            counts=state.counts[rows],
            spend_micros=state.spend_micros[rows],
            top_category_names=top_names,
            top_category_scores=top_scores,
            purchase_propensity=purchase.cpu().numpy(),
            churn_risk=churn.cpu().numpy(),
            price_tier=tiers,
            interest_cluster=heads.interest_cluster.cpu().numpy(),
            embedding=s.float().cpu().numpy() if self.emit_embedding else None,
            next_items=next_items,
            expired=expired,
        )
        return encode_profiles(cols, self.model_version, int(time.time() * 1000))


# A few events of two users, every event type and field: what warm_up() runs through the batch step.
WARM_UP_EVENTS = [orjson.dumps({"event_id": f"warm-up-{i}", "user_id": f"warm-up-{i % 2}", "type": kind,
                                "ts": 1_700_000_000_000 + 60_000 * i, "item_id": f"item-{i % 3}", "category": "warm-up",
                                "price": 9.5, "query": "warm up", **({"quantity": 1} if kind == "purchase" else {})})
                  for i, kind in enumerate(["search", "click", "add_to_cart", "purchase"] * 2)]


# Spend saturates here (micro-units: 9e12 currency units) instead of wrapping round to negative.
SPEND_MAX_MICROS = 9_000_000_000_000_000_000


def shift_in(recent: np.ndarray, items: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Each user's latest items, latest first, after a batch: (U, L) before, latest first; items: the batch's
    events sorted by (user, time), user u's at starts[u]:starts[u] + lengths[u]. The same whatever the batching."""
    j = np.arange(recent.shape[1])[None, :]
    from_batch = j < lengths[:, None]  # slot j: the user's j-th latest event of this batch, else an older one
    batch_at = np.maximum(starts[:, None] + lengths[:, None] - 1 - j, 0)
    older = np.take_along_axis(recent, np.clip(j - lengths[:, None], 0, recent.shape[1] - 1), axis=1)
    return np.where(from_batch, items[batch_at], older).astype(recent.dtype)


def add_spend(spend_micros: np.ndarray, rows: np.ndarray, micros: np.ndarray) -> None:
    """Add each purchase's micro-units (floats, integral, each at most MAX_AMOUNT x 1e6) to its row's total,
    exactly, saturating at SPEND_MAX_MICROS. A float sum beside the int64 one tells where the int64 could
    have wrapped (its error is far below the margin between SPEND_MAX_MICROS and int64's maximum)."""
    if not len(rows):
        return
    targets, which = np.unique(rows, return_inverse=True)
    exact = np.zeros(len(targets), dtype=np.int64)
    np.add.at(exact, which, micros.astype(np.int64))
    approx = spend_micros[targets].astype(np.float64)
    np.add.at(approx, which, micros)
    with np.errstate(over="ignore"):
        total = spend_micros[targets] + exact  # wraps only where approx is far over the cap
    spend_micros[targets] = np.where(approx >= SPEND_MAX_MICROS, SPEND_MAX_MICROS,
                                     np.minimum(total, SPEND_MAX_MICROS))


def load_updater(settings: Settings, untrained_asked: bool = False) -> ProfileUpdater:
    """The updater the settings ask for: a checkpoint, or an untrained model (with one warning unless asked for).
    It keeps watermarks for the offsets of settings.state_topics (the daemon's inputs, or with --repartition
    the topic they are re-keyed into)."""
    from models.profile_model import resolve_device
    from models.checkpoint_io import load_checkpoint, untrained

    device = resolve_device(settings.device)
    if device.type == "cpu" and settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.model_path:
        loaded = load_checkpoint(settings.model_path, device)
        log.info("model %s loaded from %s on %s", loaded.version, settings.model_path, device)
    else:
        loaded = untrained()
        if not untrained_asked:  # `profiles bench` times one of the model's size on purpose: it has no --model
            log.warning("no --model given: serving a freshly initialised model (%s). Counters and spend are "
                        "exact; learned fields (top_categories scores, propensity, churn, cluster) are untrained.",
                        loaded.version)
    return ProfileUpdater(loaded, device, max_event_bytes=settings.max_event_bytes,
                          emit_embedding=settings.emit_embedding, idle_rescore_ms=settings.idle_rescore_after_ms,
                          next_items=settings.next_items, pseudonymize_key=settings.pseudonymize_key,
                          input_topics=settings.state_topics, dedupe_window=settings.dedupe_window,
                          gru_threads=settings.gru_threads or usable_cores(), state_ttl_ms=settings.state_ttl_ms,
                          on_expire=settings.on_expire, publish_interval_ms=settings.publish_interval_ms,
                          state_dtype=STATE_DTYPE_NAMES[settings.state_dtype], max_ahead_ms=settings.max_ahead_ms,
                          stream_calibration=settings.stream_calibration, max_categories=settings.max_categories)
