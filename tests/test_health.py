"""/metrics, /healthz and /readyz on the metrics port."""

from __future__ import annotations

import threading

import orjson

from consumers.daemon import ProfileDaemon
from consumers.pipeline import load_updater
from stream.broker import free_port
from stream.generator import generate
from stream.metrics import Health, Metrics, serve
from tests.conftest import committed_offsets, create_topics, end_offsets, produce, wait_until
from tests.conftest import http_get as get


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
        # Consumer lag comes from librdkafka's statistics (every 5 s): all read, so 0 for each partition.
        wait_until(lambda: all(value("profiles_consumer_lag_records", {"topic": topic, "partition": str(p)}) == 0
                               for p in (0, 1)), 30, "consumer lag from the statistics callback")
    finally:
        stop.set()
        thread.join(timeout=30)
        server.shutdown()
    assert not health.ready  # a stopped daemon is not ready
    assert metrics.registry.get_sample_value("profiles_ready") == 0


def test_a_long_restore_keeps_liveness(kafka, settings_factory):
    """Reading the changelog is progress: a member restoring many users is not reported stalled."""
    from tests.conftest import run_until_drained

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
