"""Prometheus metrics (against an injected registry: a fresh one per test) and the health endpoints.

One small HTTP server on the metrics port answers:
  /metrics  Prometheus text format
  /healthz  200 while the main loop made progress within `stall_after_s`, else 503 (liveness)
  /readyz   200 while partitions are assigned, their state restored and the broker reachable, else 503
            with the reason in the body (joining, restoring, standby, input topic missing, broker unreachable)
"""

from __future__ import annotations

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_BATCH_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LAG_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
_BATCH_EVENTS = (1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter(
            "profiles_events_consumed", "Valid events applied to profiles, by input topic and event type",
            ["topic", "type"], registry=r)
        self.invalid_events = Counter(
            "profiles_invalid_events", "Records that broke the event contract, by reason", ["reason"], registry=r)
        self.events_skipped = Counter(
            "profiles_events_skipped", "Valid events not applied again: re-consumed at or below their user's "
            "watermark (replayed), or an event id among the user's recent ones (duplicate)", ["reason"], registry=r)
        for reason in ("replayed", "duplicate"):  # exported as 0 from the start: rate() needs the series
            self.events_skipped.labels(reason)
        self.dead_letters = Counter(
            "profiles_dead_letters_published", "Records published to the dead-letter topic", registry=r)
        self.dead_letter_failures = Counter(
            "profiles_dead_letter_failures", "Dead letters the producer or broker refused (each logged with its "
            "source position, reason, size and SHA-256); the daemon goes on", registry=r)
        self.profiles_published = Counter(
            "profiles_profiles_published", "Profiles published to the output topic", registry=r)
        self.batch_events = Histogram(
            "profiles_batch_size_events", "Records per micro-batch", buckets=_BATCH_EVENTS, registry=r)
        self.batch_seconds = Histogram(
            "profiles_batch_duration_seconds", "Micro-batch processing time by stage", ["stage"],
            buckets=_BATCH_SECONDS, registry=r)
        self.event_time_lag = Histogram(
            "profiles_event_time_lag_seconds", "Wall-clock time minus event time, per applied event (sampled per batch)",
            buckets=_LAG_SECONDS, registry=r)
        self.consumer_lag = Gauge(
            "profiles_consumer_lag_records", "Records between the committed position and the partition's end "
            "(librdkafka statistics)", ["topic", "partition"], registry=r)
        self.commit_failures = Counter(
            "profiles_commit_failures", "Offset commits that failed", registry=r)
        self.transaction_failures = Counter(
            "profiles_transaction_failures", "Kafka transactions that failed to commit (exactly-once mode)", registry=r)
        self.users_forgotten = Counter(
            "profiles_users_forgotten", "Users erased by forget records: those with state or events to erase (a forget of a user "
            "this member never held writes its tombstones but is not counted)",
            registry=r)
        self.users_expired = Counter(
            "profiles_users_expired", "Users dropped from state after --state-ttl of event time without an event "
            "(each with a changelog tombstone; a user who comes back starts afresh)", registry=r)
        self.records_repartitioned = Counter(
            "profiles_records_repartitioned", "Input records forwarded to the repartition topic, keyed by user id "
            "(--repartition)", registry=r)
        self.users_in_state = Gauge("profiles_users_in_state", "Users held in the state table", registry=r)
        self.state_bytes = Gauge("profiles_state_bytes", "Bytes held by the state table, by device", ["device"],
                                 registry=r)
        self.device_memory = Gauge(
            "profiles_device_memory_bytes", "Memory the process holds on its compute device (CUDA: allocated by "
            "torch; CPU: resident set size)", ["device"], registry=r)
        self.restore_seconds = Gauge(
            "profiles_restore_duration_seconds", "How long the last state restore took", registry=r)
        self.assigned_partitions = Gauge(
            "profiles_assigned_partitions", "Input partitions this instance owns", registry=r)
        self.ready = Gauge("profiles_ready", "1 while partitions are assigned and restored and the broker reachable "
                           "(as /readyz)", registry=r)
        self.last_progress = Gauge(
            "profiles_last_progress_timestamp_seconds", "Wall-clock time of the main loop's last iteration",
            registry=r)
        self.model_info = Info("profiles_model", "The serving model", registry=r)
        # What the daemon has learned of the shop from its traffic, which moves the published fields.
        self.habit_evidence = Gauge(
            "profiles_shop_habit_evidence", "How the users whose latest span (a week, or two days) closed in the last "
            "4 came back: spans where only their latest category came again, less those where only their most "
            "engaged-with one did, over all those spans and 50 (-1 to 1; stream/habit.py)", ["span"], registry=r)
        self.top_categories_lean = Gauge(
            "profiles_top_categories_lean", "How far top_categories leans, from the shop's habit, toward the users' "
            "latest categories or toward their most engaged-with ones, beyond what the model learned (0 to 1)",
            ["toward"], registry=r)
        self.stream_calibration_map = Gauge(
            "profiles_stream_calibration_map", "The map the shop's own outcomes fit for each published probability, "
            "sigmoid(a + b * logit(p) + weights . statistics): its a and b (0 and 1 where the model's own "
            "probabilities are kept), drift, the part of a that follows how the shop moved since the anchor the map "
            "was fitted on, level_shift, the shift of its logit toward the model's level where the shop's purchase "
            "rate moves week to week (0 where it does not), and a weight per statistic of stream/anchor_samples.py "
            "(0 where none is fitted), for "
            "churn_risk also the weights of log idle minutes past each quartile of the sampled users' "
            "(log_idle_minutes_past_q1..q3: its bend in idle time, 0 where straight) "
            "(models/stream_calibration.py); for top_categories, the weight of each slot statistic its candidates are "
            "re-ranked by (0 where they are not) and `gain`, the precision@3 by which each week's previous weights "
            "beat the model's ranking on its sampled users, over the latest two weeks (until a second week has "
            "closed, the first week's, cross-validated on its own users) (models/category_calibration.py)",
            ["field", "term"], registry=r)
        self.stream_calibration_users = Gauge(
            "profiles_stream_calibration_users", "Users of the latest matured calibration anchor each map was fitted "
            "on (0: none matured yet, or --no-stream-calibration)", ["field"], registry=r)


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def consumer_lag(stats: str | dict) -> dict[tuple[str, int], int]:
    """(topic, partition) -> records behind, from a librdkafka statistics report (assigned partitions only)."""
    import orjson

    lag = {}
    report = orjson.loads(stats) if isinstance(stats, str) else stats
    for topic, t in report.get("topics", {}).items():
        for part, p in t.get("partitions", {}).items():
            behind = p.get("consumer_lag", -1)
            if int(part) >= 0 and behind >= 0 and p.get("fetch_state") not in ("none", "stopped"):
                lag[topic, int(part)] = behind
    return lag


def brokers_up(stats: dict) -> bool | None:
    """Whether a librdkafka statistics report shows a connection to any broker up (None: no brokers listed)."""
    brokers = stats.get("brokers") or {}
    if not brokers:
        return None
    return any(b.get("state") == "UP" for b in brokers.values())


class Health:
    """Liveness and readiness, as the main loop and the Kafka clients report them. `clock` is injectable
    for tests. Readiness is evaluated when asked, so it turns false while the broker has been unreachable
    for over `unreachable_after_s` (the session timeout) even when the main loop is blocked, e.g. in a
    flush that waits for the broker."""

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic,
                 unreachable_after_s: float = 45.0) -> None:
        self.stall_after_s = stall_after_s
        self.clock = clock
        self.unreachable_after_s = unreachable_after_s
        self._last_progress = clock()
        self._ready = threading.Event()
        self._why = "starting: not in the consumer group yet"
        self._down_since: float | None = None

    def progressed(self) -> None:
        self._last_progress = self.clock()

    def set_ready(self, ready: bool, why: str = "") -> None:
        """Ready, or not and why (one line for /readyz)."""
        self._why = "" if ready else (why or "partitions not assigned or restoring")
        (self._ready.set if ready else self._ready.clear)()

    def broker_down(self) -> None:
        """A client found every broker connection down (kept from the first report until broker_up)."""
        if self._down_since is None:
            self._down_since = self.clock()

    def broker_up(self) -> None:
        self._down_since = None

    def unreachable_for(self) -> float:
        """Seconds since the broker was last found unreachable without having come back (0: reachable)."""
        since = self._down_since
        return 0.0 if since is None else self.clock() - since

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not)."""
        down = self.unreachable_for()
        if down > self.unreachable_after_s:
            return False, (f"broker unreachable for {down:.0f}s (over the {self.unreachable_after_s:g}s session "
                           "timeout)")
        if self._ready.is_set():
            return True, ""
        return False, self._why

    @property
    def ready(self) -> bool:
        return self.readiness()[0]

    @property
    def healthy(self) -> bool:
        return self.clock() - self._last_progress <= self.stall_after_s


def serve(metrics: Metrics, health: Health, port: int, address: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics, /healthz and /readyz on address:port from a daemon thread; returns the server."""
    registry = metrics.registry

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok = health.healthy
                self._send(200 if ok else 503, b"ok\n" if ok else b"main loop stalled\n")
            elif path == "/readyz":
                ok, why = health.readiness()
                self._send(200 if ok else 503, b"ready\n" if ok else f"not ready: {why}\n".encode())
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # probes every few seconds: keep logs quiet
            return None

    server = ThreadingHTTPServer((address, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
