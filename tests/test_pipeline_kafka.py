"""The whole pipeline against a real broker: events in, profiles and dead letters out."""

from __future__ import annotations

import orjson
import numpy as np
import pytest

from models.profile_model import ModelConfig
from stream.generator import generate
from stream.malformed import corrupt_some
from tests.helpers import (
    STATE_ATOL, create_topics, expected_from_events, latest_profiles, produce, read_topic, run_until_drained,
)

PARTITIONS = 4


def keyed(events: list[dict], values: list[bytes] | None = None) -> list[tuple[bytes, bytes]]:
    values = values if values is not None else [orjson.dumps(e) for e in events]
    return [(str(e["user_id"]).encode(), v) for e, v in zip(events, values)]


def assert_profiles_match(profiles: dict[str, dict], events: list[dict]) -> None:
    expected = expected_from_events(events)
    assert set(profiles) == set(expected), "exactly the users with events have a profile"
    for user, want in expected.items():
        got = profiles[user]
        assert got["counts"] == {t: want["counts"].get(t, 0) for t in ("search", "click", "add_to_cart", "purchase")}
        assert round(got["spend"] * 1e6) == want["spend_micros"], user
        assert got["last_event_ts"] == want["last_ts"]


@pytest.fixture(scope="module")
def log_20k():
    return generate(users=1000, events=20000, seed=7)


def test_every_user_gets_exact_counts_and_spend(kafka, settings_factory, log_20k):
    settings = settings_factory()
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: PARTITIONS})
    produce(kafka, topic, keyed(log_20k.events))

    run_until_drained(settings)

    profiles, n_records = latest_profiles(kafka, settings.output_topic)
    assert len(log_20k.users) == 1000
    assert_profiles_match(profiles, log_20k.events)
    assert n_records >= len(profiles)
    sample = next(iter(profiles.values()))
    assert set(sample) >= {"user_id", "model_version", "updated_at", "last_event_ts", "counts", "spend",
                           "top_categories", "purchase_propensity", "churn_risk", "price_tier",
                           "interest_cluster", "embedding"}
    for p in profiles.values():
        assert 0.0 <= p["purchase_propensity"] <= 1.0 and 0.0 <= p["churn_risk"] <= 1.0
        assert len(p["embedding"]) == ModelConfig().state_size and all(np.isfinite(p["embedding"]))
        assert 1 <= len(p["top_categories"]) <= 3
        assert all(c["category"] in log_20k.categories for c in p["top_categories"])
    assert read_topic(kafka, settings.dead_letter_topic) == []


def test_malformed_records_go_to_the_dead_letter_topic_and_nothing_else_is_lost(kafka, settings_factory, log_20k):
    settings = settings_factory(max_event_bytes=4096)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: PARTITIONS})
    values, bad = corrupt_some(log_20k.events, fraction=0.02, seed=3, max_event_bytes=4096)
    assert len(set(bad.values())) == 8, "every kind of malformed record is in the log"
    produce(kafka, topic, keyed(log_20k.events, values))

    daemon = run_until_drained(settings)

    valid = [e for i, e in enumerate(log_20k.events) if i not in bad]
    profiles, _ = latest_profiles(kafka, settings.output_topic)
    assert_profiles_match(profiles, valid)

    dead = read_topic(kafka, settings.dead_letter_topic)
    assert len(dead) == len(bad)
    # Every dead letter is a bad record, byte for byte, with the right reason and its source position.
    expected = {values[i]: reason for i, reason in bad.items()}
    source = {(r.partition, r.offset): r.value for r in read_topic(kafka, topic)}
    for record in dead:
        assert record.value in expected
        assert record.headers["dlq.reason"].decode() == expected[record.value]
        assert record.headers["dlq.topic"].decode() == topic
        position = (int(record.headers["dlq.partition"]), int(record.headers["dlq.offset"]))
        assert source[position] == record.value
        assert record.headers["dlq.detail"]
    assert len({r.value for r in dead}) == len(bad)

    # The metrics count the same: invalid events by reason, dead letters, valid events by type.
    registry = daemon.metrics.registry
    for reason in set(bad.values()):
        want = sum(1 for r in bad.values() if r == reason)
        assert registry.get_sample_value("profiles_invalid_events_total", {"reason": reason}) == want
    assert registry.get_sample_value("profiles_dead_letters_published_total") == len(bad)
    for kind in ("search", "click", "add_to_cart", "purchase"):
        want = sum(1 for e in valid if e["type"] == kind)
        assert registry.get_sample_value("profiles_events_consumed_total", {"topic": topic, "type": kind}) == want
    assert registry.get_sample_value("profiles_users_in_state") == len(profiles)


def test_batch_size_does_not_change_the_result(kafka, settings_factory, unique):
    log = generate(users=150, events=2500, seed=11)
    topic = unique("events-invariance")
    create_topics(kafka, {topic: PARTITIONS})
    produce(kafka, topic, keyed(log.events))

    results = {}
    for batch in (1, 7, 5000):
        settings = settings_factory(input_topics=(topic,), batch_max_events=batch,
                                    output_topic=unique(f"profiles-b{batch}"), group_id=unique(f"group-b{batch}"))
        daemon = run_until_drained(settings, timeout_s=240)
        profiles, _ = latest_profiles(kafka, settings.output_topic)
        assert_profiles_match(profiles, log.events)
        state = daemon.updater.state.snapshot()
        results[batch] = (profiles, state)

    base_profiles, base_state = results[5000]
    order = {u: i for i, u in enumerate(base_state["user_ids"])}
    for batch in (1, 7):
        profiles, state = results[batch]
        idx = [order[u] for u in state["user_ids"]]
        # Same final model state, whatever the batching (floats: allclose; counters: identical).
        np.testing.assert_allclose(state["hidden"], base_state["hidden"][idx], atol=STATE_ATOL)
        np.testing.assert_array_equal(state["counts"], base_state["counts"][idx])
        np.testing.assert_array_equal(state["spend_micros"], base_state["spend_micros"][idx])
        for user, p in profiles.items():
            np.testing.assert_allclose(p["embedding"], base_profiles[user]["embedding"], atol=STATE_ATOL)
            assert p["counts"] == base_profiles[user]["counts"]


def test_the_events_consumed_counter_finds_each_records_topic():
    """The daemon labels events_consumed by topic through topic_codes: several topics, or one (no lookups)."""
    from consumers.daemon import topic_codes

    topics = ["clicks", "searches", "clicks", "orders", "searches"]
    names, codes = topic_codes(topics)
    assert sorted(names) == ["clicks", "orders", "searches"] and [names[c] for c in codes] == topics
    names, codes = topic_codes(["events"] * 3)
    assert names == ["events"] and codes.tolist() == [0, 0, 0]
