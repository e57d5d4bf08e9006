"""stream/changelog.py on its own, against the real broker: what a batch writes is what a restore reads."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from stream.changelog import META_KEY, Changelog
from stream.changelog_records import CHANGELOG_FORMAT, NAME_PART_BYTES, NAMES_KEY
from stream.events import DeadLetter, RecordBatch
from stream.expiry import Expired
from stream.kafka import Publisher, StreamError, admin_client, ensure_topics
from stream.metrics import Metrics
from stream.outcomes import KEPT_ANCHORS
from stream.state import StateTable
from tests.helpers import DEVICE, committed_offsets, read_topic

PARTITIONS = 3


class Inputs:
    """The input consumer as the changelog sees it: what it owns, and a real group's offset commit."""

    def __init__(self, kafka, group: str, topic: str) -> None:
        self.consumer = Consumer(kafka.client_config(**{"group.id": group, "enable.auto.commit": False}))
        self.assigned = {(topic, p) for p in range(PARTITIONS)}
        self.consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])

    def commit(self, offsets: list[TopicPartition]) -> None:
        self.consumer.commit(offsets=offsets, asynchronous=False)

    def group_metadata(self) -> object:
        return self.consumer.consumer_group_metadata()


def table() -> StateTable:
    return StateTable(8, torch.device(DEVICE), watermark_slots=1, dedupe_window=4)


def fill(state: StateTable, users: list[str], seed: int) -> np.ndarray:
    """Users with some state of every kind, spread over the input partitions."""
    rng = np.random.default_rng(seed)
    rows = state.rows_for(users)
    state.states[torch.from_numpy(rows).to(state.device)] = torch.from_numpy(
        rng.standard_normal((len(rows), 8)).astype(np.float32)).to(state.device)
    state.counts[rows] = rng.integers(0, 50, state.counts[rows].shape)
    state.spend_micros[rows] = rng.integers(0, 10**9, len(rows))
    state.last_ts[rows] = rng.integers(1, 10**12, len(rows))
    state.partition[rows] = rows % PARTITIONS
    state.watermark[rows, 0] = rng.integers(0, 1000, len(rows))
    state.recent_ids[rows] = rng.integers(1, 2**63, state.recent_ids[rows].shape, dtype=np.uint64)
    state.merge_category_names({3: "shoes", 7: "books"})
    return rows


def records_of(topic: str, offsets: dict[int, int]) -> RecordBatch:
    """The input records a batch came from (only their positions matter here)."""
    parts = sorted(offsets)
    return RecordBatch.of([b"{}"] * len(parts), topic=topic, partition=parts, offsets=[offsets[p] for p in parts])


def by_user(snapshot: dict) -> dict[str, tuple]:
    names = [n for n in snapshot if n not in ("format", "user_ids", "category_names", "max_event_ts", "outcomes")]
    return {u: tuple(snapshot[n][i].tobytes() for n in names) for i, u in enumerate(snapshot["user_ids"])}


def make(kafka, unique, *, exactly_once: bool = False, state: StateTable | None = None,
         inputs: Inputs | None = None) -> Changelog:
    state = state if state is not None else table()
    publisher = Publisher(kafka, transactional_id=unique("txn") if exactly_once else "")
    if exactly_once:
        publisher.init_transactions()
    return Changelog(kafka, state, publisher, Metrics(), topic=unique("state"), model_version="m1", inputs=inputs,
                     output_topic=unique("profiles"), dead_letter_topic=unique("dlq"),
                     profiles_for=lambda rows: [(state.user_ids[r].encode(), b"again") for r in rows.tolist()])


@pytest.fixture
def topics(kafka, unique):
    ensure_topics(admin_client(kafka), {unique("events"): PARTITIONS, unique("profiles"): PARTITIONS,
                                        unique("dlq"): PARTITIONS, unique("state"): PARTITIONS},
                  compacted=[unique("state")])


