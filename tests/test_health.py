"""/metrics, /healthz and /readyz on the metrics port."""

from __future__ import annotations

import socket
import threading

import click
import orjson
import pytest

from consumers.commands.live import run_daemon
from consumers.daemon import ProfileDaemon
from models.category_calibration import CATEGORY_TERMS
from models.update_step import load_updater
from stream.anchor_samples import STATISTICS
from stream.broker import free_port
from stream.generator import generate
from stream.habit import CONTESTS
from stream.metrics import Health, Metrics, serve
from tests.helpers import committed_offsets, create_topics, end_offsets, produce, wait_until
from tests.helpers import http_get as get


def test_health_turns_false_when_the_loop_stalls():
    now = [100.0]
    health = Health(stall_after_s=30, clock=lambda: now[0])
    assert health.healthy and not health.ready
    now[0] = 129.0
    assert health.healthy
    now[0] = 131.0
    assert not health.healthy
    health.progressed()
    assert health.healthy
    health.set_ready(True)
    assert health.ready


def test_endpoints_during_a_real_run(kafka, settings_factory):
    settings = settings_factory()
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    log = generate(users=50, events=1500, seed=6)
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events])

    metrics, health, port = Metrics(), Health(settings.stall_after_s), free_port()
    server = serve(metrics, health, port, "127.0.0.1")
    stop = threading.Event()
    daemon = ProfileDaemon(settings, load_updater(settings), metrics, stop, health)
    assert get(port, "/readyz")[0] == 503  # not yet in the group
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, "readiness after the partitions are assigned")
        ends = end_offsets(kafka, topic)
        wait_until(lambda: committed_offsets(kafka, settings.group_id, topic) == ends, 60, "the log to be consumed")
        assert get(port, "/healthz") == (200, "ok\n")
        status, body = get(port, "/metrics")
        assert status == 200
        consumed = sum(float(line.split()[-1]) for line in body.splitlines()
                       if line.startswith("profiles_events_consumed_total{"))
        assert consumed == 1500
        assert get(port, "/nope")[0] == 404
        value = metrics.registry.get_sample_value
        assert value("profiles_ready") == 1 and value("profiles_assigned_partitions") == 2
        assert value("profiles_event_time_lag_seconds_count") > 0  # sampled: at least one event per batch
        assert value("profiles_device_memory_bytes", {"device": "host"}) > 10 * 2**20
        # The shop's habit as the state holds it after the last batch, and the leans top_categories takes from it.
        state = daemon.updater.state
        for span, contest in zip(("week", "two_days"), CONTESTS):
            assert value("profiles_shop_habit_evidence", {"span": span}) == state.habit.evidence(state.max_event_ts,
                                                                                               contest) != 0
        assert [value("profiles_top_categories_lean", {"toward": toward}) for toward in ("latest", "counts")] == \
            list(daemon.updater.habit_leans(state.max_event_ts))
        # The stream's calibration map as the state's counts give it (a 0 and b 1 where the model's own are kept).
        shop_map = daemon.updater.calibration.shop_map()
        for head, name in enumerate(("purchase_propensity", "churn_risk")):
            kept = shop_map.kept[head]
            assert value("profiles_stream_calibration_users", {"field": name}) == shop_map.users[head]
            terms = [value("profiles_stream_calibration_map", {"field": name, "term": t}) for t in ("a", "b", "drift")]
            assert terms == [shop_map.a[head] if kept else 0.0, shop_map.b[head] if kept else 1.0, shop_map.drift[head]]
            weights = [value("profiles_stream_calibration_map", {"field": name, "term": s}) for s in STATISTICS[head]]
            fitted = list(shop_map.weights[head] or [])  # the rules' statistics alone: 0 for the others
            assert weights == fitted + [0.0] * (len(STATISTICS[head]) - len(fitted))
        bend = [value("profiles_stream_calibration_map", {"field": "churn_risk", "term": f"log_idle_minutes_past_q{q}"})
                for q in (1, 2, 3)]  # churn_risk's bend in idle time: 0 where its fit is straight
        assert bend == list(shop_map.idle_weights or [0.0] * 3)
        reranking = [value("profiles_stream_calibration_map", {"field": "top_categories", "term": s})
                     for s in CATEGORY_TERMS]
        assert reranking == list(shop_map.category_weights if shop_map.reranks() else [0.0] * len(reranking))
        assert value("profiles_stream_calibration_users", {"field": "top_categories"}) == shop_map.category_users
        # Consumer lag comes from librdkafka's statistics (every 5 s): all read, so 0 for each partition.
        wait_until(lambda: all(value("profiles_consumer_lag_records", {"topic": topic, "partition": str(p)}) == 0
                               for p in (0, 1)), 30, "consumer lag from the statistics callback")
    finally:
        stop.set()
        thread.join(timeout=30)
        server.shutdown()
    assert not health.ready  # a stopped daemon is not ready
    assert metrics.registry.get_sample_value("profiles_ready") == 0
    # Restarted on a quiet input: the users restored from the changelog are in the gauges at once, not only
    # after the next batch (they read 0 until then, on every rollout).
    again, stop_again, thread_again, _ = start_member(settings)
    try:
        wait_until(lambda: again.health.ready, 60, "the restarted member to be ready")
        value = again.metrics.registry.get_sample_value
        assert value("profiles_users_in_state") == 50 and again.stats.events == 0
        assert value("profiles_state_bytes", {"device": "cpu"}) > 0
    finally:
        stop_again.set()
        thread_again.join(timeout=30)


