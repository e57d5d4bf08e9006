"""The partitioning policy: a record keyed by something other than its user id, or a user's event on a
second partition, is dead-lettered as wrong_partition, never silently skipped (docs/contracts.md)."""

from __future__ import annotations

import logging

import orjson
import pytest
from confluent_kafka import Producer

from models.update_step import load_updater
from stream.events import WRONG_PARTITION, RecordBatch
from stream.settings import Settings
from tests.helpers import DEVICE, create_topics, latest_profiles, read_topic, record_batch, run_until_drained

EVENTS = Settings(device=DEVICE, input_topics=("events",))


def event(i: int, user: str | int = "u1") -> dict:
    return {"event_id": f"e{i}", "user_id": user, "type": "click", "ts": 1_700_000_000_000 + i * 1000,
            "item_id": f"i{i % 5}", "category": "shoes"}


def batch(events: list[dict], partitions: list[int], offsets: list[int], keys: list[bytes | None] | None = None,
          topic: str = "events") -> RecordBatch:
    return record_batch(events, topic=topic, partitions=partitions, offsets=offsets, keys="user" if keys is None else keys)


def applied(updater, user: str) -> int:
    row = updater.state.row(user)
    return 0 if row is None else int(updater.state.counts[row].sum())


def test_a_user_on_two_partitions_keeps_one_and_dead_letters_the_other():
    updater = load_updater(EVENTS)
    log = [event(i) for i in range(20)]
    partitions = [i % 2 for i in range(20)]  # e.g. a producer that keys by session
    offsets = [i // 2 for i in range(20)]  # each partition's own offsets: 0..9 on both
    first = updater.process(batch(log[:12], partitions[:12], offsets[:12]))
    second = updater.process(batch(log[12:], partitions[12:], offsets[12:]))
    dead = first.dead_letters + second.dead_letters
    # The first record's partition (0) owns the user; every event on partition 1 is dead-lettered, by name.
    assert applied(updater, "u1") == 10 and len(dead) == 10
    assert {(d.reason, d.partition) for d in dead} == {(WRONG_PARTITION, 1)}
    assert sorted(d.offset for d in dead) == list(range(10))
    assert "is read from partition 0, this record is on partition 1" in dead[0].detail
    row = updater.state.row("u1")
    assert updater.state.partition[row] == 0 and updater.state.watermark[row, 0] == 9

    # Re-read after a restart: the owner's events are skipped by the watermark, the others dead-lettered
    # again (at-least-once, like any dead letter), never taken as already applied.
    again = updater.process(batch(log, partitions, offsets))
    assert again.replayed == 10 and len(again.dead_letters) == 10 and applied(updater, "u1") == 10


def test_a_new_user_seen_on_two_partitions_in_one_batch_takes_the_first():
    updater = load_updater(EVENTS)
    log = [event(i, "u2") for i in range(6)]
    result = updater.process(batch(log, [1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 2, 2]))
    assert applied(updater, "u2") == 3 and updater.state.partition[updater.state.row("u2")] == 1
    assert sorted((d.partition, d.offset) for d in result.dead_letters) == [(0, 0), (0, 1), (0, 2)]


def test_records_not_keyed_by_their_user_id_are_dead_lettered():
    updater = load_updater(EVENTS)
    log = [event(0, "u1"), event(1, "u2"), event(2, 42), event(3, "u3"), event(4, "ü")]
    keys = [b"u1", None, b"42", b"session-17", "ü".encode()]  # integer ids key as their decimal string
    result = updater.process(batch(log, [0] * 5, list(range(5)), keys))
    assert {d.offset: d.detail for d in result.dead_letters} == {
        1: "no key: records must be keyed by user id",
        3: "key b'session-17' is not the user id 'u3': records must be keyed by user id"}
    assert {d.reason for d in result.dead_letters} == {WRONG_PARTITION}
    assert result.dead_letters[0].value == orjson.dumps(log[1])  # byte for byte, as every dead letter
    assert sorted(updater.state.user_ids) == ["42", "u1", "ü"]


def test_the_key_is_the_raw_user_id_under_pseudonyms():
    updater = load_updater(Settings(device=DEVICE, input_topics=("events",), pseudonymize_key="k3y"))
    result = updater.process(batch([event(0, "alice")], [0], [0]))
    assert not result.dead_letters and len(updater.state) == 1 and updater.state.row("alice") is None


def test_file_replays_have_no_partitions_and_no_keys():
    """Records of a file (not an input topic) carry no key and partition 0: the policy does not apply."""
    updater = load_updater(EVENTS)
    log = [event(i, f"u{i % 3}") for i in range(30)]
    result = updater.process(batch(log, [0] * 30, list(range(30)), [None] * 30, topic="old.jsonl"))
    assert not result.dead_letters and sum(applied(updater, f"u{k}") for k in range(3)) == 30
    # ...and a user first seen in a file is taken up by the partition of its first Kafka event.
    live = updater.process(batch([event(100, "u0"), event(101, "u0")], [1, 0], [0, 0]))
    assert [(d.partition, d.offset) for d in live.dead_letters] == [(0, 0)]
    assert updater.state.partition[updater.state.row("u0")] == 1


def produce_to(kafka, topic: str, records: list[tuple[bytes | None, bytes, int]]) -> None:
    """(key, value, partition) records, each to its explicit partition (as a custom partitioner would)."""
    producer = Producer(kafka.client_config(**{"linger.ms": 5, "enable.idempotence": True}))
    failures: list[str] = []
    for key, value, partition in records:
        producer.produce(topic, value, key, partition=partition,
                         on_delivery=lambda err, _m: failures.append(str(err)) if err else None)
    assert producer.flush(60) == 0 and not failures, failures


def test_on_the_broker_no_event_of_a_user_on_two_partitions_is_silently_lost(kafka, settings_factory, caplog):
    settings = settings_factory(batch_max_events=4)  # several batches: the warning is rate-limited across them
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    log = [event(i, "split") for i in range(20)]
    records = [(b"split", orjson.dumps(e), i % 2) for i, e in enumerate(log)]  # 10 on each partition
    unkeyed = event(99, "nokey")
    records.append((None, orjson.dumps(unkeyed), 0))
    produce_to(kafka, topic, records)

    with caplog.at_level(logging.WARNING, logger="models.update_step"):
        daemon = run_until_drained(settings)

    profiles, _ = latest_profiles(kafka, settings.output_topic)
    dead = read_topic(kafka, settings.dead_letter_topic)
    assert {r.headers["dlq.reason"] for r in dead} == {WRONG_PARTITION.encode()}
    counted = sum(profiles["split"]["counts"].values())
    split_dead = [r for r in dead if r.key == b"split"]
    assert counted + len(split_dead) == 20, "every event is applied or dead-lettered"
    assert counted == 10 and len({r.headers["dlq.partition"] for r in split_dead}) == 1  # one partition's ten
    assert [orjson.loads(r.value) for r in dead if r.key is None] == [unkeyed]
    assert "nokey" not in profiles
    value = daemon.metrics.registry.get_sample_value
    assert value("profiles_invalid_events_total", {"reason": WRONG_PARTITION}) == 11
    assert value("profiles_dead_letters_published_total") == 11
    warnings = [r for r in caplog.records if "wrong_partition" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per 30 s, with a count
    assert "produce with key = user id" in warnings[0].getMessage()


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_repartition_applies_every_event_of_unkeyed_producers(kafka, settings_factory, guarantee):
    """--repartition: records with no key or a session key, a user spread over both input partitions, are
    re-keyed through the internal topic and every event applied once; bad records are dead-lettered at
    their source position; a forget record (unkeyed too) still acts in order with the user's events."""
    settings = settings_factory(batch_max_events=7, repartition=True, guarantee=guarantee)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    split = [event(i, "split") for i in range(20)]
    records = [(None if i % 3 else f"session-{i}".encode(), orjson.dumps(e), i % 2) for i, e in enumerate(split)]
    gone = [event(100 + i, "gone") for i in range(3)]
    records += [(None, orjson.dumps(e), 1) for e in gone]
    records.append((None, orjson.dumps({"control": "forget", "user_id": "gone"}), 1))
    records += [(None, orjson.dumps(event(200 + i, 42)), i % 2) for i in range(4)]  # an integer id
    records.append((b"x", b"{not json", 0))
    produce_to(kafka, topic, records)

    daemon = run_until_drained(settings)

    profiles, _ = latest_profiles(kafka, settings.output_topic)
    assert sum(profiles["split"]["counts"].values()) == 20  # both partitions' events, each once
    assert sum(profiles["42"]["counts"].values()) == 4
    assert "gone" not in profiles  # erased (its tombstone is the latest record)
    dead = read_topic(kafka, settings.dead_letter_topic)
    assert [(r.headers["dlq.reason"], r.headers["dlq.topic"], r.headers["dlq.partition"]) for r in dead] == [
        (b"not_json", topic.encode(), b"0")]
    forwarded = read_topic(kafka, settings.repartition_topic)
    assert len(forwarded) == 20 + 3 + 1 + 4
    partitions_of: dict[bytes, set[int]] = {}
    for r in forwarded:
        partitions_of.setdefault(r.key, set()).add(r.partition)
        assert r.key == str(orjson.loads(r.value)["user_id"]).encode()
    assert set(partitions_of) == {b"split", b"gone", b"42"} and all(len(p) == 1 for p in partitions_of.values())
    value = daemon.metrics.registry.get_sample_value
    assert value("profiles_records_repartitioned_total") == 28
    assert value("profiles_invalid_events_total", {"reason": WRONG_PARTITION}) is None
    assert value("profiles_invalid_events_total", {"reason": "not_json"}) == 1
    applied_ = value("profiles_events_consumed_total", {"topic": settings.repartition_topic, "type": "click"})
    assert applied_ in (24, 27)  # gone's 3 events count unless the forget came in their batch (dropped unapplied)