def test_a_committed_batch_restores_into_a_fresh_table_and_tombstones_erase(kafka, unique, topics):
    inputs = Inputs(kafka, unique("group"), unique("events"))
    changelog = make(kafka, unique, inputs=inputs)
    state = changelog.state
    rows = fill(state, [f"user-{i}" for i in range(30)], seed=1)
    dead = DeadLetter(b"not json", b"k", "invalid_json", "bad", unique("events"), 1, 4)
    changelog.stage(records_of(unique("events"), {0: 9, 1: 4, 2: 7}), rows, [(b"user-0", b"{}")], [dead], [])
    assert changelog.commit()
    assert committed_offsets(kafka, unique("group"), unique("events")) == {0: 10, 1: 5, 2: 8}

    restored = make(kafka, unique, inputs=inputs)
    result = restored.restore(list(range(PARTITIONS)))
    assert result.users == 30 and result.from_snapshot == 0
    assert by_user(restored.state.snapshot()) == by_user(state.snapshot())
    assert restored.state.category_names == {3: "shoes", 7: "books"}
    assert len(read_topic(kafka, unique("dlq"))) == 1

    # Erase two users: the next batch writes their tombstones; a restore no longer has them.
    erased = [(user, int(state.partition[state.row(user)])) for user in ("user-4", "user-5")]
    state.forget([u for u, _ in erased])
    changelog.stage(records_of(unique("events"), {1: 5}), np.array([], dtype=np.int64), [], [], erased)
    assert changelog.commit()
    again = make(kafka, unique, inputs=inputs)
    assert again.restore(list(range(PARTITIONS))).users == 28
    assert set(again.state.user_ids) == {f"user-{i}" for i in range(30)} - {"user-4", "user-5"}
    assert by_user(again.state.snapshot()) == by_user(state.snapshot())
    tombstones = [r.key for r in read_topic(kafka, unique("profiles")) if r.value is None]
    assert sorted(tombstones) == [b"user-4", b"user-5"]
    inputs.consumer.close()


def test_each_partition_s_outcome_counts_come_back_with_its_meta_record(kafka, unique, topics):
    """The calibration's counts (stream/outcomes.py) cannot be counted again from the users once they move on to
    the next anchor: each partition's travel in its meta record, and a member restoring some partitions gets theirs."""
    inputs = Inputs(kafka, unique("group"), unique("events"))
    changelog = make(kafka, unique, inputs=inputs)
    state = changelog.state
    rows = fill(state, [f"user-{i}" for i in range(12)], seed=2)
    bins = np.full(len(rows), 5, dtype=np.uint8)
    for head in (0, 1):
        state.outcomes.add(head, 3000, state.partition[rows], bins, np.ones(len(rows), dtype=np.int64))
    changelog.stage(records_of(unique("events"), {0: 1, 1: 1, 2: 1}), rows, [], [], [])
    assert changelog.commit()
    state.outcomes.add(0, 3001, state.partition[rows], bins, np.zeros(len(rows), dtype=np.int64))
    changelog.stage(records_of(unique("events"), {0: 2}), rows[:1], [], [], [])  # a batch after the next anchor
    assert changelog.commit()

    member = make(kafka, unique, inputs=inputs)
    member.restore([1, 2])
    assert set(member.state.outcomes.counts) == {(0, p, a) for p in (1, 2) for a in (3000, 3001)[-KEPT_ANCHORS:]} | {
        (1, p, 3000) for p in (1, 2)}
    for key, counts in member.state.outcomes.counts.items():
        np.testing.assert_array_equal(counts, state.outcomes.counts[key])
    inputs.consumer.close()


def test_a_restore_refuses_the_state_of_another_model(kafka, unique, topics):
    changelog = make(kafka, unique)
    changelog.write_state(fill(changelog.state, ["a", "b", "c"], seed=2))
    changelog.publisher.flush()
    other = make(kafka, unique)
    other.model_version = "m2"
    with pytest.raises(StreamError, match="holds state of model 'm1'"):
        other.restore([0, 1, 2])
    assert len([r for r in read_topic(kafka, unique("state")) if r.key == META_KEY]) == PARTITIONS


def test_a_shop_s_many_long_category_names_travel_in_parts_under_kafka_s_record_limit(kafka, unique, topics):
    """6,000 names of 200 characters (1.3 MB) in one record would pass Kafka's 1 MB limit and fail the produce at
    every batch: they go in parts, and a restore reads every one back."""
    inputs = Inputs(kafka, unique("group"), unique("events"))
    changelog = make(kafka, unique, inputs=inputs)
    state = changelog.state
    rows = fill(state, [f"user-{i}" for i in range(6)], seed=3)
    names = {1000 + i: f"{i:06d}-" + "category name " * 14 for i in range(6000)}
    state.merge_category_names(names)
    changelog.stage(records_of(unique("events"), {0: 1, 1: 1, 2: 1}), rows, [], [], [])
    assert changelog.commit()
    records = read_topic(kafka, unique("state"))
    assert max(len(r.value) for r in records) < NAME_PART_BYTES + 10_000
    metas = [orjson.loads(r.value) for r in records if r.key == META_KEY]
    assert len(metas) == PARTITIONS and all("category_names" not in m and m["name_parts"] >= 5 for m in metas)
    restored = make(kafka, unique, inputs=inputs)
    restored.restore([0, 1, 2])
    assert restored.state.category_names == {**names, 3: "shoes", 7: "books"}
    inputs.consumer.close()


