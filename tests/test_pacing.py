"""Batch pacing: a slow batch shrinks the next ones so the member keeps polling within max.poll.interval.ms."""

from __future__ import annotations

from consumers.source import BatchPacer
from tests.helpers import DEVICE


def test_slow_batches_shrink_the_cap_and_cheap_ones_grow_it_back():
    pacer = BatchPacer(max_events=5000, max_poll_interval_s=20.0)  # budget: 5 s per batch
    assert pacer.took(1.0, 5000) == 5000  # within budget: unchanged
    cap = pacer.took(12.0, 5000)  # 2.4 ms/event: 5 s hold ~2083 events, with a margin below that
    assert 1000 < cap < 2083
    assert pacer.took(cap * 0.0024, cap) == cap  # now within budget
    assert pacer.took(0.1, 10) == cap  # a small (not full) batch says nothing about the cost of a full one
    grown = [pacer.took(0.01, pacer.cap) for _ in range(4)]  # the model got fast again
    assert grown[0] == 2 * cap and grown[-1] == 5000


def test_the_cap_never_drops_below_one_event():
    pacer = BatchPacer(max_events=100, max_poll_interval_s=4.0)
    assert pacer.took(1000.0, 100) == 1
    assert pacer.took(1000.0, 1) == 1


def test_a_slow_model_shrinks_the_daemons_batches_and_keeps_its_partitions(kafka, unique, caplog, monkeypatch):
    """A real broker and a model step slowed to 1 ms per event: the first full batch overruns a quarter of
    max.poll.interval.ms, later batches are capped to fit, no partition is lost, every record is committed."""
    import time

    import orjson

    from models.update_step import ProfileUpdater
    from stream.generator import generate
    from stream.settings import Settings
    from tests.helpers import committed_offsets, create_topics, end_offsets, produce, run_until_drained

    log = generate(users=200, events=5000, seed=41).events
    topic = unique("events")
    create_topics(kafka, {topic: 1})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    real_process = ProfileUpdater.process

    def slow_process(self, records, *args, **kwargs):
        # The slowness under test, not a wait for something: a large model on a slow device.
        time.sleep(0.001 * len(records))
        return real_process(self, records, *args, **kwargs)

    monkeypatch.setattr(ProfileUpdater, "process", slow_process)
    settings = Settings(kafka=kafka, input_topics=(topic,), output_topic=unique("profiles"), group_id=unique("group"),
                        device=DEVICE, batch_max_events=2000, batch_max_ms=5000, session_timeout_ms=6000,
                        max_poll_interval_ms=7000)  # a quarter: 1.75 s, less than a full batch's 2 s
    daemon = run_until_drained(settings)
    assert daemon.source.pacer.cap < 2000
    assert daemon.stats.batches >= 4  # unpaced, 5000 records make 3 batches: 2000, 2000, 1000
    assert "batches capped at" in caplog.text
    assert " lost " not in caplog.text and "max.poll.interval.ms: this member left" not in caplog.text
    assert committed_offsets(kafka, settings.group_id, topic) == end_offsets(kafka, topic)
    assert daemon.stats.events == len(log)
