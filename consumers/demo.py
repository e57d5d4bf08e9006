"""`profiles demo`: embedded broker + synthetic traffic + the daemon + a live view, on one machine."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import orjson
from confluent_kafka import Consumer, TopicPartition
from rich import box
from rich.console import Console, Group, RenderableType
from rich.file_proxy import FileProxy
from rich.live import Live
from rich.table import Table
from rich.text import Text

from consumers.daemon import DaemonStats, ProfileDaemon
from consumers.loadgen import produce_paced, records
from models.update_step import load_updater
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


def compact(value: float) -> str:
    """A number in at most 6 characters: 950, 31.0k, 2.5M (the live view's columns stay narrow)."""
    if abs(value) < 999.5:
        return f"{value:.0f}"
    for unit, scale in (("k", 1e3), ("M", 1e6)):
        if abs(value) / scale < 999.95:
            return f"{value / scale:.1f}{unit}"
    return f"{value / 1e9:.1f}G"


def milliseconds(ms: float) -> str:
    """A latency: 2.6 ms, 53 ms, 2.5 s."""
    if ms >= 999.5:
        return f"{ms / 1000:.1f} s"
    return f"{ms:.1f} ms" if ms < 9.95 else f"{ms:.0f} ms"


@dataclass
class Frame:
    """What one frame of the live view shows, read from the daemon, the producer and the watcher."""

    phase: str  # "waiting" (no partitions assigned yet), "restoring" (state of the assigned ones), "running"
    seconds: float  # since the view started
    events_per_s: float
    stats: DaemonStats
    users: int  # in the daemon's state
    produced: int  # records the demo's producer sent
    partitions: int  # assigned to the daemon
    group_id: str
    profiles: list[dict] = field(default_factory=list)  # latest of the busiest users, from the output topic


TITLE = "latest profiles of the busiest users (from the output topic)"
# The table's fixed lines: stats (up to 3), a blank line, the title, the header and its rule.
_FIXED_LINES = 7


def render(frame: Frame, width: int, height: int | None = None) -> RenderableType:
    """One frame, laid out for a terminal `width` columns wide (100 fits all; 80 drops tier and cluster)
    and `height` lines high (fewer user rows rather than a frame taller than the screen)."""
    if frame.phase == "waiting":
        return Group(
            Text(f"waiting for partitions: the daemon is joining consumer group {frame.group_id} "
                 f"({frame.seconds:.0f} s)", style="bold"),
            Text(f"{compact(frame.produced)} events produced so far wait in the topic"),
        )
    if frame.phase == "restoring":
        return Group(Text(f"restoring the state of {frame.partitions} assigned partition(s) from the changelog "
                          f"({frame.seconds:.0f} s)", style="bold"),
                     Text(f"{compact(frame.produced)} events produced so far wait in the topic"))
    return Group(_stats(frame, width), Text(""), _profiles(frame.profiles, width, height))


def _stats(frame: Frame, width: int) -> Table:
    s = frame.stats
    latencies = np.array(s.batch_seconds) * 1000 if s.batch_seconds else np.zeros(1)
    p50, p99 = (milliseconds(float(np.percentile(latencies, q))) for q in (50, 99))
    per_row = 4 if width >= 92 else 3 if width >= 69 else 2  # a pair is at most 12 + 1 + 7 columns, then 3 apart
    shown = {"events/s": compact(frame.events_per_s), "applied": compact(s.events),
             "dead letters": compact(s.dead_letters), "profiles out": compact(s.profiles),
             "users": compact(frame.users), "produced": compact(frame.produced), "batch p50": p50, "batch p99": p99}
    order = (["events/s", "applied", "dead letters", "batch p50", "profiles out", "users", "produced", "batch p99"]
             if per_row == 4 else
             ["events/s", "applied", "profiles out", "produced", "users", "dead letters", "batch p50", "batch p99"])
    pairs = [(label, shown[label]) for label in order]
    grid = Table.grid(padding=(0, 1))
    for i in range(per_row):
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(justify="right", no_wrap=True, min_width=7)
        if i < per_row - 1:
            grid.add_column(width=1)  # a gap of 3 with the padding
    for first in range(0, len(pairs), per_row):
        row: list[str] = []
        for label, value in pairs[first:first + per_row]:
            row += [label, value, ""]
        grid.add_row(*row[:3 * per_row - 1])
    return grid


# (header, justification, the profile -> text); tier and cluster are left out below 98 columns
# (the full table is 98 wide).
_COLUMNS: list[tuple[str, str, Callable[[dict], str]]] = [
    ("user", "left", lambda p: p["user_id"]),
    ("search", "right", lambda p: compact(p["counts"]["search"])),
    ("click", "right", lambda p: compact(p["counts"]["click"])),
    ("cart", "right", lambda p: compact(p["counts"]["add_to_cart"])),
    ("buy", "right", lambda p: compact(p["counts"]["purchase"])),
    ("spend", "right", lambda p: compact(p["spend"])),
    ("top category", "left", lambda p: p["top_categories"][0]["category"] if p["top_categories"] else "-"),
    ("p(buy)", "right", lambda p: f"{p['purchase_propensity']:.3f}"),
    ("churn", "right", lambda p: f"{p['churn_risk']:.3f}"),
    ("tier", "left", lambda p: p["price_tier"]),
    ("cluster", "right", lambda p: str(p["interest_cluster"])),
]


def _profiles(profiles: list[dict], width: int, height: int | None) -> Table:
    columns = _COLUMNS if width >= 98 else [c for c in _COLUMNS if c[0] not in ("tier", "cluster")]
    # No borders but the rule under the header; columns 2 apart (a space of padding and the separator).
    table = Table(title=TITLE, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  padding=(0, 1, 0, 0))
    for header, justify, _ in columns:
        table.add_column(header, justify=justify, no_wrap=True, overflow="ellipsis",  # type: ignore[arg-type]
                         min_width=len(header))
    rows = profiles if height is None else profiles[:max(1, height - _FIXED_LINES)]
    for p in rows:
        table.add_row(*(cell(p) for _, _, cell in columns))
    if not profiles:
        table.caption = "no profile on the output topic yet"
    return table


class LiveView:
    """Builds the frames of `profiles demo`'s view from a running daemon (its numbers are read from
    another thread: a frame may mix two batches, never a half-updated number)."""

    def __init__(self, daemon: ProfileDaemon, watcher: ProfileWatcher | None, produced: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.daemon = daemon
        self.watcher = watcher
        self.produced = produced
        self.clock = clock
        self.started = clock()
        self.window: list[tuple[float, int]] = [(self.started, 0)]
        self.was_ready = False

    def phase(self) -> str:
        d = self.daemon
        self.was_ready = self.was_ready or d.health.ready or d.stats.first_batch_at is not None
        if self.was_ready:
            return "running"
        return "waiting" if d.stats.assigned_at is None else "restoring"

    def frame(self) -> Frame:
        now, stats = self.clock(), self.daemon.stats
        self.window.append((now, stats.events))
        while len(self.window) > 2 and now - self.window[0][0] > 3.0:  # events/s over the last ~3 s
            self.window.pop(0)
        (t0, e0), (t1, e1) = self.window[0], self.window[-1]
        return Frame(phase=self.phase(), seconds=now - self.started,
                     events_per_s=(e1 - e0) / (t1 - t0) if t1 > t0 else 0.0, stats=stats,
                     users=len(self.daemon.updater.state), produced=self.produced(),
                     partitions=len(self.daemon.source.assigned), group_id=self.daemon.settings.group_id,
                     profiles=self.watcher.watched() if self.watcher is not None else [])


class Counted:
    """An iterator that counts what was taken from it (the producer's progress, read by the view)."""

    def __init__(self, items: Iterator[tuple[bytes, bytes]]) -> None:
        self.items = items
        self.count = 0

    def __iter__(self) -> "Counted":
        return self

    def __next__(self) -> tuple[bytes, bytes]:
        item = next(self.items)
        self.count += 1
        return item


def run_demo(stop: threading.Event, *, duration: float | None, users: int, rate: int, seed: int,
             console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: frames laid out for 100 columns at least
            console = Console(width=max(console.width, 100))
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(broker.bootstrap_servers)
        settings = Settings(kafka=kafka, group_id="profiles-demo", batch_max_ms=250, model_path="demo",
                            # The embedded broker's group join waits for the session timeout: keep it short.
                            session_timeout_ms=6000,
                            # The demo's shop lives days of event time per minute, from a day ago: its events
                            # pass the wall clock within seconds and must not be refused as ahead_of_clock.
                            max_ahead_ms=0)
        ensure_topics(admin_client(kafka), {"events": PARTITIONS, settings.output_topic: PARTITIONS,
                                            settings.dead_letter_topic: PARTITIONS})
        console.print(f"embedded broker on {broker.bootstrap_servers}; producing {rate:,} events/s "
                      f"for {users:,} users (0.5% malformed, to show the dead-letter path)")

        daemon = ProfileDaemon(settings, load_updater(settings), Metrics(), stop)
        stream = Counted(records(iter_events(users, seed, start_ts_ms=int(time.time() * 1000) - 86_400_000,
                                             shop=ShopParams.draw(DEMO_SHOP_SEED)),
                                 invalid_fraction=0.005, seed=seed))
        producer = threading.Thread(target=lambda: produce_paced(Publisher(kafka), "events", stream, rate, stop),
                                    name="demo-producer", daemon=True)
        view = LiveView(daemon, ProfileWatcher(kafka, settings.output_topic), lambda: stream.count)
        done = threading.Event()  # the daemon has stopped: the view's last frame has its final numbers
        with _screen(console) as show:
            shower = threading.Thread(target=_show, args=(view, show, stop, done, duration),
                                      name="demo-view", daemon=True)
            producer.start()
            shower.start()
            try:
                daemon.run()
            finally:
                stop.set()
                done.set()
                shower.join(timeout=5)
                producer.join(timeout=5)
        s = daemon.stats
        summary = (f"demo finished: {s.events:,} events applied, {s.dead_letters:,} dead letters, "
                   f"{s.profiles:,} profiles published, {len(daemon.updater.state):,} users")
    # After the broker has stopped, with every client closed before it: the summary is the last line.
    console.print(summary)


Show = Callable[[Frame, bool], None]  # shows a frame; True for the last one


def _show(view: LiveView, show: Show, stop: threading.Event, done: threading.Event, duration: float | None) -> None:
    """The view's thread: reads the output topic and shows frames (sets `stop` after `duration` seconds)
    until the daemon is `done`, then the last frame, with the numbers of the batch it finished on stopping."""
    watcher = view.watcher
    assert watcher is not None
    try:
        while not done.is_set():
            watcher.poll()  # waits up to 0.1 s for profiles
            if duration is not None and view.clock() - view.started >= duration:
                stop.set()
            show(view.frame(), False)
        watcher.poll()
        show(view.frame(), True)
    finally:
        watcher.close()


@contextlib.contextmanager
def _screen(console: Console) -> Iterator[Show]:
    """A way to show frames. On a terminal: one Live display redrawn in place about 4 times a second,
    sized to the terminal, with the log lines of the daemon (and librdkafka) printed above it rather
    than through it (a line written past Live moves the cursor, and each redraw then left a stale copy
    of the frame behind). Elsewhere: plain snapshots, one every 5 s and one at each change of phase."""
    if not console.is_terminal:
        last: dict[str, object] = {"at": 0.0, "phase": None}

        def snapshot(frame: Frame, final: bool) -> None:
            if final or time.monotonic() - float(last["at"]) >= 5.0 or frame.phase != last["phase"]:  # type: ignore[arg-type]
                console.print(render(frame, console.width))
                last.update(at=time.monotonic(), phase=frame.phase)

        yield snapshot
        return
    with Live(console=console, refresh_per_second=4, transient=False) as live:
        rerouted = [(h, h.stream) for h in logging.getLogger().handlers
                    if isinstance(h, logging.StreamHandler) and _is_terminal(h.stream)]
        for handler, stream in rerouted:
            handler.setStream(FileProxy(live.console, stream))
        last_update = [0.0]

        def update(frame: Frame, final: bool) -> None:
            if final or time.monotonic() - last_update[0] >= 0.25:
                live.update(render(frame, console.width, console.height), refresh=final)
                last_update[0] = time.monotonic()

        try:
            yield update
        finally:
            for handler, stream in rerouted:
                handler.setStream(stream)


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return False
