"""Prometheus metrics, registered against an injected registry (a fresh one per test)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

_BATCH_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
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
        self.dead_letters = Counter(
            "profiles_dead_letters_published", "Records published to the dead-letter topic", registry=r)
        self.profiles_published = Counter(
            "profiles_profiles_published", "Profiles published to the output topic", registry=r)
        self.batch_events = Histogram(
            "profiles_batch_size_events", "Records per micro-batch", buckets=_BATCH_EVENTS, registry=r)
        self.batch_seconds = Histogram(
            "profiles_batch_duration_seconds", "Micro-batch processing time by stage", ["stage"],
            buckets=_BATCH_SECONDS, registry=r)
        self.commit_failures = Counter(
            "profiles_commit_failures", "Offset commits that failed", registry=r)
        self.users_in_state = Gauge("profiles_users_in_state", "Users held in the state table", registry=r)
        self.state_bytes = Gauge("profiles_state_bytes", "Bytes held by the state table, by device", ["device"],
                                 registry=r)
        self.last_progress = Gauge(
            "profiles_last_progress_timestamp_seconds", "Wall-clock time of the main loop's last iteration",
            registry=r)
        self.model_info = Info("profiles_model", "The serving model", registry=r)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Expose /metrics on address:port (a daemon thread)."""
        start_http_server(port, addr=address, registry=self.registry)
