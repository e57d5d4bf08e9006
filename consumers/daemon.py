"""The always-on daemon: poll a batch -> process -> commit the previous batch -> stage this one.

What commits together (state changelog, profiles, dead letters, erasures, input offsets), and so the
delivery guarantees, is stream/changelog.py's; see docs/architecture.md, "Delivery guarantees".
This module runs the loop: the consumer group's callbacks (restore on assignment, finish the batch in
hand on revocation, drop what was lost), pacing, health and metrics.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import orjson
import torch
from confluent_kafka import KafkaError, TopicPartition

from models.category_calibration import CATEGORY_TERMS
from models.stream_calibration import IDLE_QUANTILES, LogitMap
from models.update_step import BatchResult, ProfileUpdater
from consumers.source import LOGGED_BY_LIBRDKAFKA, KafkaBatchSource, errors_log
from stream.changelog import Changelog
from stream.events import DEAD_LETTER_MAX_VALUE_BYTES, EVENT_TYPES, DeadLetter, RecordBatch, iso_time
from stream.habit import CONTESTS
from stream.kafka import (
    Publisher, StreamError, TopicError, admin_client, check_copartitioned, check_exist, committed_partitions,
    ensure_topics, offsets_at, partition_counts, seed_group_offsets,
)
from stream.metrics import Health, Metrics, brokers_up, consumer_lag, resident_bytes
from stream.anchor_samples import STATISTICS
from stream.outcomes import HEADS
from stream.repartition import Forwarded, rekey, split_upstream
from stream.runtime import tune_garbage_collector
from stream.settings import Settings
from stream.snapshot_files import read_snapshot

log = logging.getLogger(__name__)

TOPIC_CHECK_EVERY_S = 5.0  # while an input topic is missing: how often to look for it again


@dataclass
class DaemonStats:
    """Running totals for live views and tests (the metrics registry has the same, for Prometheus)."""

    batches: int = 0
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    profiles: int = 0
    commits: int = 0
    batch_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=4096))
    started_at: float = field(default_factory=time.monotonic)
    assigned_at: float | None = None  # perf_counter when the first partitions were assigned
    first_batch_at: float | None = None  # perf_counter when the first non-empty batch started
    last_batch_done_at: float | None = None  # ...and when the latest one was committed
    quiet_polls: int = 0  # polls that found no records (each after the state settled: _expire_while_quiet)


class ProfileDaemon:
    def __init__(self, settings: Settings, updater: ProfileUpdater, metrics: Metrics, stop: threading.Event,
                 health: Health | None = None) -> None:
        self.settings = settings
        self.updater = updater
        self.metrics = metrics
        self.stop = stop
        self.health = health or Health(settings.stall_after_s)
        self._snapshot: tuple[str, dict, dict] | None = None  # --restore-from's, read once (checked_snapshot)
        # Not ready while no broker has answered for longer than a session lasts (the group has moved on).
        self.health.unreachable_after_s = settings.session_timeout_ms / 1000.0
        self.stats = DaemonStats()
        self.source = KafkaBatchSource(settings, on_assign=self._assigned, on_revoke=self._flush_before_revoke,
                                       on_lost=self._drop_lost, on_stats=self._kafka_stats,
                                       on_error=self._kafka_error)
        self.exactly_once = settings.guarantee == "exactly-once"
        # Exactly-once: a fresh transactional id per start, as Kafka Streams does; zombies are fenced by
        # the consumer group generation that send_offsets_to_transaction carries (KIP-447).
        self.publisher = self._make_publisher()
        # What commits together: a batch's changelog records, profiles, dead letters and input offsets.
        self.changelog = Changelog(
            settings.kafka, updater.state, self.publisher, metrics, topic=settings.changelog_topic,
            model_version=updater.state_version, inputs=self.source, output_topic=settings.output_topic,
            dead_letter_topic=settings.dead_letter_topic, profiles_for=updater.profiles_for,
            # A dead letter's value is cut to fit the producer's record size limit, with room for key and headers.
            dead_letter_max_bytes=min(DEAD_LETTER_MAX_VALUE_BYTES, settings.kafka.max_message_bytes() // 2),
            repartition_topic=settings.repartition_topic if settings.repartition else "")
        self._closing = False
        self._nothing_assigned = False  # an empty assignment came: find out why (in the main loop)
        self._waiting_for_topics = False  # assigned nothing because an input topic is missing: re-subscribe
        self._admin = None  # for metadata, made when first needed
        self._topics_checked_at = 0.0
        metrics.model_info.info({"version": updater.model_version, "device": str(updater.device)})
        metrics.ready.set_function(lambda: int(self.health.ready))  # as /readyz, whenever scraped

    def _make_publisher(self) -> Publisher:
        settings = self.settings
        return Publisher(settings.kafka, transactional_id=(
            settings.transactional_id or f"{settings.group_id}-{uuid.uuid4().hex[:12]}") if self.exactly_once else "",
            best_effort_topics=() if self.exactly_once else (settings.dead_letter_topic,),
            # A fresh broker must not auto-create the output topics with its default partition count (the
            # changelog mirrors the input's partitions): prepare_topics creates them, before a re-subscribe too.
            **{"allow.auto.create.topics": False, "error_cb": self._kafka_error})

    def prepare_topics(self) -> None:
        """Fail early on missing or badly partitioned inputs; create the output topics if missing."""
        s = self.settings
        admin = admin_client(s.kafka)
        if s.repartition:  # the inputs' keys and partition counts do not matter: records are re-keyed
            partitions = max(check_exist(admin, s.input_topics).values())
            ensure_topics(admin, {s.repartition_topic: partitions})
            partitions = check_copartitioned(admin, s.state_topics)  # an existing one keeps its count
        else:
            partitions = check_copartitioned(admin, s.input_topics)
        ensure_topics(admin, {s.output_topic: partitions, s.dead_letter_topic: partitions,
                              s.changelog_topic: partitions}, compacted=[s.changelog_topic])
        # The state of input partition p lives in partition p of the changelog: same count, always.
        check_copartitioned(admin, (*s.state_topics, s.changelog_topic))

    def checked_snapshot(self, directory: str) -> tuple[dict, dict]:
        """The snapshot in `directory` and its metadata (read once), or StreamError where this daemon cannot
        use it: another model's state, or users named otherwise (raw ids against pseudonyms, another key)."""
        if self._snapshot is None or self._snapshot[0] != directory:
            try:
                self._snapshot = (directory, *read_snapshot(directory))
            except ValueError as exc:
                raise StreamError(str(exc)) from None
        _, snapshot, meta = self._snapshot
        if meta.get("model_version") != self.updater.state_version:
            raise StreamError(f"the state in {directory} was built by model {meta.get('model_version')!r}, "
                              f"but this daemon serves {self.updater.state_version!r}: replay with the same --model")
        named = meta.get("user_ids", self.updater.user_ids)  # snapshots before this record did not say
        if named != self.updater.user_ids:
            def say(how: str) -> str:
                return "raw user ids" if how == "raw" else "pseudonyms of one --pseudonymize-key"
            other = " (another key)" if named != "raw" and self.updater.user_ids != "raw" else ""
            raise StreamError(f"the state in {directory} holds {say(named)}{other}, but this daemon keeps "
                              f"{say(self.updater.user_ids)}: none of its users would ever be matched; replay "
                              "with the same --pseudonymize-key")
        return snapshot, meta

    def restore(self, directory: str) -> None:
        """Start from a replayed state: load it, and continue the input where the replay stopped."""
        started = time.perf_counter()
        snapshot, meta = self.checked_snapshot(directory)
        self._snapshot = None  # the table holds it from here: no second copy
        # The snapshot goes under the state table, not into it: each member takes the users of the
        # partitions it is assigned (and the changelog's newer state on top), so no member holds, or
        # re-scores when idle, a user whose events another member reads.
        try:
            users = self.updater.state.attach_base(snapshot, meta.get("input_topics"), self.settings.input_topics)
        except ValueError as exc:
            raise StreamError(f"{directory}: {exc}") from None
        self.metrics.restore_seconds.set(time.perf_counter() - started)
        offsets = {t: parts for t, parts in meta.get("kafka_offsets", {}).items() if t in self.settings.input_topics}
        offsets.update(self._start_without_offsets(directory, [t for t in self.settings.input_topics
                                                               if t not in offsets]))
        seeded = seed_group_offsets(self.settings.kafka, self.settings.group_id, offsets)
        unplaced = int((self.updater.state.base.partition < 0).sum())
        log.info("loaded %d users from %s; group %s continues from %s", users, directory,
                 self.settings.group_id, seeded or "its committed offsets (none seeded)")
        if unplaced:
            log.warning("%d of them have no input partition in the snapshot (a replay of files): each is "
                        "taken up at its next event, and re-scored when idle only after it", unplaced)

    def _start_without_offsets(self, directory: str, topics: list[str]) -> dict[str, dict[int, int]]:
        """Where the group starts on input topics the snapshot has no offsets for (a replay of files): the
        files' events may be in the topic too, and reading them from the earliest offset would apply them a
        second time. So --snapshot-start must say where, unless the group has committed there (a restart)."""
        kafka, group, start = self.settings.kafka, self.settings.group_id, self.settings.snapshot_start
        unknown = [t for t in topics if not committed_partitions(kafka, group, t)]
        if not unknown or start == "earliest":
            return {}
        if not start:
            raise StreamError(
                f"the snapshot {directory} records no offsets for {', '.join(unknown)} (a replay of files), and "
                f"group {group} has none committed: starting from the earliest offsets would apply again the "
                "events the files hold if the topic has them too. Say where to start with --snapshot-start "
                "earliest (the topic holds only events after the files), latest (events produced from now on), "
                "or an ISO time (the first record written at or after it); or replay the topic instead "
                "(profiles replay kafka://TOPIC --state-out), which records where it stopped")
        log.info("group %s starts on %s at --snapshot-start %s", group, ", ".join(unknown),
                 start if start == "latest" else iso_time(int(start)))
        return {t: offsets_at(kafka, t, start) for t in unknown}

    def run(self) -> None:
        """Run until `stop` is set; then finish the batch in hand, publish, commit and close."""
        if self.settings.restore_from:  # a snapshot this daemon cannot use is refused before any topic is made
            self.checked_snapshot(self.settings.restore_from)
        self.prepare_topics()
        if self.exactly_once:
            self.publisher.init_transactions()
        if self.settings.restore_from:
            self.restore(self.settings.restore_from)
        tune_garbage_collector()
        self.source.subscribe()
        log.info("consuming %s -> %s (dead letters: %s)%s", ",".join(self.settings.input_topics),
                 self.settings.output_topic, self.settings.dead_letter_topic,
                 f", re-keyed by user id through {self.settings.repartition_topic}" if self.settings.repartition
                 else "")
        try:
            while not self.stop.is_set():
                self.handle(self.source.next_batch(self.stop))
                if self._nothing_assigned:
                    self._why_nothing_assigned()
                if self._waiting_for_topics:
                    self._look_for_topics()
            self.handle(self.source.take_pending())
            self.publish_deferred(force=True)
            self.changelog.commit()
        finally:
            if self.publisher.in_transaction:  # stopped by an error: do not leave readers waiting on it
                self.publisher.abort()
            self.set_ready(False, "stopped")
            self._closing = True  # the revoke that close() triggers need not drop state
            self.source.close()  # leaves the group: partitions move to the others at once
            self.publisher.flush()
        log.info("stopped after %d events in %d batches", self.stats.events, self.stats.batches)

    def handle(self, records: RecordBatch) -> None:
        """One micro-batch: process -> commit the previous batch -> stage this one. The previous batch's
        acknowledgements (or transaction) came in while this one computed."""
        self.metrics.last_progress.set_to_current_time()
        self.health.progressed()
        if len(records) == 0:
            self._expire_while_quiet(records)
            self.publish_deferred()
            self.changelog.commit()  # idle: nothing to overlap with, commit what is out
            self.stats.quiet_polls += 1
            return
        self.health.broker_up()  # records came: the broker answers
        start = time.perf_counter()
        if self.stats.first_batch_at is None:
            self.stats.first_batch_at = start
        applied_from, forwarded, refused = self.rekey(records)
        result = self.updater.process(applied_from)
        if refused:  # the forwarded records' dead letters are the batch's like any other
            result.dead_letters = refused + result.dead_letters
        t_commit = time.perf_counter()
        committed = self.changelog.commit()
        t_publish = time.perf_counter()
        self.changelog.stage(records, result.rows, result.profiles, result.dead_letters, result.erased,
                             result.expired, forwarded)
        done = time.perf_counter()
        self.source.pacer.took(done - start, len(records))
        self.metrics.records_repartitioned.inc(len(forwarded))
        self.account(records, applied_from, result, {**result.stage_seconds, "commit": t_publish - t_commit,
                                                     "publish": done - t_publish, "total": done - start}, committed)

    def rekey(self, records: RecordBatch) -> tuple[RecordBatch, Forwarded, list[DeadLetter]]:
        """--repartition: the records the state step applies (the repartition topic's), the input topics'
        valid records re-keyed by user id for it, and dead letters for their invalid ones. Without it, all
        records are applied."""
        if not self.settings.repartition:
            return records, Forwarded(), []
        own, upstream = split_upstream(records, self.settings.repartition_topic)
        return (own, *rekey(upstream, self.settings.max_event_bytes))

    def publish_deferred(self, force: bool = False) -> None:
        """--publish-interval: publish the users whose profiles were deferred, when the interval is up (the
        input is quiet), or with `force` before a shutdown or a rebalance gives up their partitions."""
        rows = self.updater.publish_due(force)
        if not len(rows):
            return
        profiles = self.updater.profiles_for(rows)
        self.changelog.stage(RecordBatch.empty(), rows, profiles, [], [])  # their cleared marks with them
        self.metrics.profiles_published.inc(len(profiles))
        self.stats.profiles += len(profiles)

    def _expire_while_quiet(self, records: RecordBatch) -> None:
        """The input went quiet: expire the users the last batches' event time left idle past the TTL
        (the state step checks only at a batch's start), so the state settles as a replay's ends."""
        expired = self.updater.expire_idle(settle=True)
        if not len(expired):
            return
        self.changelog.stage(records, np.empty(0, dtype=np.int64), [], [], [], expired)
        self.metrics.users_expired.inc(len(expired))
        self.metrics.profiles_published.inc(len(expired.profiles))
        self.stats.profiles += len(expired.profiles)
        self.state_gauges()

    def restore_partitions(self, partitions: list[int]) -> None:
        """Load the state of these input partitions' users from the changelog (before their events)."""
        restored = self.changelog.restore(partitions, on_progress=self.health.progressed)  # progress: /healthz
        self.metrics.restore_seconds.set(restored.seconds)
        self.state_gauges()  # now, not at the next batch: a quiet input would show 0 users until then
        log.info("restored %d users of partition(s) %s from %s%s in %.2fs", restored.users, partitions,
                 self.settings.changelog_topic,
                 f" over {restored.from_snapshot} from the snapshot" if self.updater.state.base else "",
                 restored.seconds)
        if restored.seconds > self.settings.max_poll_interval_ms / 2000:  # the restore runs inside the poll
            log.warning("restoring took %.0fs, over half of max.poll.interval.ms: raise --max-poll-interval-ms, "
                        "add instances, or start from a local snapshot (--restore-from)", restored.seconds)

    def account(self, records: RecordBatch, applied_from: RecordBatch, result: BatchResult, seconds: dict[str, float],
                committed: bool) -> None:
        """Metrics and totals of a batch: `records` all it read, `applied_from` those the state step took."""
        m, s = self.metrics, self.stats
        events = result.events
        n_events = len(events)
        if n_events:
            names, topic_of_record = topic_codes(applied_from.topics)
            pair = topic_of_record[events.record_index] * len(EVENT_TYPES) + events.type_idx
            for code, count in zip(*np.unique(pair, return_counts=True)):
                topic, type_idx = divmod(int(code), len(EVENT_TYPES))
                m.events_consumed.labels(names[topic], EVENT_TYPES[type_idx]).inc(int(count))
        for reason, count in collections.Counter(d.reason for d in result.dead_letters).items():
            m.invalid_events.labels(reason).inc(count)
        if result.replayed:
            m.events_skipped.labels("replayed").inc(result.replayed)
        if result.duplicates:
            m.events_skipped.labels("duplicate").inc(result.duplicates)
        m.profiles_published.inc(len(result.profiles) + len(result.expired.profiles))
        m.users_forgotten.inc(result.forgotten)
        m.users_expired.inc(len(result.expired))
        m.batch_events.observe(len(records))
        for stage, sec in seconds.items():
            m.batch_seconds.labels(stage).observe(sec)
        if n_events:  # a strided sample of at most 64 events per batch: observe() is per-value Python
            sample = events.ts[:: max(1, n_events // 64)]
            for lag_s in (time.time() - sample / 1000.0).tolist():
                m.event_time_lag.observe(lag_s)
        self.state_gauges()
        device = self.updater.device
        if device.type == "cuda":
            m.device_memory.labels(str(device)).set(torch.cuda.memory_allocated(device))
        m.device_memory.labels("host").set(resident_bytes())
        s.batches += 1
        s.records += len(records)
        s.events += n_events
        s.dead_letters += len(result.dead_letters)
        s.profiles += len(result.profiles) + len(result.expired.profiles)
        s.commits += int(committed)
        s.batch_seconds.append(seconds["total"])
        s.last_batch_done_at = time.perf_counter()

    def state_gauges(self) -> None:
        """Users in state and their bytes, and the shop's habit and the calibration map they give, as held now: after
        each batch, restore, release and expiry."""
        state = self.updater.state
        self.metrics.users_in_state.set(len(state))
        for device, nbytes in state.state_bytes().items():
            self.metrics.state_bytes.labels(device).set(nbytes)
        for contest in CONTESTS:
            self.metrics.habit_evidence.labels(contest.name).set(state.habit.evidence(state.max_event_ts, contest))
        for toward, lean in zip(("latest", "counts"), self.updater.habit_leans(state.max_event_ts)):
            self.metrics.top_categories_lean.labels(toward).set(lean)
        shop_map = self.updater.calibration.shop_map() if self.updater.calibration is not None else LogitMap()
        for head, name in enumerate(HEADS):
            self.metrics.stream_calibration_users.labels(name).set(shop_map.users[head])
            self.metrics.stream_calibration_map.labels(name, "a").set(shop_map.a[head] if shop_map.kept[head] else 0.0)
            self.metrics.stream_calibration_map.labels(name, "b").set(shop_map.b[head] if shop_map.kept[head] else 1.0)
            self.metrics.stream_calibration_map.labels(name, "drift").set(shop_map.drift[head])
            self.metrics.stream_calibration_map.labels(name, "level_shift").set(shop_map.level_shift[head])
            weights = shop_map.weights[head] or ()  # on the rules' statistics alone, or on all the head's
            for statistic, weight in zip(STATISTICS[head], (*weights, *(0.0,) * len(STATISTICS[head]))):
                self.metrics.stream_calibration_map.labels(name, statistic).set(weight)
        bend = shop_map.idle_weights or (0.0,) * len(IDLE_QUANTILES)  # churn_risk's bend in idle time, where it is
        for quartile, weight in enumerate(bend, 1):
            self.metrics.stream_calibration_map.labels("churn_risk", f"log_idle_minutes_past_q{quartile}").set(weight)
        weights = shop_map.category_weights if shop_map.reranks() else (0.0,) * len(CATEGORY_TERMS)
        for statistic, weight in zip(CATEGORY_TERMS, weights):
            self.metrics.stream_calibration_map.labels("top_categories", statistic).set(weight)
        gain = shop_map.category_gain if shop_map.category_gain is not None else shop_map.category_cross_gain
        self.metrics.stream_calibration_map.labels("top_categories", "gain").set(gain or 0.0)
        self.metrics.stream_calibration_users.labels("top_categories").set(shop_map.category_users)

    def set_ready(self, ready: bool, why: str = "") -> None:
        self.health.set_ready(ready, why)
        self.metrics.assigned_partitions.set(len(self.source.assigned))

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        # Their users' state comes back from the changelog before any of their events is polled.
        self.health.broker_up()  # a rebalance came through: the group coordinator answers
        if not partitions:
            self._assigned_nothing()
            return
        self._waiting_for_topics = False
        if self.stats.assigned_at is None:
            self.stats.assigned_at = time.perf_counter()  # librdkafka starts fetching now, during the restore
        # With --repartition, input partitions are only forwarded: no state to restore for them.
        numbers = sorted({p.partition for p in partitions if p.topic in self.settings.state_topics})
        if numbers:
            self.set_ready(False, f"restoring the state of partition(s) {numbers}")
            self.restore_partitions(numbers)
        self.set_ready(True)

    def _assigned_nothing(self) -> None:
        """No partition for this member. Why is found out by the main loop (`_why_nothing_assigned`),
        outside the rebalance callback: metadata requests are not made from inside one."""
        self._nothing_assigned = True
        self.set_ready(False, "assigned no partition")

    def _why_nothing_assigned(self) -> None:
        """Say why nothing is assigned (/readyz and one log line): an input topic is missing (then look
        for it every few seconds), or the group has more members than partitions (standby)."""
        self._nothing_assigned = False
        if self.source.assigned:
            return
        topics = ",".join(self.settings.input_topics)
        counts = self._partition_counts()
        if counts is None:
            return  # no answer: the unreachable clock speaks for the broker
        missing = [t for t in self.settings.input_topics if t not in counts]
        if missing:
            self._waiting_for_topics = True
            self._topics_checked_at = time.monotonic()
            why = (f"input topic(s) {','.join(missing)} not found: assigned nothing; consuming once they exist")
            log.warning("%s", why)
        else:
            why = (f"standby: assigned no partition; the {counts[self.settings.input_topics[0]]} partition(s) of "
                   f"{topics} are owned by other members of group {self.settings.group_id} (more members than "
                   "partitions); this member takes over when one leaves")
            log.info("%s", why)
        self.set_ready(False, why)

    def _partition_counts(self) -> dict[str, int] | None:
        """Partition count of each input topic that exists (None: no metadata within a few seconds)."""
        if self._admin is None:
            self._admin = admin_client(self.settings.kafka)
        try:
            return partition_counts(self._admin, self.settings.input_topics, timeout_s=5.0)
        except TopicError:
            return None

    def _look_for_topics(self) -> None:
        """While an input topic is missing (e.g. a broker replaced by an empty one), check every few
        seconds; once every input topic exists, create the output topics and subscribe again, so that
        the group's next join sees them (librdkafka alone would notice only at its next metadata refresh)."""
        if self.source.assigned:  # a rebalance brought partitions meanwhile
            self._waiting_for_topics = False
            return
        now = time.monotonic()
        if now - self._topics_checked_at < TOPIC_CHECK_EVERY_S:
            return
        self._topics_checked_at = now
        counts = self._partition_counts()
        if counts is None or len(counts) < len(self.settings.input_topics):
            return
        self.prepare_topics()
        log.info("input topic(s) %s exist again: subscribing again", ",".join(self.settings.input_topics))
        self._waiting_for_topics = False
        self.set_ready(False, "joining the consumer group again (input topics re-created)")
        self._renew_publisher()
        self.source.resubscribe()

    def _renew_publisher(self) -> None:
        """A fresh producer after the input topics vanished and came back: the cluster may be a new one
        (a broker replaced by an empty one), where the old producer's idempotence state is unknown and
        its next record would fail as fatal. Nothing of ours is in flight: every partition was given up."""
        unsent = self.publisher.flush_briefly()
        if unsent:
            log.warning("%d record(s) for partitions given up were still unsent: dropped (their input is "
                        "re-read by the partitions' owner)", unsent)
        self.publisher = self._make_publisher()
        self.changelog.use_publisher(self.publisher)
        if self.exactly_once:
            self.publisher.init_transactions()

    def _flush_before_revoke(self, partitions: list[TopicPartition]) -> None:
        # Finish the batch in hand while we still own its partitions, so its offsets can be committed;
        # then let their users go: the next owner restores them from the changelog.
        self.set_ready(False, "rebalancing: partitions revoked")
        self.handle(self.source.take_pending())
        self.publish_deferred(force=True)
        self.changelog.commit()
        self._drop_lag_series(partitions)
        self._drop_users(partitions)

    def _drop_lost(self, partitions: list[TopicPartition]) -> None:
        # Lost partitions already have a new owner: committing for them would fail; it re-reads them.
        self.set_ready(False, "partitions lost (session expired): joining the group again")
        self.source.drop_pending(partitions)
        self.changelog.release(partitions)  # their offsets, and an open transaction carrying them, are not ours
        self._drop_lag_series(partitions)
        self._drop_users(partitions)

    def _drop_users(self, partitions: list[TopicPartition]) -> None:
        """Release the users of partition numbers this member no longer reads in any input topic."""
        if self._closing:
            return
        leaving = {(p.topic, p.partition) for p in partitions}
        held = self.settings.state_topics  # with --repartition, input partitions hold no users
        still_read = {p for t, p in self.source.assigned if (t, p) not in leaving and t in held}
        gone = {p.partition for p in partitions if p.topic in held} - still_read
        self.metrics.assigned_partitions.set(len({tp for tp in self.source.assigned if tp not in leaving}))
        if gone:
            dropped = self.updater.state.drop_partitions(gone)
            log.info("released %d users of partition(s) %s", dropped, sorted(gone))
            self.state_gauges()  # what is held now, not what was

    def _kafka_error(self, err: KafkaError) -> None:
        """Client-level errors of the consumer and the producer (served inside consume and flush): every
        broker down starts the unreachable clock that readiness reads; each distinct line at most every 30 s,
        except the connection failures librdkafka's own log already has (once per change, not per retry)."""
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.health.broker_down()
        if err.code() not in LOGGED_BY_LIBRDKAFKA:
            errors_log.warning("Kafka: %s", err.str())

    def _kafka_stats(self, stats_json: str) -> None:
        """librdkafka's statistics callback (on the loop's thread, inside consume): lag per partition, and
        whether any broker connection is up (the sign that an outage is over)."""
        try:
            report = orjson.loads(stats_json)
            lag = consumer_lag(report)
            up = brokers_up(report)
        except (ValueError, TypeError, AttributeError) as exc:  # a malformed report must not stop the loop
            log.debug("unreadable librdkafka statistics: %s", exc)
            return
        if up:
            self.health.broker_up()
        elif up is False:
            self.health.broker_down()
        for (topic, partition), behind in lag.items():
            if (topic, partition) in self.source.assigned:
                self.metrics.consumer_lag.labels(topic, str(partition)).set(behind)

    def _drop_lag_series(self, partitions: list[TopicPartition]) -> None:
        """Remove the lag gauges of partitions this member no longer reads."""
        for p in partitions:  # another member reports these now
            try:
                self.metrics.consumer_lag.remove(p.topic, str(p.partition))
            except KeyError:
                pass


def topic_codes(topics: list[str]) -> tuple[list[str], np.ndarray]:
    """The distinct topics and each record's index into them, without sorting strings (np.unique on an
    object array cost a few percent of a batch); one topic, the usual case, needs no lookup per record."""
    names = list(dict.fromkeys(topics))
    if len(names) == 1:
        return names, np.zeros(len(topics), dtype=np.int64)
    index = {name: i for i, name in enumerate(names)}
    return names, np.fromiter(map(index.__getitem__, topics), dtype=np.int64, count=len(topics))
