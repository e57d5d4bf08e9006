"""The always-on daemon: poll a batch -> decode -> update profiles -> publish -> commit.

Guarantee (this version): at-least-once. Input offsets are committed only after
every profile and dead letter of the batch is acknowledged by the broker, so a
crash re-reads (never skips) the records after the last commit.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from confluent_kafka import KafkaException, TopicPartition

from consumers.pipeline import BatchResult, ProfileUpdater
from consumers.source import KafkaBatchSource
from stream.events import EVENT_TYPES, RecordBatch
from stream.kafka import (
    Publisher, StreamError, admin_client, check_copartitioned, ensure_topics, seed_group_offsets,
)
from stream.metrics import Health, Metrics
from stream.settings import Settings
from stream.state import read_snapshot

log = logging.getLogger(__name__)


@dataclass
class DaemonStats:
    """Running totals for live views and tests (the metrics registry has the same, for Prometheus)."""

    batches: int = 0
    records: int = 0
    events: int = 0
    dead_letters: int = 0
    profiles: int = 0
    commits: int = 0
    batch_seconds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=512))
    started_at: float = field(default_factory=time.monotonic)


class Checkpoint:
    """The one place that commits: what a batch published, then the input offsets it covers."""

    def __init__(self, source: KafkaBatchSource, publisher: Publisher, metrics: Metrics) -> None:
        self.source = source
        self.publisher = publisher
        self.metrics = metrics

    def commit(self, records: RecordBatch) -> bool:
        """1. wait until the broker acknowledged every profile and dead letter produced so far;
        2. commit, per input partition, the offset after the batch's last record.
        A publish failure raises (the daemon stops without committing); a commit failure,
        e.g. during a rebalance, is logged and counted: those records are re-read, not lost."""
        self.publisher.flush()
        # Records of one partition arrive in offset order, so the last one wins.
        last = dict(zip(zip(records.topics, records.partitions), records.offsets))
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        try:
            self.source.commit(offsets)
            return True
        except KafkaException as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s): these records will be processed again", exc.args[0].str())
            return False


class ProfileDaemon:
    def __init__(self, settings: Settings, updater: ProfileUpdater, metrics: Metrics, stop: threading.Event,
                 health: Health | None = None) -> None:
        self.settings = settings
        self.updater = updater
        self.metrics = metrics
        self.stop = stop
        self.health = health or Health(settings.stall_after_s)
        self.stats = DaemonStats()
        self.source = KafkaBatchSource(settings, on_assign=self._assigned, on_revoke=self._flush_before_revoke,
                                       on_lost=self._drop_lost)
        self.publisher = Publisher(settings.kafka)
        self.checkpoint = Checkpoint(self.source, self.publisher, metrics)
        metrics.model_info.info({"version": updater.model_version, "device": str(updater.device)})

    def prepare_topics(self) -> None:
        """Fail early on missing or badly partitioned inputs; create the output topics if missing."""
        s = self.settings
        admin = admin_client(s.kafka)
        partitions = check_copartitioned(admin, s.input_topics)
        ensure_topics(admin, {s.output_topic: partitions, s.dead_letter_topic: partitions})

    def restore(self, directory: str) -> None:
        """Start from a replayed state: load it, and continue the input where the replay stopped."""
        try:
            snapshot, meta = read_snapshot(directory)
        except ValueError as exc:
            raise StreamError(str(exc)) from None
        if meta.get("model_version") != self.updater.model_version:
            raise StreamError(f"the state in {directory} was built by model {meta.get('model_version')!r}, "
                              f"but this daemon serves {self.updater.model_version!r}: replay with the same --model")
        self.updater.state.restore(snapshot)
        offsets = {t: parts for t, parts in meta.get("kafka_offsets", {}).items() if t in self.settings.input_topics}
        seeded = seed_group_offsets(self.settings.kafka, self.settings.group_id, offsets)
        log.info("restored %d users from %s; group %s continues from %s", len(self.updater.state), directory,
                 self.settings.group_id, seeded or "its committed offsets (none seeded)")
        if not offsets:
            log.warning("the snapshot records no offsets for %s (a file replay?): the group starts from its "
                        "committed offsets, or the earliest ones", ",".join(self.settings.input_topics))

    def run(self) -> None:
        """Run until `stop` is set; then finish the batch in hand, publish, commit and close."""
        self.prepare_topics()
        if self.settings.restore_from:
            self.restore(self.settings.restore_from)
        self.source.subscribe()
        log.info("consuming %s -> %s (dead letters: %s)", ",".join(self.settings.input_topics),
                 self.settings.output_topic, self.settings.dead_letter_topic)
        try:
            while not self.stop.is_set():
                self.handle(self.source.next_batch(self.stop))
            self.handle(self.source.take_pending())
        finally:
            self.health.set_ready(False)
            self.source.close()  # leaves the group: partitions move to the others at once
            self.publisher.flush()
        log.info("stopped after %d events in %d batches", self.stats.events, self.stats.batches)

    def handle(self, records: RecordBatch) -> None:
        """One micro-batch: update -> publish -> commit."""
        self.metrics.last_progress.set_to_current_time()
        self.health.progressed()
        if len(records) == 0:
            return
        start = time.perf_counter()
        result = self.updater.process(records)
        t_publish = time.perf_counter()
        self.publish(result)
        t_commit = time.perf_counter()
        committed = self.checkpoint.commit(records)
        done = time.perf_counter()
        self.account(records, result, {**result.stage_seconds, "publish": t_commit - t_publish,
                                       "commit": done - t_commit, "total": done - start}, committed)

    def publish(self, result: BatchResult) -> None:
        out, dlq, produce = self.settings.output_topic, self.settings.dead_letter_topic, self.publisher.produce
        for key, value in result.profiles:
            produce(out, key, value)
        for dead in result.dead_letters:
            produce(dlq, dead.key, dead.value, dead.headers())
            log.debug("dead letter %s[%d]@%d: %s", dead.topic, dead.partition, dead.offset, dead.detail)

    def account(self, records: RecordBatch, result: BatchResult, seconds: dict[str, float], committed: bool) -> None:
        m, s = self.metrics, self.stats
        events = result.events
        n_events = len(events)
        if n_events:
            names, topic_of_record = np.unique(np.asarray(records.topics, dtype=object), return_inverse=True)
            pair = topic_of_record[events.record_index] * len(EVENT_TYPES) + events.type_idx
            for code, count in zip(*np.unique(pair, return_counts=True)):
                topic, type_idx = divmod(int(code), len(EVENT_TYPES))
                m.events_consumed.labels(names[topic], EVENT_TYPES[type_idx]).inc(int(count))
        for reason, count in collections.Counter(d.reason for d in result.dead_letters).items():
            m.invalid_events.labels(reason).inc(count)
        m.dead_letters.inc(len(result.dead_letters))
        m.profiles_published.inc(len(result.profiles))
        m.batch_events.observe(len(records))
        for stage, sec in seconds.items():
            m.batch_seconds.labels(stage).observe(sec)
        state = self.updater.state
        m.users_in_state.set(len(state))
        for device, nbytes in state.state_bytes().items():
            m.state_bytes.labels(device).set(nbytes)
        s.batches += 1
        s.records += len(records)
        s.events += n_events
        s.dead_letters += len(result.dead_letters)
        s.profiles += len(result.profiles)
        s.commits += int(committed)
        s.batch_seconds.append(seconds["total"])

    def _assigned(self, partitions: list[TopicPartition]) -> None:
        # State is restored before subscribing, so a member with an assignment is ready to serve.
        self.health.set_ready(True)

    def _flush_before_revoke(self, partitions: list[TopicPartition]) -> None:
        # Finish the batch in hand while we still own its partitions, so its offsets can be committed.
        self.health.set_ready(False)
        self.handle(self.source.take_pending())

    def _drop_lost(self, partitions: list[TopicPartition]) -> None:
        # Lost partitions already have a new owner: committing for them would fail; it re-reads them.
        self.health.set_ready(False)
        self.source.drop_pending(partitions)
