"""`profiles bench`: events per second of the whole pipeline against a plain consumer, on one broker.

Broker mode (the embedded broker unless --bootstrap-servers is given; --kafka-config and
--kafka-config-file apply to every client, so a TLS/SASL cluster can be measured), in one run:
  1. produce N generated events to a fresh topic (not timed);
  2. raw ceiling: a plain confluent-kafka consumer reads and JSON-decodes the N events, nothing else;
  3. pipeline: the daemon (decode, validate, GRU update, profile encode, publish, commit) on the
     same events, from the first batch to the last commit;
  4. offered load (optional): events produced at a fixed rate by another process while the daemon
     runs live, for the batch latency a steady stream sees.
No-broker mode times the in-process model step alone, and the scaling table prefills the state
with 10k / 100k / 1M users to show that the cost per event does not grow with them.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import orjson
import torch
from confluent_kafka import Consumer

from consumers.daemon import ProfileDaemon
from consumers.loadgen import offer_at_rate, records
from models.update_step import ProfileUpdater, load_updater
from stream.broker import EmbeddedBroker
from stream.events import RecordBatch
from stream.decode import decode_batch
from stream.generator import iter_events
from stream.kafka import FETCH_WITHOUT_STALLS, Publisher, StreamError, admin_client, ensure_topics
from stream.metrics import Metrics, resident_bytes
from stream.runtime import tune_garbage_collector
from stream.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)

SCALING_USERS = (10_000, 100_000, 1_000_000)


@dataclass
class BenchReport:
    events: int
    users: int
    device: str
    batch_max_events: int
    guarantee: str = "at-least-once"
    traffic: str = "sessions"
    pipeline_events_per_s: float | None = None
    raw_events_per_s: float | None = None
    ratio: float | None = None
    p50_batch_ms: float | None = None
    p99_batch_ms: float | None = None
    state_bytes: int | None = None
    dead_letters: int | None = None  # of the generated events: 0 unless something is wrong
    profiles_per_event: float | None = None
    offered_events_per_s: int | None = None
    offered_actual_events_per_s: float | None = None
    offered_achieved_events_per_s: float | None = None
    offered_mean_batch_events: float | None = None
    offered_profiles_per_event: float | None = None
    offered_p50_batch_ms: float | None = None
    offered_p99_batch_ms: float | None = None
    model_step_events_per_s: float | None = None
    stage_share: dict[str, float] = field(default_factory=dict)  # share of pipeline batch time per stage
    scaling: list[dict] = field(default_factory=list)

    def table(self) -> str:
        """The report for people: one figure per line, then the scaling table."""
        def line(label: str, value: object, unit: str = "") -> str:
            return f"{label:<34} {value}{unit}"

        out = [line("device", self.device), line("events", f"{self.events:,}"),
               line("users", f"{self.users:,}"), line("batch max events", f"{self.batch_max_events:,}"),
               line("guarantee", self.guarantee), line("traffic", self.traffic)]
        if self.pipeline_events_per_s is not None:
            out += [line("pipeline", f"{self.pipeline_events_per_s:,.0f}", " events/s"),
                    line("raw ceiling (consume + decode)", f"{self.raw_events_per_s:,.0f}", " events/s"),
                    line("ratio", f"{self.ratio:.2f}"),
                    line("batch latency p50 / p99", f"{self.p50_batch_ms:.1f} / {self.p99_batch_ms:.1f}", " ms"),
                    line("state", f"{self.state_bytes / 2**20:,.1f}", " MiB"),
                    line("dead letters, profiles per event", f"{self.dead_letters}, {self.profiles_per_event:.2f}"),
                    line("batch time by stage", ", ".join(f"{k} {v:.0%}" for k, v in self.stage_share.items()))]
        if self.offered_events_per_s:
            out += [line(f"offered {self.offered_events_per_s:,} events/s: sent at",
                         f"{self.offered_actual_events_per_s or 0:,.0f}", " events/s"),
                    line("  processed at", f"{self.offered_achieved_events_per_s:,.0f}", " events/s"),
                    line("  mean batch, profiles per event",
                         f"{self.offered_mean_batch_events:,.0f} events, {self.offered_profiles_per_event:.2f}"),
                    line("  batch latency p50 / p99",
                         f"{self.offered_p50_batch_ms:.1f} / {self.offered_p99_batch_ms:.1f}", " ms")]
        if self.model_step_events_per_s is not None:
            out.append(line("model step (no broker)", f"{self.model_step_events_per_s:,.0f}", " events/s"))
        if self.scaling:
            out += ["", f"{'users in state':>15} {'step events/s':>14} {'us/event':>9} {'+profiles ev/s':>15} "
                        f"{'state MiB':>10} {'RSS B/user':>11}"]
            out += [f"{r['users_in_state']:>15,} {r['step_events_per_s']:>14,.0f} {r['step_us_per_event']:>9.2f} "
                    f"{r['with_profiles_events_per_s']:>15,.0f} {r['state_bytes'] / 2**20:>10,.1f} "
                    f"{r['resident_bytes_per_user']:>11,.0f}" for r in self.scaling]
        return "\n".join(out)

    def as_json(self) -> bytes:
        return orjson.dumps({k: v for k, v in asdict(self).items() if v is not None and v != []})


# Generated traffic spans one day of event time ending now. (The generator's default packs 30 days
# into the log, and the daemon's 24 h idle timer would then re-publish most users many times over,
# which live traffic never makes it do; much shorter spans break its session model.)
SPAN_DAYS = 1.0


TRAFFIC = ("sessions", "scattered")


def generated_records(n: int, users: int, seed: int, start_ts_ms: int | None = None,
                      traffic: str = "sessions") -> list[tuple[bytes, bytes]]:
    """`n` generated events as (key, value) records. traffic "sessions": the generator's users, who act in
    sessions (a batch touches few users, each several times); "scattered": each event given to a user
    drawn at random among `users` (with as many users as events, nearly every event of a batch is a
    different user's: high-cardinality traffic, about one profile per event)."""
    start = start_ts_ms if start_ts_ms is not None else int(time.time() * 1000) - int(SPAN_DAYS * 86_400_000)
    recs = list(records(iter_events(users, seed, events=n, span_days=SPAN_DAYS, start_ts_ms=start),
                        invalid_fraction=0.0, seed=seed))
    if traffic == "scattered":
        return scattered(recs, users, seed)
    if traffic != "sessions":
        raise ValueError(f"traffic must be one of {TRAFFIC}, not {traffic!r}")
    return recs


def scattered(recs: list[tuple[bytes, bytes]], users: int, seed: int) -> list[tuple[bytes, bytes]]:
    """The same events (still in event-time order), each re-keyed to a user drawn uniformly among `users`."""
    drawn = np.random.default_rng(seed).integers(0, users, len(recs)).tolist()
    out = []
    for (_key, value), j in zip(recs, drawn):
        event = orjson.loads(value)
        event["user_id"] = user = f"r{j:08d}"
        out.append((user.encode(), orjson.dumps(event)))
    return out


# ---------------------------------------------------------------- broker mode

@contextmanager
def bench_brokers(kafka: KafkaSettings) -> Iterator[KafkaSettings]:
    """The Kafka to benchmark against: `kafka` as given, or, when it names no bootstrap servers, an
    embedded broker started here (and stopped on leaving), with `kafka`'s client properties kept."""
    if kafka.bootstrap_servers:
        yield kafka
        return
    broker = EmbeddedBroker().start()
    try:
        yield dataclasses.replace(kafka, bootstrap_servers=broker.bootstrap_servers)
    finally:
        broker.stop()


def produce_all(kafka: KafkaSettings, topic: str, recs: list[tuple[bytes, bytes]]) -> None:
    publisher = Publisher(kafka, **{"linger.ms": 20})
    publisher.produce_many(topic, recs)
    publisher.flush()


def raw_ceiling(kafka: KafkaSettings, topic: str, n: int, batch: int, timeout_s: float = 300.0) -> float:
    """Events/s of a plain consumer that consumes and JSON-decodes `n` records and does nothing else."""
    consumer = Consumer(kafka.client_config(FETCH_WITHOUT_STALLS, **{
        "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "session.timeout.ms": 6000}))
    loads, seen, started = orjson.loads, 0, None

    def assigned(_consumer, _partitions) -> None:
        # The clock starts at assignment, not at the first message: librdkafka fetches from then on,
        # and a first consume() call that waits for a full batch would otherwise hide that fetch time.
        nonlocal started
        started = started or time.perf_counter()

    consumer.subscribe([topic], on_assign=assigned)
    deadline = time.monotonic() + timeout_s
    try:
        while seen < n:
            if time.monotonic() > deadline:
                raise StreamError(f"raw consumer read only {seen:,} of {n:,} records in {timeout_s:.0f}s")
            msgs = consumer.consume(batch, 0.5)
            decoded = [loads(m.value()) for m in msgs if m.error() is None]
            seen += len(decoded)
        return n / (time.perf_counter() - started)
    finally:
        consumer.close()


def run_daemon_until(settings: Settings, updater: ProfileUpdater, done: callable, timeout_s: float) -> ProfileDaemon:
    """Run a daemon in a thread until `done(daemon)` is true; return it, stopped."""
    stop = threading.Event()
    daemon = ProfileDaemon(settings, updater, Metrics(), stop)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # noqa: BLE001 (reported below, in the caller's thread)
            errors.append(exc)
            stop.set()

    thread = threading.Thread(target=target, name="bench-daemon", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not done(daemon) and not stop.is_set():
        if time.monotonic() > deadline:
            stop.set()
            thread.join(30)
            raise StreamError(f"the pipeline did not finish within {timeout_s:.0f}s "
                              f"({daemon.stats.records:,} records processed)")
        stop.wait(0.05)
    stop.set()
    thread.join(60)
    if errors:
        raise errors[0]
    return daemon


def run_bench(*, events: int, users: int, batch_max_events: int, device: str, kafka: KafkaSettings,
              partitions: int, offered_rate: int, offered_seconds: float, torch_threads: int, seed: int,
              gru_threads: int = 0, guarantee: str = "at-least-once", traffic: str = "sessions",
              publish_interval_ms: int = 0, state_dtype: str = Settings.state_dtype, say=print) -> BenchReport:
    """Raw ceiling, pipeline and offered load on the brokers of `kafka` (see `bench_brokers`)."""
    run_id = uuid.uuid4().hex[:8]
    topic = f"bench-events-{run_id}"
    settings = Settings(kafka=kafka, input_topics=(topic,), output_topic=f"bench-profiles-{run_id}",
                        group_id=f"bench-pipeline-{run_id}", device=device, torch_threads=torch_threads,
                        gru_threads=gru_threads, batch_max_events=batch_max_events, session_timeout_ms=6000,
                        guarantee=guarantee, publish_interval_ms=publish_interval_ms, state_dtype=state_dtype)
    ensure_topics(admin_client(kafka), {topic: partitions})
    say(f"generating {events:,} events for {users:,} users ({traffic}) ...")
    recs = generated_records(events, users, seed, traffic=traffic)
    say(f"producing them to {topic} on {kafka.bootstrap_servers} ({partitions} partitions) ...")
    produce_all(kafka, topic, recs)

    say("raw ceiling: a plain consumer that consumes and decodes, nothing else ...")
    raw = raw_ceiling(kafka, topic, events, batch_max_events)

    say("pipeline: decode, validate, GRU update, encode, publish, commit ...")
    updater = load_updater(settings, untrained_asked=True)
    daemon = run_daemon_until(settings, updater, lambda d: d.stats.records >= events, timeout_s=600)
    s = daemon.stats
    pipeline = events / (s.last_batch_done_at - s.assigned_at)  # both clocks start at assignment
    ms = np.array(s.batch_seconds) * 1000
    report = BenchReport(events=events, users=len(updater.state), device=str(updater.device),
                         batch_max_events=batch_max_events, guarantee=guarantee, traffic=traffic,
                         pipeline_events_per_s=pipeline,
                         raw_events_per_s=raw, ratio=pipeline / raw,
                         p50_batch_ms=float(np.percentile(ms, 50)), p99_batch_ms=float(np.percentile(ms, 99)),
                         state_bytes=int(sum(updater.state.state_bytes().values())),
                         stage_share=stage_share(daemon.metrics), dead_letters=s.dead_letters,
                         profiles_per_event=s.profiles / max(s.events, 1))
    del daemon, updater  # close their clients while the broker still runs
    if offered_rate:
        offered(report, settings, run_id, users, seed, offered_rate, offered_seconds, partitions, traffic, say)
    return report


def offered(report: BenchReport, settings: Settings, run_id: str, users: int, seed: int, rate: int,
            seconds: float, partitions: int, traffic: str, say) -> None:
    """Batch latency of the live daemon while another process offers `rate` events/s for `seconds`."""
    n = int(rate * seconds)
    topic = f"bench-offered-{run_id}"
    ensure_topics(admin_client(settings.kafka), {topic: partitions})
    live = dataclasses.replace(settings, input_topics=(topic,), group_id=f"bench-offered-{run_id}")
    recs = generated_records(n, users, seed + 1, traffic=traffic)
    say(f"offered load: {rate:,} events/s for {seconds:g} s from another process, daemon live ...")
    updater = load_updater(live, untrained_asked=True)
    # The producer is another process (its own interpreter, not the daemon's GIL), started now so that
    # its start-up is over before `go`: it then offers the records at `rate` for `seconds`.
    ctx = multiprocessing.get_context("spawn")
    go, producer_seconds = ctx.Event(), ctx.Value("d", 0.0)
    producer = ctx.Process(target=offer_at_rate, daemon=True,
                           args=(live.kafka, topic, recs, rate, go, producer_seconds))
    producer.start()

    def started(d: ProfileDaemon) -> bool:  # offer once the daemon owns its partitions
        if d.health.ready:
            go.set()
        return d.stats.records >= n

    daemon = run_daemon_until(live, updater, started, timeout_s=seconds * 10 + 120)
    producer.join(30)
    s = daemon.stats
    ms = np.array(s.batch_seconds) * 1000
    report.offered_events_per_s = rate
    # What the producer really managed: on a small machine it shares the cores with the broker.
    report.offered_actual_events_per_s = n / producer_seconds.value if producer_seconds.value else None
    report.offered_achieved_events_per_s = n / (s.last_batch_done_at - s.first_batch_at)
    report.offered_mean_batch_events = s.records / max(s.batches, 1)
    report.offered_profiles_per_event = s.profiles / max(s.events, 1)
    report.offered_p50_batch_ms = float(np.percentile(ms, 50))
    report.offered_p99_batch_ms = float(np.percentile(ms, 99))


def stage_share(metrics: Metrics) -> dict[str, float]:
    """Share of the batches' total time spent in each stage, from the daemon's own histograms."""
    get = metrics.registry.get_sample_value
    total = get("profiles_batch_duration_seconds_sum", {"stage": "total"}) or 0.0
    stages = ("decode", "model", "encode", "publish", "commit")
    return {s: round((get("profiles_batch_duration_seconds_sum", {"stage": s}) or 0.0) / total, 3)
            for s in stages} if total else {}


# ---------------------------------------------------------------- no-broker mode

@torch.inference_mode()
def model_step(*, events: int, users: int, batch_max_events: int, device: str, torch_threads: int, seed: int,
               gru_threads: int = 0, scaling_users: tuple[int, ...] = SCALING_USERS, traffic: str = "sessions",
               state_dtype: str = Settings.state_dtype, say=print) -> BenchReport:
    """The in-process model step (features, GRU, counters) alone; optionally the scaling table."""
    settings = Settings(device=device, torch_threads=torch_threads, gru_threads=gru_threads, emit_embedding=True,
                        state_dtype=state_dtype)
    say(f"generating {events:,} events for {users:,} users ({traffic}) ...")
    values = [v for _k, v in generated_records(events, users, seed, traffic=traffic)]
    columns, _dead = decode_batch(RecordBatch.of(values, topic="bench"), settings.max_event_bytes)
    updater = load_updater(settings, untrained_asked=True)
    tune_garbage_collector()
    step = _time_steps(updater, columns, batch_max_events)
    report = BenchReport(events=events, users=len(updater.state), device=str(updater.device),
                         batch_max_events=batch_max_events, traffic=traffic,
                         model_step_events_per_s=step["step_events_per_s"],
                         state_bytes=int(sum(updater.state.state_bytes().values())))
    if scaling_users:
        for n_users in scaling_users:
            say(f"scaling: {n_users:,} users in state ...")
            report.scaling.append({"users_in_state": n_users, **_scaled(settings, columns, n_users,
                                                                         batch_max_events, seed)})
    return report


def _time_steps(updater: ProfileUpdater, columns, batch: int) -> dict:
    """Time apply() (the model step) and profiles_for() (heads + encoding) over the events, batch by batch."""
    step = encode = 0.0
    n = len(columns)
    for start in range(0, n, batch):
        part = columns.take(np.arange(start, min(start + batch, n)))
        t0 = time.perf_counter()
        rows = updater.apply(part)
        if updater.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        updater.profiles_for(rows)
        encode += time.perf_counter() - t1
        step += t1 - t0
    return {"step_events_per_s": n / step, "step_us_per_event": step / n * 1e6,
            "with_profiles_events_per_s": n / (step + encode)}


def _scaled(settings: Settings, columns, n_users: int, batch: int, seed: int) -> dict:
    """The same events, their users spread over `n_users` ids already in state; the memory this takes per user
    (resident set growth: the table, the user-id index and the id strings, all in)."""
    updater = load_updater(settings, untrained_asked=True)
    gc.collect()
    before = resident_bytes()
    ids = np.array([f"s{i}" for i in range(n_users)], dtype=object)
    updater.state.rows_for(ids)  # prefill: every user has a row (model state and counters)
    resident = resident_bytes() - before
    rng = np.random.default_rng(seed)
    events = columns.take(np.arange(len(columns)))
    events.user_id = ids[rng.integers(0, n_users, len(columns))]
    updater.apply(events.take(np.arange(min(batch, len(events)))))  # warm-up
    return _time_steps(updater, events, batch) | {
        "state_bytes": int(sum(updater.state.state_bytes().values())), "resident_bytes_per_user": resident / n_users}


# ---------------------------------------------------------------- restore

def restore_time(*, users: int, partitions: int, kafka: KafkaSettings, state_dtype: str = Settings.state_dtype,
                 say=print) -> dict:
    """Seconds to restore `users` users from the state changelog, as a member assigned every partition does,
    on the brokers of `kafka` (see `bench_brokers`); and the CPU seconds this process spent on it (its threads
    and librdkafka's: on a shared machine, what the restore costs rather than what it waited for)."""
    from stream.changelog import Changelog
    from stream.changelog_records import STATE_DTYPE_NAMES
    from stream.state import StateTable

    topic = f"bench-state-{uuid.uuid4().hex[:8]}"
    ensure_topics(admin_client(kafka), {topic: partitions}, compacted=[topic])
    settings = Settings()

    def changelog(state: StateTable, publisher: Publisher) -> Changelog:
        return Changelog(kafka, state, publisher, Metrics(), topic=topic, model_version="bench")

    dtype = STATE_DTYPE_NAMES[state_dtype]
    state = StateTable(64, torch.device("cpu"), watermark_slots=1, dedupe_window=settings.dedupe_window,
                       state_dtype=dtype)
    ids = [f"user-{i:08d}" for i in range(users)]
    rows = state.rows_for(ids)
    state.states[:users] = torch.randn(users, 64)
    state.partition[rows] = rows % partitions
    say(f"writing {users:,} users' state to {topic} ...")
    publisher = Publisher(kafka, **{"linger.ms": 50})
    writer = changelog(state, publisher)
    for start in range(0, users, 100_000):
        writer.write_state(rows[start:start + 100_000])
        publisher.poll()
    publisher.flush()
    record_bytes = state.record_dtype().itemsize
    del state, writer, ids, rows  # the restore has the machine's memory to itself (beside the broker's)
    gc.collect()
    say("restoring ...")
    fresh = StateTable(64, torch.device("cpu"), watermark_slots=1, dedupe_window=settings.dedupe_window,
                       state_dtype=dtype)
    cpu = time.process_time()
    restored = changelog(fresh, publisher).restore(list(range(partitions)))
    cpu = time.process_time() - cpu
    assert restored.users == users, f"restored {restored.users} of {users} users"
    return {"users": users, "restore_seconds": restored.seconds, "read_seconds": restored.read_seconds,
            "load_seconds": restored.seconds - restored.read_seconds, "users_per_s": users / restored.seconds,
            "cpu_seconds": cpu, "record_bytes": record_bytes}
