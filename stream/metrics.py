"""Prometheus metrics (against an injected registry: a fresh one per test) and the health endpoints.

One small HTTP server on the metrics port answers:
  /metrics  Prometheus text format
  /healthz  200 while the main loop made progress within `stall_after_s`, else 503 (liveness)
  /readyz   200 once partitions are assigned and state is restored, else 503 (readiness)
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
        self.ready = Gauge("profiles_ready", "1 while partitions are assigned and restored (as /readyz)", registry=r)
        self.last_progress = Gauge(
            "profiles_last_progress_timestamp_seconds", "Wall-clock time of the main loop's last iteration",
            registry=r)
        self.model_info = Info("profiles_model", "The serving model", registry=r)


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def consumer_lag(stats_json: str) -> dict[tuple[str, int], int]:
    """(topic, partition) -> records behind, from a librdkafka statistics report (assigned partitions only)."""
    import orjson

    lag = {}
    for topic, t in orjson.loads(stats_json).get("topics", {}).items():
        for part, p in t.get("partitions", {}).items():
            behind = p.get("consumer_lag", -1)
            if int(part) >= 0 and behind >= 0 and p.get("fetch_state") not in ("none", "stopped"):
                lag[topic, int(part)] = behind
    return lag


class Health:
    """Liveness and readiness, as the main loop reports them. `clock` is injectable for tests."""

    def __init__(self, stall_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_after_s = stall_after_s
        self.clock = clock
        self._last_progress = clock()
        self._ready = threading.Event()

    def progressed(self) -> None:
        self._last_progress = self.clock()

    def set_ready(self, ready: bool) -> None:
        (self._ready.set if ready else self._ready.clear)()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

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
                ok = health.ready
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready: partitions not assigned or restoring\n")
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