def test_a_new_category_writes_its_part_of_the_names_again_not_all_of_them(kafka, unique, topics):
    """Each change of the names wrote every part to every partition: a shop with 20,000 categories and 12
    partitions wrote 13 MB per new one, and a restore of a changelog not yet compacted read them all. Now a new name
    writes the one part it falls in, but to a partition whose meta record may not name the others (given up in a
    rebalance), which gets every part; a restore reads them all back."""
    events = unique("events")
    inputs = Inputs(kafka, unique("group"), events)
    changelog = make(kafka, unique, inputs=inputs)
    state = changelog.state
    rows = fill(state, [f"user-{i}" for i in range(6)], seed=3)
    names = {1000 + 7919 * i: f"{i:06d}-" + "category name " * 14 for i in range(6000)}
    state.merge_category_names(names)

    def written(offset: int) -> dict[int, list[int]]:
        """A write and its commit: partition -> the part numbers of the names written there."""
        seen = {(r.partition, r.offset) for r in read_topic(kafka, unique("state"))}
        changelog.stage(records_of(events, {0: offset, 1: offset, 2: offset}), rows, [], [], [])
        assert changelog.commit()
        out: dict[int, list[int]] = {p: [] for p in range(PARTITIONS)}
        for r in read_topic(kafka, unique("state")):
            if r.key.startswith(NAMES_KEY) and (r.partition, r.offset) not in seen:
                out[r.partition].append(int(r.key[len(NAMES_KEY):]))
        return out

    first = written(1)
    parts = len(first[0])
    assert parts >= 8 and all(sorted(numbers) == list(range(parts)) for numbers in first.values())
    state.merge_category_names({5: "sandals"})
    assert written(2) == {p: [5 % parts] for p in range(PARTITIONS)}
    changelog.release([TopicPartition(events, 1)])  # and assigned again: another member wrote there meanwhile
    state.merge_category_names({6: "boots"})
    again = written(3)
    assert again[0] == again[2] == [6 % parts] and sorted(again[1]) == list(range(parts))
    latest = {r.partition: orjson.loads(r.value) for r in read_topic(kafka, unique("state")) if r.key == META_KEY}
    generations = {tuple(meta["name_generations"]) for meta in latest.values()}
    assert len(latest) == PARTITIONS and len(generations) == 1 and len(set(next(iter(generations)))) > 1
    restored = make(kafka, unique, inputs=inputs)
    restored.restore([0, 1, 2])
    assert restored.state.category_names == {**names, 3: "shoes", 7: "books", 5: "sandals", 6: "boots"}
    inputs.consumer.close()


def test_names_cut_short_leave_the_meta_record_before_them_whole_and_older_ones_still_read(kafka, unique, topics):
    """A write of the names cut short (a crashed transaction's records, which Tansu shows) leaves parts of a newer
    generation without their meta record: the restore reads the generation its latest meta record names. A meta
    record of a release before the parts lists the names itself; one whose part is missing is a clear error."""
    changelog = make(kafka, unique)
    changelog.write_state(fill(changelog.state, ["a", "b", "c"], seed=4))
    changelog.publisher.flush()
    cut_short = {"generation": changelog.names_generation + 1, "part": 0, "names": {"3": "sandals"}}
    changelog.publisher.produce_to_partitions(unique("state"), [NAMES_KEY + b"0"], [orjson.dumps(cut_short)], [0])
    changelog.publisher.flush()
    restored = make(kafka, unique)
    restored.restore([0, 1, 2])
    assert restored.state.category_names == {3: "shoes", 7: "books"}
    assert restored.names_generation == cut_short["generation"]  # its next write's generation is newer still
    old = {"model_version": "m1", "format": CHANGELOG_FORMAT, "category_names": {"9": "hats"}}
    changelog.publisher.produce_to_partitions(unique("state"), [META_KEY], [orjson.dumps(old)], [1])
    lacking = {"model_version": "m1", "format": CHANGELOG_FORMAT, "names_generation": 99, "name_parts": 1}
    changelog.publisher.produce_to_partitions(unique("state"), [META_KEY], [orjson.dumps(lacking)], [2])
    changelog.publisher.flush()
    older = make(kafka, unique)
    older.restore([0, 1])
    assert older.state.category_names == {3: "shoes", 7: "books", 9: "hats"}
    lacks = r"\[2\]: the category names .* lack part\(s\) \[0\] of 1 \(generation\(s\) \[99\]\)"
    with pytest.raises(StreamError, match=lacks):
        make(kafka, unique).restore([2])


