"""Synthetic traffic out to a file or a topic (`profiles generate`, the demo, load runs)."""

from __future__ import annotations

import random
import threading
import time
from itertools import islice
from typing import Iterable, Iterator

import orjson
from rich.console import Console
from rich.progress import Progress

from consumers.outfiles import Interrupted, OutputFile
from stream.generator import ShopParams, iter_events
from stream.kafka import Publisher, admin_client, ensure_topics
from stream.malformed import MALFORMED_KINDS, malformed
from stream.settings import KafkaSettings
from stream.synthetic_world import DAY_MS


def records(events: Iterable[dict], invalid_fraction: float, seed: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) per event; about `invalid_fraction` of values malformed, every kind in turn."""
    rng = random.Random(seed)
    kinds = list(MALFORMED_KINDS)
    n_bad = 0
    for event in events:
        key = str(event["user_id"]).encode()
        if invalid_fraction and rng.random() < invalid_fraction:
            value, _reason = malformed(event, kinds[n_bad % len(kinds)])
            n_bad += 1
        else:
            value = orjson.dumps(event)
        yield key, value


class EventSpan:
    """The first and last event time of the events passed through `over` (they come in time order)."""

    def __init__(self) -> None:
        self.first_ts: int | None = None
        self.last_ts: int | None = None

    def over(self, events: Iterable[dict]) -> Iterator[dict]:
        for event in events:
            if self.first_ts is None:
                self.first_ts = event["ts"]
            self.last_ts = event["ts"]
            yield event

    @property
    def days(self) -> float:
        return 0.0 if self.first_ts is None else (self.last_ts - self.first_ts) / DAY_MS


def generated_records(users: int, events: int, seed: int, invalid_fraction: float, span_days: float,
                      shop: ShopParams | None, span: EventSpan | None) -> Iterator[tuple[bytes, bytes]]:
    """The records of `profiles generate` (what generate_to_file and generate_to_topic write); `span`, where
    given, is filled with the events' first and last time."""
    stream = iter_events(users, seed, events=events, span_days=span_days, shop=shop)
    return records(stream if span is None else span.over(stream), invalid_fraction, seed)


def generate_to_file(path: str, users: int, events: int, seed: int, invalid_fraction: float,
                     span_days: float, shop: ShopParams | None = None, span: EventSpan | None = None) -> int:
    """Write the records to `path` ('-': standard output), atomically: see OutputFile. `span`: filled with the
    events' first and last time."""
    out = OutputFile(path)
    n = 0
    try:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("generating", total=events)
            for _key, value in generated_records(users, events, seed, invalid_fraction, span_days, shop, span):
                out.write(value + b"\n")  # orjson and the malformed makers never write a newline
                n += 1
                if n % 10000 == 0:
                    bar.update(task, completed=n)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {n:,} records written to {out.keep_partial()} (partial)") from None
    except BaseException:
        out.discard()
        raise
    out.commit()
    return n


def generate_to_topic(kafka: KafkaSettings, topic: str, partitions: int, users: int, events: int, seed: int,
                      invalid_fraction: float, span_days: float, shop: ShopParams | None = None,
                      span: EventSpan | None = None) -> int:
    ensure_topics(admin_client(kafka), {topic: partitions})
    publisher = Publisher(kafka)
    n = 0
    try:
        with Progress(console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(f"producing to {topic}", total=events)
            for key, value in generated_records(users, events, seed, invalid_fraction, span_days, shop, span):
                publisher.produce(topic, key, value)
                n += 1
                if n % 10000 == 0:
                    publisher.poll()
                    bar.update(task, completed=n)
    except KeyboardInterrupt:
        unsent = publisher.flush_briefly()
        raise Interrupted(f"interrupted: {n - unsent:,} of {n:,} records produced to {topic} were sent"
                          + (f" ({unsent:,} dropped)" if unsent else "")) from None
    publisher.flush()
    return n


def produce_paced(publisher: Publisher, topic: str, stream: Iterator[tuple[bytes, bytes]], rate: int,
                  stop: threading.Event) -> int:
    """Produce from `stream` at about `rate` records/s until it ends or `stop` is set."""
    tick = 0.05
    per_tick = max(1, int(rate * tick))
    sent = 0
    next_at = time.monotonic()
    while not stop.is_set():
        chunk = list(islice(stream, per_tick))
        if not chunk:
            break
        for key, value in chunk:
            publisher.produce(topic, key, value)
        sent += len(chunk)
        publisher.poll()
        next_at += tick
        stop.wait(max(0.0, next_at - time.monotonic()))
    publisher.flush()
    return sent


def offer_at_rate(kafka: KafkaSettings, topic: str, recs: list[tuple[bytes, bytes]], rate: int,
                  go, seconds_taken) -> None:
    """A load process (`profiles bench`): wait for `go`, produce `recs` at `rate` records/s, and
    report the seconds it took in `seconds_taken` (a shared double). Lives here, away from torch,
    so the process starts quickly."""
    publisher = Publisher(kafka)
    go.wait()
    started = time.perf_counter()
    produce_paced(publisher, topic, iter(recs), rate, threading.Event())
    seconds_taken.value = time.perf_counter() - started


def churning_records(total: int, users: int, active: int, span_days: float, start_ts_ms: int,
                     seed: int) -> Iterator[tuple[bytes, bytes]]:
    """`total` events (key, value) whose event time runs evenly over `span_days`, from users who come and go:
    `users` arrive one after another over the span, each active while among the `active` newest, then never
    seen again (for `profiles bench --soak`: state that must expire to stay flat)."""
    rng = random.Random(seed)
    span_ms = span_days * 86_400_000
    for i in range(total):
        frac = i / total
        user = f"c{int(frac * (users - active)) + rng.randrange(active):08d}"
        roll = rng.random()
        kind = "purchase" if roll < 0.01 else "add_to_cart" if roll < 0.04 else "click"
        event = {"event_id": f"s{seed}-{i}", "user_id": user, "type": kind, "ts": start_ts_ms + int(frac * span_ms),
                 "item_id": f"i{rng.randrange(5000)}", "category": f"cat{rng.randrange(200)}"}
        if kind == "purchase":
            event["price"] = round(rng.uniform(5, 200), 2)
        yield user.encode(), orjson.dumps(event)


def offer_churning(kafka: KafkaSettings, topic: str, rate: int, seconds: float, users: int, active: int,
                   span_days: float, start_ts_ms: int, seed: int, go, sent) -> None:
    """A load process (`profiles bench --soak`): wait for `go`, then produce churning traffic at `rate`
    records/s for `seconds`, counting what it sent in `sent` (a shared integer)."""
    publisher = Publisher(kafka)
    go.wait()
    total = int(rate * seconds)
    stream = churning_records(total, users, active, span_days, start_ts_ms, seed)
    sent.value = produce_paced(publisher, topic, stream, rate, threading.Event())
