"""--publish-interval: a user's profile at most once per interval, its latest, and none left out: deferred
users are published at the next tick, at shutdown, and after a crash by whoever restores them."""

from __future__ import annotations

import signal

import orjson

from consumers.bench import run_daemon_until
from models.update_step import load_updater
from stream.settings import Settings
from tests.helpers import (
    DEVICE, committed_offsets, create_topics, end_offsets, latest_profiles, produce, published, record_batch,
    run_until_drained, start_daemon, wait_until,
)

HOUR_MS = 3_600_000


def event(i: int, user: str) -> dict:
    return {"event_id": f"e{i}", "user_id": user, "type": "click", "ts": 1_700_000_000_000 + i * 1000,
            "item_id": f"i{i % 5}", "category": "shoes"}


def counted(profile: bytes) -> int:
    return sum(orjson.loads(profile)["counts"].values())


def test_profiles_are_deferred_to_the_interval_and_each_user_published_once_with_its_latest():
    updater = load_updater(Settings(device=DEVICE, publish_interval_ms=HOUR_MS))
    first = updater.process(record_batch([event(i, "u1") for i in range(3)]))
    second = updater.process(record_batch([event(3, "u1"), event(4, "u2")], first_offset=3))
    assert first.profiles == [] and second.profiles == []  # within the interval: nothing published...
    state = updater.state
    assert sorted(state.user_ids[r] for r in second.rows) == ["u1", "u2"]  # ...but the state is written
    assert state.columns["unpublished"][: len(state), 0].tolist() == [1, 1]

    due = updater.publish_due(force=True)  # a shutdown or rebalance: every deferred user, once
    profiles = dict(updater.profiles_for(due))
    assert {k: counted(v) for k, v in profiles.items()} == {b"u1": 4, b"u2": 1}
    assert len(updater.publish_due(force=True)) == 0 and not state.columns["unpublished"][:2, 0].any()

    updater.process(record_batch([event(5, "u2")], first_offset=5))
    updater._publish_at = 0.0  # the interval is up: the next batch publishes the deferred and its own
    third = updater.process(record_batch([event(6, "u3")], first_offset=6))
    assert {k: counted(v) for k, v in third.profiles} == {b"u2": 2, b"u3": 1}


def test_without_an_interval_every_batch_publishes_and_the_layout_is_unchanged():
    updater = load_updater(Settings(device=DEVICE))
    result = updater.process(record_batch([event(0, "u1")]))
    assert [k for k, _ in result.profiles] == [b"u1"] and updater.state.columns["unpublished"].shape[1] == 0


def test_on_the_broker_shutdown_publishes_the_deferred_once_each(kafka, settings_factory):
    settings = settings_factory(batch_max_events=10, publish_interval_ms=HOUR_MS)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    log = [event(i, f"u{i % 4}") for i in range(60)]
    produce(kafka, topic, [(e["user_id"].encode(), orjson.dumps(e)) for e in log])
    daemon = run_until_drained(settings)
    profiles, records = latest_profiles(kafka, settings.output_topic)
    assert records == 4  # six batches, but each user once: at shutdown
    assert {u: sum(p["counts"].values()) for u, p in profiles.items()} == {f"u{k}": 15 for k in range(4)}
    assert daemon.metrics.registry.get_sample_value("profiles_profiles_published_total") == 4


def test_after_a_crash_the_users_it_deferred_are_published_by_the_next_owner(kafka, unique, settings_factory):
    topic, out, group = unique("events"), unique("profiles"), unique("group")
    create_topics(kafka, {topic: 2})
    log = [event(i, f"u{i % 5}") for i in range(50)]
    produce(kafka, topic, [(e["user_id"].encode(), orjson.dumps(e)) for e in log])
    proc = start_daemon(kafka, "--input-topics", topic, "--output-topic", out, "--group-id", group,
                        "--publish-interval", "1h")
    try:
        ends = end_offsets(kafka, topic)
        wait_until(lambda: committed_offsets(kafka, group, topic) == ends, 90, "the first daemon to commit")
        proc.send_signal(signal.SIGKILL)  # no shutdown: its deferred profiles were never published
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert published(kafka, out) == 0
    # The next owner restores the users with their unpublished marks and publishes them at its first tick.
    settings = settings_factory(input_topics=(topic,), output_topic=out, group_id=group, publish_interval_ms=500)
    daemon = run_daemon_until(settings, load_updater(settings), lambda d: d.stats.profiles >= 5, timeout_s=90)
    assert daemon.stats.events == 0  # nothing re-applied: all of it came back from the changelog
    profiles, _ = latest_profiles(kafka, out)
    assert {u: sum(p["counts"].values()) for u, p in profiles.items()} == {f"u{k}": 10 for k in range(5)}
