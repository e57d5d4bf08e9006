"""Dead letters that the broker cannot take as they are: a record far over the producer's message size."""

from __future__ import annotations

import hashlib
import threading

import orjson
from confluent_kafka import Producer

from stream.events import DEAD_LETTER_MAX_VALUE_BYTES
from stream.generator import generate
from tests.helpers import create_topics, latest_profiles, read_topic, run_until_drained

HUGE = 10 * 1024 * 1024


def produce_large(kafka, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """Like conftest.produce, with a producer that may send a record of HUGE bytes."""
    producer = Producer(kafka.client_config(**{"message.max.bytes": HUGE + 1024 * 1024, "linger.ms": 5,
                                               "enable.idempotence": True}))
    failures: list[str] = []
    for key, value in records:
        producer.produce(topic, value, key, on_delivery=lambda err, _m: failures.append(str(err)) if err else None)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert not failures, failures


def test_a_10mb_record_is_dead_lettered_truncated_and_the_daemon_goes_on(kafka, settings_factory):
    settings = settings_factory(batch_max_events=200)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 1})
    events = generate(users=20, events=300, seed=11).events
    huge = orjson.dumps({**events[0], "padding": "x" * HUGE})
    records = [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events]
    records.insert(150, (b"k" * 100_000, huge))  # a hostile key as well: the dead letter keeps it bounded
    produce_large(kafka, topic, records)

    daemon = run_until_drained(settings)

    dead = read_topic(kafka, settings.dead_letter_topic)
    assert len(dead) == 1, "dead-lettered once, never re-published"
    record = dead[0]
    assert record.headers["dlq.reason"] == b"too_large"
    assert record.headers["dlq.offset"] == b"150"
    assert int(record.headers["dlq.value_bytes"]) == len(huge)
    assert record.headers["dlq.value_sha256"] == hashlib.sha256(huge).hexdigest().encode()
    assert record.headers["dlq.truncated"] == b"true"
    assert record.value == huge[:daemon.changelog.dead_letter_max_bytes]
    assert daemon.changelog.dead_letter_max_bytes <= DEAD_LETTER_MAX_VALUE_BYTES
    assert int(record.headers["dlq.key_bytes"]) == 100_000 and len(record.key) < 100_000
    # Every event around it was applied, and each profile was published once (one run, no restart).
    profiles, published = latest_profiles(kafka, settings.output_topic)
    assert sum(sum(p["counts"].values()) for p in profiles.values()) == len(events)
    assert published == daemon.stats.profiles
    registry = daemon.metrics.registry
    assert registry.get_sample_value("profiles_invalid_events_total", {"reason": "too_large"}) == 1
    assert registry.get_sample_value("profiles_dead_letters_published_total") == 1
    assert registry.get_sample_value("profiles_dead_letter_failures_total") == 0


def test_a_dead_letter_the_producer_refuses_is_logged_and_counted_not_raised(settings_factory, caplog):
    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.events import DeadLetter
    from stream.metrics import Metrics

    settings = settings_factory()
    daemon = ProfileDaemon(settings, load_updater(settings), Metrics(), threading.Event())
    daemon.changelog.dead_letter_max_bytes = 4 * 1024 * 1024  # as if the limit were misjudged: the producer refuses it
    big = b"x" * (2 * 1024 * 1024)
    daemon.changelog.write_dead_letter(DeadLetter(big, b"k", "too_large", "too big", "events", 3, 42))
    registry = daemon.metrics.registry
    assert registry.get_sample_value("profiles_dead_letter_failures_total") == 1
    assert registry.get_sample_value("profiles_dead_letters_published_total") == 0
    assert "dead letter events[3]@42 (too_large, 2097152 bytes, sha256 " + hashlib.sha256(big).hexdigest() in caplog.text
