"""What commits together: a batch's state changelog records and everything that goes out with them.

The one owner of the daemon's delivery guarantees (docs/architecture.md, "Delivery guarantees"):

- `stage(...)` hands a batch to the producer: expired users' changelog tombstones and last profiles
  (`--state-ttl`) first, then erasure tombstones (changelog and output topic), then each changed user's
  whole state record to the changelog partition numbered as its input
  partition, the partitions' meta record when category names changed, the profiles, the dead
  letters and (--repartition) the input records re-keyed for the repartition topic; the batch's input
  offsets become the next to commit. In exactly-once mode all of it is in
  the open transaction.
- `commit()` is called once the next batch has computed (the wait overlaps that work):
  at-least-once, it waits until the broker acknowledged everything produced, then commits the
  input offsets; exactly-once, it commits the transaction with the input offsets in it, and re-sends
  an aborted one's content (its users' current state and profiles, dead letters, erasures) in a new
  transaction with the same offsets.
- `restore(partitions)` loads the state of input partitions' users from the changelog.

So the daemon stages batch k, computes batch k+1 while librdkafka's threads deliver k, and only then
commits k (its acknowledgements are usually in by then). A crash before that commit re-reads k: never
a lost record, and a committed offset always has its users' state in the changelog.

A Kafka adapter around the state table: it imports only stream/ (the daemon hands it the input
consumer and a function that encodes profiles), so it sits under the applications that use it
(the daemon; `profiles bench` for its restore measurement).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import orjson
from confluent_kafka import KafkaException, Message, TopicPartition

from stream.changelog_records import (CHANGELOG_FORMAT, META_KEY, NAMES_KEY, READABLE_FORMATS, RefusedRecords,
                                      name_parts)
from stream.events import DEAD_LETTER_MAX_VALUE_BYTES, DeadLetter, RecordBatch, utf8
from stream.expiry import Expired
from stream.kafka import Publisher, StreamError
from stream.log_reader import read_to_end
from stream.metrics import Metrics
from stream.repartition import Forwarded
from stream.settings import KafkaSettings
from stream.state import StateTable

log = logging.getLogger(__name__)

Profiles = list[tuple[bytes, bytes]]  # (key, value) records for the output topic


class Inputs(Protocol):
    """The input consumer whose offsets commit with the batch (consumers/source.py's KafkaBatchSource)."""

    assigned: set[tuple[str, int]]  # (topic, partition) owned now

    def commit(self, offsets: list[TopicPartition]) -> None: ...

    def group_metadata(self) -> object: ...


@dataclass
class Unconfirmed:
    """What the open transaction carries, by user (rows move when users are dropped), for a re-send."""

    users: set[str] = field(default_factory=set)
    erased: list[tuple[str, int]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    expired: Expired = field(default_factory=Expired)  # their state is gone: tombstones and last profiles kept
    forwarded: Forwarded = field(default_factory=Forwarded)  # --repartition: input records re-keyed


@dataclass
class Restored:
    users: int  # loaded from the changelog
    from_snapshot: int  # ...and from the base snapshot, where the changelog had nothing newer
    read_seconds: float  # reading the changelog (waiting for records), of `seconds` in all; the rest is loading
    seconds: float


class Changelog:
    def __init__(self, kafka: KafkaSettings, state: StateTable, publisher: Publisher, metrics: Metrics, *,
                 topic: str, model_version: str, inputs: Inputs | None = None, output_topic: str = "",
                 dead_letter_topic: str = "", dead_letter_max_bytes: int = DEAD_LETTER_MAX_VALUE_BYTES,
                 repartition_topic: str = "",
                 profiles_for: Callable[[np.ndarray], Profiles] | None = None) -> None:
        self.kafka = kafka
        self.state = state
        self.publisher = publisher
        self.metrics = metrics
        self.topic = topic
        self.model_version = model_version
        self.inputs = inputs
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.repartition_topic = repartition_topic
        self.profiles_for = profiles_for  # rows -> their current profiles (for a re-send)
        self.uncommitted: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset, produced
        self.aborted = False  # the last transaction was aborted: its content must be produced again
        self.unconfirmed = Unconfirmed()  # exactly-once: what the open transaction carries
        self.resent = 0  # profiles produced again after aborted transactions
        self._meta_sent = (-1, -1)  # the state's (categories_version, outcomes.version) last written to the changelog
        self.names_generation = 0  # of the category names' parts last written (or read, at a restore)
        self._part_written: dict[int, tuple[dict[str, str], int]] = {}  # part -> (its names, their generation)
        self._parts_held: dict[int, dict[int, int]] = {}  # partition -> part -> the generation its meta names

    def _owned(self) -> set[tuple[str, int]]:
        return self.inputs.assigned if self.inputs is not None else set()

    def _state_partitions(self) -> set[int]:
        """Partition numbers of the topics whose users this member holds (its changelog partitions): every
        input's, or with --repartition only the repartition topic's (the inputs' are forwarded, not held)."""
        return {p for t, p in self._owned() if not self.repartition_topic or t == self.repartition_topic}

    # ------------------------------------------------------------------ a batch out

    def stage(self, records: RecordBatch, rows: np.ndarray, profiles: Profiles, dead_letters: list[DeadLetter],
              erased: list[tuple[str, int]], expired: Expired | None = None,
              forwarded: Forwarded | None = None) -> None:
        """Hand a processed batch to the producer; its input offsets are the next to commit. `forwarded`:
        input records re-keyed for the repartition topic (--repartition), committed with the offsets they
        came from."""
        self._produce(rows, profiles, dead_letters, erased, expired or Expired(), forwarded or Forwarded())
        # Records of one partition arrive in offset order, so the last one wins.
        self.uncommitted.update(zip(zip(records.topics, records.partitions), map((1).__add__, records.offsets)))

    def _produce(self, rows: np.ndarray, profiles: Profiles, dead_letters: list[DeadLetter],
                 erased: list[tuple[str, int]], expired: Expired, forwarded: Forwarded) -> None:
        if self.publisher.transactional:
            self.publisher.begin()
            self.unconfirmed.users.update(map(self.state.user_ids.__getitem__, rows.tolist()))
            self.unconfirmed.erased += erased
            self.unconfirmed.dead_letters += dead_letters
            self.unconfirmed.expired += expired
            self.unconfirmed.forwarded += forwarded
        if expired:  # expired before the batch's events (or at a user's return): first
            self.write_expired(expired)
        if erased:  # before the batch's state and profiles: a user re-created after the forget wins
            self.write_tombstones(erased)
        self.write_state(rows)
        self.publisher.produce_many(self.output_topic, profiles)
        for dead in dead_letters:
            self.write_dead_letter(dead)
        if forwarded:  # the producer's partitioner places each key: a user always on one partition
            self.publisher.produce_many(self.repartition_topic, list(zip(forwarded.keys, forwarded.values)))

    def write_state(self, rows: np.ndarray) -> None:
        """These users' whole state to the changelog, each to its input partition's number (users not
        from Kafka have none and are skipped), and the meta record when the category names changed."""
        state = self.state
        rows = rows[state.partition[rows] >= 0]
        partitions = state.partition[rows].tolist()
        if len(rows):
            ids = map(state.user_ids.__getitem__, rows.tolist())  # keys encoded in C: a batch can have a user per event
            keys = list(utf8(ids))
            self.publisher.produce_to_partitions(self.topic, keys, state.changelog_values(rows), partitions)
        # Newly seen categories, or names an erasure dropped: the parts of the list they changed (a restore reads
        # the latest meta record and the parts it names, compacted or not). Also in a batch that changed no
        # user's state (one of forget records only), so that a restore after it cannot bring them back.
        # So do each partition's outcome counts when an anchor matured (stream/outcomes.py): they cannot be
        # counted again from the users' records once those move on to the next anchor.
        owned = sorted(self._state_partitions() | set(partitions))
        sent = (state.categories_version, state.outcomes.version)
        # The names go first, in parts of their own (stream/changelog_records.py: a shop's names may pass Kafka's 1 MB
        # record limit): a part whose names changed in a new generation, to every partition; one unchanged, only to
        # a partition whose meta record does not name it yet. The meta record names each part's generation.
        if sent != self._meta_sent and owned:
            parts = name_parts(state.category_names)
            generations = [self._part_generation(number, names) for number, names in enumerate(parts)]
            for number, (names, generation) in enumerate(zip(parts, generations)):
                to = [p for p in owned if self._parts_held.get(p, {}).get(number) != generation]
                if to:
                    value = orjson.dumps({"generation": generation, "part": number, "names": names})
                    self.publisher.produce_to_partitions(self.topic, [NAMES_KEY + str(number).encode()] * len(to),
                                                         [value] * len(to), to)
            self._parts_held.update({p: dict(enumerate(generations)) for p in owned})
            for number in [n for n in self._part_written if n >= len(parts)]:  # fewer parts than before
                del self._part_written[number]
            # names_generation and name_parts as well: a release before session 58 reads them (and says clearly
            # that parts are missing where they are not all of the latest generation)
            metas = [orjson.dumps({"model_version": self.model_version, "format": CHANGELOG_FORMAT,
                                   "names_generation": max(generations), "name_parts": len(parts),
                                   "name_generations": generations, "outcomes": state.outcomes.of_partition(p)})
                     for p in owned]
            self.publisher.produce_to_partitions(self.topic, [META_KEY] * len(owned), metas, owned)
            self._meta_sent = sent

    def _part_generation(self, number: int, names: dict[str, str]) -> int:
        """The generation of part `number` of the names: the one it was written at, or a new one where they changed."""
        written = self._part_written.get(number)
        if written is None or written[0] != names:
            self.names_generation += 1
            written = self._part_written[number] = (names, self.names_generation)
        return written[1]

    def write_expired(self, expired: Expired) -> None:
        """Expired users: a changelog tombstone each (no restore brings them back), and their last profiles
        (`"expired": true`) where --on-expire publish made them. Their profiles stay on the output topic."""
        from_kafka = [(user.encode("utf-8", "surrogatepass"), p) for user, p in expired.users if p >= 0]
        if from_kafka:
            self.publisher.produce_to_partitions(self.topic, [k for k, _ in from_kafka], [None] * len(from_kafka),
                                                 [p for _, p in from_kafka])
        self.publisher.produce_many(self.output_topic, expired.profiles)

    def write_tombstones(self, erased: list[tuple[str, int]]) -> None:
        """Tombstones for erased (user, input partition): on the changelog (so no restore brings them
        back) and on the output topic (so compaction removes their last profile)."""
        keys = [user.encode("utf-8", "surrogatepass") for user, _ in erased]
        from_kafka = [(key, p) for key, (_, p) in zip(keys, erased) if p >= 0]
        if from_kafka:
            self.publisher.produce_to_partitions(self.topic, [k for k, _ in from_kafka],
                                                 [None] * len(from_kafka), [p for _, p in from_kafka])
        self.publisher.produce_many(self.output_topic, [(key, None) for key in keys])

    def write_dead_letter(self, dead: DeadLetter) -> None:
        """One dead letter, cut to fit the producer's limit. One the producer still refuses is logged
        (position, reason, size, hash) and counted: bad input never stops the daemon."""
        key, value, headers = dead.record(self.dead_letter_max_bytes)
        try:
            self.publisher.produce(self.dead_letter_topic, key, value, headers)
        except KafkaException as exc:
            self.metrics.dead_letter_failures.inc()
            log.error("dead letter %s[%d]@%d (%s, %d bytes, sha256 %s) not published: %s", dead.topic,
                      dead.partition, dead.offset, dead.reason, len(dead.value or b""),
                      dict(headers).get("dlq.value_sha256", b"-").decode(), exc.args[0].str())
            return
        self.metrics.dead_letters.inc()
        log.debug("dead letter %s[%d]@%d: %s", dead.topic, dead.partition, dead.offset, dead.detail)

    # ------------------------------------------------------------------ commit

    def commit(self, attempts: int = 3) -> bool:
        """Commit everything staged so far: acknowledged output, then input offsets (at-least-once), or
        the transaction with the offsets in it (exactly-once). An aborted transaction's content goes
        out again first, in a new transaction with the same offsets; `attempts` aborts in a row raise
        StreamError (restart, restore). A publish failure raises PublishError (nothing committed); a
        failed offset commit (e.g. during a rebalance) is logged, counted and returns False: those
        records are re-read, not lost."""
        for _ in range(attempts):
            if self.aborted:
                self._produce_again()
            if self._commit_once():
                self.unconfirmed = Unconfirmed()
                return True
            if not self.aborted:
                return False  # at-least-once: a failed offset commit; the records are re-read
        raise StreamError(f"{attempts} transactions in a row were aborted; see the warnings above")

    def _commit_once(self) -> bool:
        if not self.uncommitted and not self.publisher.in_transaction:
            return True
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.uncommitted.items()]
        if self.publisher.transactional:
            return self._commit_transaction(offsets)
        self.publisher.flush()  # raises PublishError unless the broker acknowledged every record
        self._count_lost_dead_letters()
        self.uncommitted = {}
        try:
            self.inputs.commit(offsets)
            return True
        except KafkaException as exc:
            self.metrics.commit_failures.inc()
            log.warning("offset commit failed (%s): these records will be processed again", exc.args[0].str())
            return False

    def _count_lost_dead_letters(self) -> None:
        """Dead letters the broker refused after they were produced: logged and counted, never fatal."""
        for lost in self.publisher.take_lost():
            self.metrics.dead_letter_failures.inc()
            log.error("dead letter not published: %s", lost)

    def _commit_transaction(self, offsets: list[TopicPartition], attempts: int = 3) -> bool:
        """Commit the open transaction with these offsets. An abortable failure aborts it and sets
        `aborted` (offsets kept: they go into the next transaction with the content produced again);
        a fatal one (e.g. fenced by a newer instance) raises StreamError: restart and restore."""
        for attempt in range(attempts):
            try:
                self.publisher.commit(offsets, self.inputs.group_metadata())
                self.uncommitted = {}
                return True
            except KafkaException as exc:
                err = exc.args[0]
                self.metrics.transaction_failures.inc()
                if err.txn_requires_abort():
                    log.warning("transaction aborted (%s): producing its content again", err.str())
                    self.publisher.abort()
                    self.aborted = True
                    return False
                if not err.retriable() or attempt == attempts - 1:
                    raise StreamError(f"transaction commit failed: {err.str()}") from None
                log.warning("transaction commit failed (%s): retrying", err.str())
        return False

    def _produce_again(self) -> None:
        """The aborted transaction's users' current state and profiles, its dead letters, erasures, expiries
        and forwarded records (those of partitions still owned), into a new transaction."""
        self.aborted = False
        self._meta_sent, self._parts_held = (-1, -1), {}  # the meta records and name parts may have been in it
        gone, self.unconfirmed = self.unconfirmed, Unconfirmed()
        assigned, owned = self._owned(), self._state_partitions()
        rows = np.array(sorted(r for r in map(self.state.row, gone.users) if r is not None), dtype=np.int64)
        self._produce(rows, self.profiles_for(rows),
                      [d for d in gone.dead_letters if (d.topic, d.partition) in assigned],
                      [(u, p) for u, p in gone.erased if p < 0 or p in owned], gone.expired.of_partitions(owned),
                      gone.forwarded.of_sources(assigned))
        self.resent += len(rows)
        log.info("re-sent %d profiles of the aborted transaction", len(rows))

    # ------------------------------------------------------------------ partitions and producers

    def release(self, partitions: list[TopicPartition]) -> None:
        """Partitions lost to another member: their offsets are no longer ours to commit, and an open
        transaction (which would carry them) is given up."""
        for p in partitions:
            self.uncommitted.pop((p.topic, p.partition), None)
            self._parts_held.pop(p.partition, None)  # its next owner writes the meta records there
        if self.publisher.in_transaction:
            self.publisher.abort()
            self.aborted = True

    def use_publisher(self, publisher: Publisher) -> None:
        """A fresh producer (a new cluster behind the address): nothing staged on the old one is ours."""
        self.publisher = publisher
        self.uncommitted = {}
        self._meta_sent, self._parts_held = (-1, -1), {}

    # ------------------------------------------------------------------ restore

    def restore(self, partitions: list[int], on_progress: Callable[[], None] | None = None) -> Restored:
        """Load the state of these input partitions' users from the changelog (latest record per user;
        tombstones erase), then the base snapshot's users it has nothing newer for. Records are loaded
        column-wise as they are read (stream/changelog_records.py); `on_progress` ticks whenever a batch of
        them arrives. Raises StreamError on state of another model or layout (found once all is read: the
        table then holds what was loaded, and the daemon stops)."""
        started = time.perf_counter()
        state = self.state
        loader = state.changelog_loader()
        loading = 0.0
        for partition in partitions:  # another member may have written its meta records since ours
            self._parts_held.pop(partition, None)

        def take(messages: list[Message], partitions_read: np.ndarray) -> None:
            nonlocal loading
            t0 = time.perf_counter()
            try:
                loader.add(list(map(Message.key, messages)), list(map(Message.value, messages)), partitions_read)
            except UnicodeDecodeError:  # this daemon writes UTF-8 user ids as keys: another topic's records
                raise StreamError(f"{self.topic} holds records whose keys are not UTF-8 user ids: not this "
                                  "daemon's state topic? (--state-topic, or a new --group-id)") from None
            loading += time.perf_counter() - t0

        read_to_end(self.kafka, self.topic, partitions, take, on_progress=on_progress, on_start=state.reserve)
        self.names_generation = max(self.names_generation, loader.generation)  # the next write's is later
        finishing = time.perf_counter()
        for partition, meta in sorted(loader.metas.items()):
            if meta is None:
                continue
            meta = orjson.loads(meta)
            if meta.get("model_version") != self.model_version:
                raise StreamError(
                    f"{self.topic} holds state of model {meta.get('model_version')!r}, this daemon serves "
                    f"{self.model_version!r}: give a new model its own --group-id (or --state-topic)")
            if meta.get("format", 2) not in (CHANGELOG_FORMAT, *READABLE_FORMATS):  # names by bucket before 3
                raise StreamError(f"{self.topic} holds state of changelog format {meta.get('format', 2)}, this "
                                  f"release writes {CHANGELOG_FORMAT}: give it a new --group-id (or --state-topic), "
                                  "or rebuild the state with profiles replay")
            try:
                names = loader.names_of(partition, meta)
            except ValueError as exc:
                raise StreamError(f"{self.topic}[{partition}]: {exc}") from None
            state.merge_category_names({int(k): v for k, v in names.items()})
            state.outcomes.merge_partition(partition, meta.get("outcomes", {}))
        if loader.keyless:
            log.warning("%s: %d record(s) without a key left out of the restore", self.topic, loader.keyless)
        try:
            users = loader.finish()
        except RefusedRecords as exc:
            raise StreamError(f"{self.topic}[{exc.partition}]: {exc}") from None
        if on_progress is not None:
            on_progress()  # erased users leave a big table in a copy of it: a tick before the snapshot's users
        from_snapshot = state.load_base_partitions(partitions)
        done = time.perf_counter()
        return Restored(users, from_snapshot, finishing - started - loading, done - started)