@pytest.mark.parametrize("old_format", [2, 3])
def test_a_restore_refuses_a_changelog_of_an_earlier_format(kafka, unique, topics, old_format):
    """Before format 3 the meta record named categories by the model's bucket (loading those names as keys
    would list categories nobody holds); format 3's records have no visit counts. The restore stops and
    says what to do."""
    changelog = make(kafka, unique)
    old_meta = {"model_version": "m1", "category_names": {"3": "shoes"}}
    if old_format > 2:  # format 2 wrote no "format"
        old_meta["format"] = old_format
    changelog.publisher.produce_to_partitions(unique("state"), [META_KEY], [orjson.dumps(old_meta)], [0])
    changelog.publisher.flush()
    with pytest.raises(StreamError, match=f"changelog format {old_format}.*--group-id"):
        make(kafka, unique).restore([0, 1, 2])


def test_an_aborted_transaction_is_produced_again_with_the_same_offsets(kafka, unique, topics, monkeypatch):
    inputs = Inputs(kafka, unique("group"), unique("events"))
    changelog = make(kafka, unique, exactly_once=True, inputs=inputs)
    rows = fill(changelog.state, [f"user-{i}" for i in range(10)], seed=3)
    changelog.stage(records_of(unique("events"), {0: 2, 2: 5}), rows, [], [], [])
    real_commit, calls = Publisher.commit, []

    def commit_failing_once(self, offsets, group_metadata, timeout_s=60.0):
        calls.append(sorted((tp.partition, tp.offset) for tp in offsets))
        if len(calls) == 1:
            raise KafkaException(KafkaError(KafkaError._STATE, "injected abortable failure", txn_requires_abort=True))
        return real_commit(self, offsets, group_metadata, timeout_s)

    monkeypatch.setattr(Publisher, "commit", commit_failing_once)
    assert changelog.commit()
    assert calls == [[(0, 3), (2, 6)]] * 2, "the new transaction carries the same offsets"
    assert changelog.resent == 10
    assert changelog.metrics.registry.get_sample_value("profiles_transaction_failures_total") == 1
    assert committed_offsets(kafka, unique("group"), unique("events")) == {0: 3, 1: 0, 2: 6}
    restored = make(kafka, unique)
    assert restored.restore(list(range(PARTITIONS))).users == 10
    assert by_user(restored.state.snapshot()) == by_user(changelog.state.snapshot())
    inputs.consumer.close()


def test_expired_users_tombstones_keep_them_out_of_a_restore_and_an_abort_sends_them_again(
        kafka, unique, topics, monkeypatch):
    inputs = Inputs(kafka, unique("group"), unique("events"))
    changelog = make(kafka, unique, exactly_once=True, inputs=inputs)
    state = changelog.state
    changelog.stage(records_of(unique("events"), {0: 2}), fill(state, [f"user-{i}" for i in range(10)], seed=4),
                    [], [], [])
    assert changelog.commit()
    # Two users expire: their state goes; their tombstones and last profiles go out with the next batch.
    gone = [(user, int(state.partition[state.row(user)])) for user in ("user-2", "user-7")]
    expired = Expired(gone, [(user.encode(), b'{"expired": true}') for user, _ in gone])
    state.drop_rows(np.isin(np.array(state.user_ids), [u for u, _ in gone]))
    changelog.stage(records_of(unique("events"), {1: 4}), np.empty(0, dtype=np.int64), [], [], [], expired)
    real_commit, calls = Publisher.commit, []

    def commit_failing_once(self, offsets, group_metadata, timeout_s=60.0):
        calls.append(offsets)
        if len(calls) == 1:
            raise KafkaException(KafkaError(KafkaError._STATE, "injected abortable failure", txn_requires_abort=True))
        return real_commit(self, offsets, group_metadata, timeout_s)

    monkeypatch.setattr(Publisher, "commit", commit_failing_once)
    assert changelog.commit() and len(calls) == 2

    restored = make(kafka, unique)
    assert restored.restore(list(range(PARTITIONS))).users == 8
    assert set(restored.state.user_ids) == {f"user-{i}" for i in range(10)} - {"user-2", "user-7"}
    # Tansu does not read an aborted transaction's records back: the users are gone from the restore above
    # because the new transaction carried their tombstones again.
    assert {r.key for r in read_topic(kafka, unique("state")) if r.value is None} == {b"user-2", b"user-7"}
    last = {(r.key, r.value) for r in read_topic(kafka, unique("profiles"))}
    assert last == set(expired.profiles)  # and no tombstone: the last profile stays readable
    inputs.consumer.close()