def test_a_long_restore_keeps_liveness(kafka, settings_factory):
    """Reading the changelog is progress: a member restoring many users is not reported stalled."""
    from tests.helpers import run_until_drained

    settings = settings_factory(batch_max_events=50)
    create_topics(kafka, {settings.input_topics[0]: 2})
    log = generate(users=400, events=4000, seed=41).events
    produce(kafka, settings.input_topics[0], [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    run_until_drained(settings)  # leaves every user's state on the changelog

    now = [0.0]
    health = Health(stall_after_s=60, clock=lambda: now[0])
    now[0] = 1000.0  # as if the restore had already taken 1000 s
    assert not health.healthy
    daemon = ProfileDaemon(settings, load_updater(settings), Metrics(), threading.Event(), health)
    daemon.restore_partitions([0, 1])
    assert len(daemon.updater.state) == 400
    assert health.healthy, "the restore's reads did not tick /healthz"


def test_readiness_turns_false_when_the_broker_is_unreachable_beyond_the_session_timeout():
    """Evaluated when asked: true while the main loop is blocked (e.g. flushing to a dead broker) only
    until the broker has been unreachable for a session timeout."""
    now = [0.0]
    health = Health(stall_after_s=30, clock=lambda: now[0], unreachable_after_s=6)
    assert health.readiness() == (False, "starting: not in the consumer group yet")
    health.set_ready(True)
    health.broker_down()
    now[0] = 5.0
    health.broker_down()  # repeated reports keep the first time
    assert health.ready
    now[0] = 7.0
    assert health.readiness() == (False, "broker unreachable for 7s (over the 6s session timeout)")
    health.broker_up()
    assert health.ready
    health.set_ready(False, "standby: assigned no partition")
    assert health.readiness() == (False, "standby: assigned no partition")


def start_member(settings, port: int | None = None):
    """A daemon in a thread (with /readyz on `port` when given): (daemon, stop, thread, server)."""
    metrics, health = Metrics(), Health(settings.stall_after_s)
    server = serve(metrics, health, port, "127.0.0.1") if port else None
    stop = threading.Event()
    daemon = ProfileDaemon(settings, load_updater(settings), metrics, stop, health)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return daemon, stop, thread, server


def test_a_member_without_partitions_says_it_is_standby(kafka, settings_factory, caplog):
    settings = settings_factory()
    create_topics(kafka, {settings.input_topics[0]: 1})  # one partition, two members
    first, stop_first, thread_first, _ = start_member(settings)
    try:
        wait_until(lambda: first.health.ready, 60, "the first member to be ready")
        port = free_port()
        second, stop_second, thread_second, server = start_member(settings, port)
        try:
            def one_standby() -> bool:
                members = [first.health.readiness(), second.health.readiness()]
                return sorted(ok for ok, _ in members) == [False, True] and any(
                    why.startswith("standby: assigned no partition") for _, why in members)

            wait_until(one_standby, 60, "one member ready, the other standby")
            if not second.health.ready:
                status, body = get(port, "/readyz")
                assert status == 503 and "more members than partitions" in body
                assert second.metrics.registry.get_sample_value("profiles_ready") == 0
            assert "standby: assigned no partition; the 1 partition(s) of" in caplog.text
            # The standby takes over when the other member leaves.
            standby, stop_other, other_thread = ((second, stop_first, thread_first) if not second.health.ready
                                                 else (first, stop_second, thread_second))
            stop_other.set()
            other_thread.join(timeout=30)
            wait_until(lambda: standby.health.ready, 60, "the standby to take over")
            assert standby.source.assigned == {(settings.input_topics[0], 0)}
        finally:
            stop_second.set()
            thread_second.join(timeout=30)
            server.shutdown()
    finally:
        stop_first.set()
        thread_first.join(timeout=30)


def test_readiness_follows_a_broker_replaced_by_an_empty_one(replaceable_broker, settings_factory, caplog):
    """Killed while idle: not ready once the session is over, users released (gauges too), few log lines;
    a new empty broker on the same address: once the topic is re-created the member subscribes again,
    turns ready and consumes it, without a restart."""
    import logging

    from stream.kafka import configure_librdkafka_log
    from tests.helpers import latest_profiles

    configure_librdkafka_log(debug=False)  # as the CLI does
    kafka = replaceable_broker.kafka
    settings = settings_factory(kafka=kafka)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    log = generate(users=20, events=200, seed=8).events
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    port = free_port()
    daemon, stop, thread, server = start_member(settings, port)
    value = daemon.metrics.registry.get_sample_value
    try:
        wait_until(lambda: committed_offsets(kafka, settings.group_id, topic) == end_offsets(kafka, topic), 60,
                   "the log to be consumed")
        assert get(port, "/readyz") == (200, "ready\n") and value("profiles_users_in_state") == 20

        caplog.clear()
        with caplog.at_level(logging.INFO):
            replaceable_broker.stop()
            wait_until(lambda: "broker unreachable for" in get(port, "/readyz")[1], 30,
                       "/readyz to report the unreachable broker")
            assert get(port, "/readyz")[0] == 503 and value("profiles_ready") == 0
            wait_until(lambda: value("profiles_users_in_state") == 0, 15, "the released users to leave the gauge")
            assert value("profiles_assigned_partitions") == 0
            lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
        # Rate-limited: a handful of distinct lines for the whole outage (>= the 6 s session), not one per retry.
        assert len(lines) < 15, [r.getMessage() for r in lines]
        # Each connection failure once: librdkafka's FAIL line, not echoed by the daemon's error callback.
        failed = {r.getMessage().split("]: ", 1)[-1] for r in lines if r.name == "librdkafka"}
        assert any(kafka.bootstrap_servers in m for m in failed), [r.getMessage() for r in lines]
        echoed = [r.getMessage() for r in lines if r.name != "librdkafka"
                  and r.getMessage().removeprefix("Kafka: ") in failed]
        assert not echoed, echoed

        replaceable_broker.start_empty()
        wait_until(lambda: "input topic(s) " + topic + " not found" in get(port, "/readyz")[1], 60,
                   "/readyz to say the input topic is missing")
        create_topics(kafka, {topic: 2})
        again = generate(users=5, events=40, seed=9).events
        produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in again])
        wait_until(lambda: get(port, "/readyz")[0] == 200, 60, "ready again after the topic came back")
        wait_until(lambda: committed_offsets(kafka, settings.group_id, topic) == end_offsets(kafka, topic), 60,
                   "the re-created topic to be consumed")
        profiles, _ = latest_profiles(kafka, settings.output_topic)
        assert sum(sum(p["counts"].values()) for p in profiles.values()) == len(again)
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(timeout=30)
        server.shutdown()


def test_a_metrics_port_in_use_is_one_error_naming_the_option(settings_factory):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = settings_factory(metrics_port=port, metrics_address="127.0.0.1")
        with pytest.raises(click.ClickException, match=f"--metrics-port {port}: Address already in use"):
            run_daemon(settings, threading.Event())
