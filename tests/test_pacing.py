"""Batch pacing: a slow batch shrinks the next ones so the member keeps polling within max.poll.interval.ms."""

from __future__ import annotations

from consumers.source import BatchPacer


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
