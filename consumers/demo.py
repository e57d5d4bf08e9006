"""`profiles demo`: embedded broker + synthetic traffic + the daemon + a live view, on one machine."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import orjson
from confluent_kafka import Consumer, TopicPartition
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from consumers.daemon import DaemonStats, ProfileDaemon
from consumers.loadgen import produce_paced, records
from consumers.pipeline import load_updater
from stream.broker import EmbeddedBroker
from stream.generator import ShopParams, iter_events
from stream.kafka import Publisher, admin_client, ensure_topics
from stream.metrics import Metrics
from stream.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)

PARTITIONS = 4
# The demo's traffic comes from the structured shop the shipped model (`--model demo`) was trained in
# (with other users: docs/model.md, "Rebuilding the shipped model", has the command).
DEMO_SHOP_SEED = 0
WATCHED_USERS = 6


class ProfileWatcher:
    """Reads the output topic (no consumer group: assign from the start) and keeps each user's latest profile."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.consumer = Consumer(kafka.client_config(**{"group.id": "profiles-demo-view", "enable.auto.commit": False}))
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        self.latest: dict[str, dict] = {}
        self.updates: dict[str, int] = {}

    def poll(self) -> None:
        for msg in self.consumer.consume(10000, 0.1):
            if msg.error() is None:
                profile = orjson.loads(msg.value())
                user = profile["user_id"]
                self.latest[user] = profile
                self.updates[user] = self.updates.get(user, 0) + 1

    def watched(self) -> list[dict]:
        busiest = sorted(self.updates, key=self.updates.get, reverse=True)[:WATCHED_USERS]
        return [self.latest[u] for u in sorted(busiest)]

    def close(self) -> None:
        self.consumer.close()


def render(stats: DaemonStats, users_in_state: int, produced: int, watcher: ProfileWatcher, rate_eps: float) -> Group:
    latencies = np.array(stats.batch_seconds) * 1000 if stats.batch_seconds else np.zeros(1)
    head = Table.grid(padding=(0, 3))
    head.add_row(
        f"[bold]events/s[/] {rate_eps:,.0f}",
        f"[bold]applied[/] {stats.events:,}",
        f"[bold]dead letters[/] {stats.dead_letters:,}",
        f"[bold]profiles out[/] {stats.profiles:,}",
        f"[bold]users[/] {users_in_state:,}",
        f"[bold]batch ms[/] p50 {np.percentile(latencies, 50):.1f} · p99 {np.percentile(latencies, 99):.1f}",
        f"[dim]produced {produced:,}[/]",
    )
    table = Table(title="latest profiles of the busiest users (from the output topic)", expand=True)
    for col in ("user", "search", "click", "cart", "buy", "spend", "top category", "propensity", "churn",
                "tier", "cluster"):
        table.add_column(col, justify="left" if col in ("user", "top category", "tier") else "right")
    for p in watcher.watched():
        c = p["counts"]
        top = p["top_categories"][0]["category"] if p["top_categories"] else "-"
        table.add_row(p["user_id"], str(c["search"]), str(c["click"]), str(c["add_to_cart"]), str(c["purchase"]),
                      f"{p['spend']:.2f}", top, f"{p['purchase_propensity']:.3f}", f"{p['churn_risk']:.3f}",
                      p["price_tier"], str(p["interest_cluster"]))
    return Group(head, table)


def run_demo(stop: threading.Event, *, duration: float | None, users: int, rate: int, seed: int) -> None:
    console = Console()
    if not console.is_terminal:  # piped or logged: room for the whole table
        console = Console(width=max(console.width, 132))
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(broker.bootstrap_servers)
        settings = Settings(kafka=kafka, group_id="profiles-demo", batch_max_ms=250, model_path="demo",
                            # The embedded broker's group join waits for the session timeout: keep it short.
                            session_timeout_ms=6000)
        ensure_topics(admin_client(kafka), {"events": PARTITIONS, settings.output_topic: PARTITIONS,
                                            settings.dead_letter_topic: PARTITIONS})
        console.print(f"embedded broker on {broker.bootstrap_servers}; producing {rate:,} events/s "
                      f"for {users:,} users (0.5% malformed, to show the dead-letter path)")

        daemon = ProfileDaemon(settings, load_updater(settings), Metrics(), stop)
        produced = [0]

        def produce() -> None:
            stream = records(iter_events(users, seed, start_ts_ms=int(time.time() * 1000) - 86_400_000,
                                         shop=ShopParams.draw(DEMO_SHOP_SEED)),
                             invalid_fraction=0.005, seed=seed)
            produced[0] = produce_paced(Publisher(kafka), "events", stream, rate, stop)

        producer = threading.Thread(target=produce, name="demo-producer", daemon=True)
        producer.start()
        view = threading.Thread(target=_view, args=(console, daemon, kafka, settings.output_topic, stop, duration),
                                name="demo-view", daemon=True)
        view.start()
        try:
            daemon.run()
        finally:
            stop.set()
            view.join(timeout=5)
            producer.join(timeout=5)
        s = daemon.stats
        console.print(f"demo finished: {s.events:,} events applied, {s.dead_letters:,} dead letters, "
                      f"{s.profiles:,} profiles published, {len(daemon.updater.state):,} users")


def _view(console: Console, daemon: ProfileDaemon, kafka: KafkaSettings, topic: str, stop: threading.Event,
          duration: float | None) -> None:
    watcher = ProfileWatcher(kafka, topic)
    started = time.monotonic()
    window: list[tuple[float, int]] = [(started, 0)]
    interactive = console.is_terminal
    last_print = 0.0

    def frame() -> Group:
        now = time.monotonic()
        window.append((now, daemon.stats.events))
        while len(window) > 2 and now - window[0][0] > 3.0:  # events/s over the last ~3 s
            window.pop(0)
        (t0, e0), (t1, e1) = window[0], window[-1]
        eps = (e1 - e0) / (t1 - t0) if t1 > t0 else 0.0
        return render(daemon.stats, len(daemon.updater.state), daemon.stats.records, watcher, eps)

    try:
        with Live(frame(), console=console, refresh_per_second=4, transient=False) if interactive else _NoLive() as live:
            while not stop.is_set():
                watcher.poll()
                if duration is not None and time.monotonic() - started >= duration:
                    stop.set()
                if interactive:
                    live.update(frame())
                elif time.monotonic() - last_print >= 5.0:  # plain snapshots when not on a terminal
                    console.print(frame())
                    last_print = time.monotonic()
            watcher.poll()
            if not interactive:
                console.print(frame())
    finally:
        watcher.close()


class _NoLive:
    def __enter__(self) -> "_NoLive":
        return self

    def __exit__(self, *exc: object) -> None:
        return None
