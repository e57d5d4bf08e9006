"""What tests share besides fixtures: records and batches built one way, the broker helpers (topics,
produce, read back, committed offsets), the daemon as a process, and the oracle for counters and spend.
Tests import from here, never from one another (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from stream.events import RecordBatch
from stream.kafka import TopicError, admin_client, end_offsets, ensure_topics
from stream.settings import KafkaSettings, Settings

# The embedded broker's group join waits for the session timeout: keep it short in tests.
SESSION_TIMEOUT_MS = 6000

# The device the model and pipeline tests run their models and state on: "cpu", or "cuda" with
# `pytest --device cuda` (conftest.py sets it before the test modules are imported).
DEVICE = "cpu"
# The model state is stored as float16 between batches (the default --state-dtype): two batchings of the same events
# round it at other moments, so their states and embeddings agree within a few of float16's steps (4.9e-4 between
# 0.5 and 1), where float32 states agreed within 1e-5. Counters stay exact, and the tests compare them exactly.
STATE_ATOL = 2e-3
# Settings for an updater driven batch by batch, without a broker.
EVENTS = Settings(device=DEVICE, input_topics=("events",))


def use_device(name: str) -> None:
    """Run the tests' models and state on `name` (pytest --device)."""
    global DEVICE, EVENTS
    DEVICE, EVENTS = name, Settings(device=name, input_topics=("events",))


# ----------------------------------------------------------------------------- records and batches

def record_batch(records: Sequence[dict | bytes | None], *, topic: str = "events", partition: int = 0,
                 first_offset: int = 0, keys: str | bytes | Sequence[bytes | None] | None = "user",
                 offsets: Sequence[int] | None = None, partitions: Sequence[int] | None = None) -> RecordBatch:
    """A RecordBatch of events (dicts, serialised as JSON) and raw records (bytes, or None for an empty
    value), at consecutive offsets from `first_offset` of one topic-partition unless `offsets` and
    `partitions` say otherwise. keys: "user" (the record's user id, None where it names none), None,
    one key for every record, or one per record."""
    values = [orjson.dumps(r) if isinstance(r, dict) else r for r in records]
    if keys == "user":
        keys = [_user_key(v) for v in values]
    return RecordBatch.of(values, topic=topic, partition=partition if partitions is None else partitions,
                          offsets=offsets, first_offset=first_offset, keys=keys)


def _user_key(value: bytes | None) -> bytes | None:
    try:
        user = orjson.loads(value).get("user_id") if value else None
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return None if user is None else str(user).encode()


def updater_fed(events: Sequence[dict], sizes: Sequence[int], loaded=None, **options):
    """A ProfileUpdater on DEVICE (an untrained model unless `loaded`) that has processed `events` in batches of
    `sizes`, taken in turn; options go to ProfileUpdater (e.g. state_ttl_ms)."""
    import torch  # here, not at the top: most tests that import helpers never run a model

    from models.checkpoint_io import untrained
    from models.update_step import ProfileUpdater

    updater = ProfileUpdater(loaded or untrained(), torch.device(DEVICE), max_event_bytes=65536,
                             emit_embedding=False, **options)
    a, i = 0, 0
    while a < len(events):
        b = a + sizes[i % len(sizes)]
        updater.process(record_batch(events[a:b], topic="t", first_offset=a, keys=None))
        a, i = b, i + 1
    return updater


def jsonl(events: Iterable[dict]) -> bytes:
    """Events as JSON lines, the way a log file holds them."""
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def as_older_checkpoint(path: Path, out: Path, fmt: int, drop: tuple[str, ...] = ()) -> Path:
    """The checkpoint at `path` written to `out` as format `fmt` wrote it: without the state entries whose
    names start with `drop` (what that format did not have yet)."""
    import torch  # here, not at the top: most tests that import helpers never load a checkpoint

    payload = torch.load(path, weights_only=True)
    payload["format"] = fmt
    for key in [k for k in payload["state_dict"] if k.startswith(drop)]:
        del payload["state_dict"][key]
    torch.save(payload, out)
    return out


# ----------------------------------------------------------------------------- the daemon as a process

def profiles_command() -> list[str]:
    """The installed `profiles` script (or `python -m consumers.cli` where it is not installed)."""
    script = Path(sys.executable).with_name("profiles")
    return [str(script)] if script.exists() else [sys.executable, "-m", "consumers.cli"]


def replayed_log(settings: Settings, log: Path, name: str, batch_records: int) -> tuple[dict[str, dict], dict]:
    """`profiles replay` of one JSON-lines log with `settings`: each user's final profile by user id, and the
    state snapshot the replay writes (its files named after `name`, beside the log)."""
    from consumers.replay import replay
    from stream.snapshot_files import read_snapshot

    out, state_out = log.with_name(f"{name}.jsonl"), log.with_name(f"state-{name}")
    dead_letters = log.with_name(f"dlq-{name}.jsonl")
    replay(settings, [str(log)], "jsonl", str(out), None, False, str(state_out), str(dead_letters), batch_records,
           show_progress=False)
    profiles = {p["user_id"]: p for p in map(orjson.loads, out.read_bytes().splitlines())}
    return profiles, read_snapshot(state_out)[0]


def start_daemon(kafka: KafkaSettings, *args: str) -> subprocess.Popen:
    """`profiles run --untrained` on the tests' device against `kafka`, with the tests' short session timeout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = profiles_command() + ["run", "--untrained", "--bootstrap-servers", kafka.bootstrap_servers, "--device", DEVICE,
                                "--session-timeout-ms", str(SESSION_TIMEOUT_MS), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def published(kafka: KafkaSettings, topic: str) -> int:
    """Records in `topic` so far (0 before the daemon has created it)."""
    try:
        return sum(end_offsets(kafka, topic).values())
    except TopicError:  # the daemon has not created it yet
        return 0


# ----------------------------------------------------------------------------- the broker

def create_topics(kafka: KafkaSettings, partitions: dict[str, int]) -> None:
    ensure_topics(admin_client(kafka), partitions)


def produce(kafka: KafkaSettings, topic: str, records: Iterable[tuple[bytes | None, bytes | None]]) -> None:
    producer = Producer(kafka.client_config(**{"linger.ms": 5, "enable.idempotence": True}))
    failures: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for key, value in records:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0
    assert not failures, failures[:3]


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def read_topic(kafka: KafkaSettings, topic: str, timeout_s: float = 60.0) -> list[Record]:
    """Every record currently in `topic`, per partition in offset order: uncommitted too, so that a
    transaction left open by a killed daemon (never aborted on Tansu) does not hold the reader back."""
    ends = end_offsets(kafka, topic)
    consumer = Consumer(kafka.client_config(**{"group.id": "reader-" + uuid.uuid4().hex[:6],
                                               "enable.auto.commit": False, "isolation.level": "read_uncommitted"}))
    consumer.assign([TopicPartition(topic, p, 0) for p in ends])
    out: list[Record] = []
    position = {p: 0 for p in ends}
    deadline = time.monotonic() + timeout_s
    try:
        while any(position[p] < ends[p] for p in ends):
            assert time.monotonic() < deadline, f"reading {topic} timed out at {position} of {ends}"
            messages = consumer.consume(10000, 0.5)
            for m in messages:
                if m.error() is None:
                    out.append(Record(m.partition(), m.offset(), m.key(), m.value(), dict(m.headers() or [])))
                    position[m.partition()] = m.offset() + 1
            if not messages:  # transaction markers are never delivered: ask where the consumer stands
                for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                    position[tp.partition] = max(position[tp.partition], tp.offset)
    finally:
        consumer.close()
    out.sort(key=lambda r: (r.partition, r.offset))
    return out


def latest_profiles(kafka: KafkaSettings, topic: str) -> tuple[dict[str, dict], int]:
    """(user -> latest profile, total profile records) from an output topic; a tombstone removes the user."""
    latest: dict[str, dict] = {}
    records = read_topic(kafka, topic)
    for r in records:  # per partition in offset order; a user lives in one partition
        if r.value is None:
            latest.pop(r.key.decode(), None)
        else:
            latest[r.key.decode()] = orjson.loads(r.value)
    return latest, len(records)


def committed_offsets(kafka: KafkaSettings, group: str, topic: str) -> dict[int, int]:
    # read_uncommitted: no "require stable" offset fetch, which a dead producer's open transaction would block.
    consumer = Consumer(kafka.client_config(**{"group.id": group, "enable.auto.commit": False,
                                               "isolation.level": "read_uncommitted"}))
    try:
        parts = end_offsets(kafka, topic)
        got = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in got}
    finally:
        consumer.close()


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.2) -> None:
    """Poll `condition` until true, failing with `what` after the deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(interval_s)  # polling another process/broker: there is no event to wait on


def run_until_drained(settings: Settings, timeout_s: float = 120.0):
    """Run the daemon in a thread until its group's committed offsets reach the input's end; return it."""
    return run_members_until_drained([settings], timeout_s)[0]


def run_members_until_drained(members: list[Settings], timeout_s: float = 120.0) -> list:
    """Run one daemon per settings (members of one group), each in a thread, until the group's committed
    offsets reach the input's end and, with more than one member, every member owns partitions; stop
    them all; return the daemons (each with `assigned_when_drained`: its (topic, partition)s then)."""
    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.metrics import Metrics

    stop = threading.Event()
    daemons = [ProfileDaemon(settings, load_updater(settings), Metrics(), stop) for settings in members]
    errors: list[BaseException] = []

    def target(daemon) -> None:
        try:
            daemon.run()
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=target, args=(d,), daemon=True) for d in daemons]
    for thread in threads:
        thread.start()
    settings = members[0]
    ends = {t: end_offsets(settings.kafka, t) for t in settings.input_topics}

    def drained() -> bool:
        if errors:
            return True
        if len(daemons) > 1 and not all(d.source.assigned for d in daemons):
            return False
        assignments = [set(d.source.assigned) for d in daemons]
        if not all(committed_offsets(settings.kafka, settings.group_id, t) == ends[t] for t in ends):
            return False
        if settings.repartition and not forwarded_all_applied(settings):
            return False
        for daemon, assigned in zip(daemons, assignments):  # stopping revokes them all
            daemon.assigned_when_drained = assigned
        return True

    try:
        wait_until(drained, timeout_s, f"group {settings.group_id} to commit {ends}", interval_s=0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), "daemon did not stop"
    return daemons


def forwarded_all_applied(settings: Settings) -> bool:
    """--repartition: the group has committed past the last record on every partition of the repartition
    topic (its end offsets may count transaction markers, which committed offsets stop before)."""
    last = {r.partition: r.offset for r in read_topic(settings.kafka, settings.repartition_topic)}
    committed = committed_offsets(settings.kafka, settings.group_id, settings.repartition_topic)
    return all(committed.get(p, 0) > offset for p, offset in last.items())


def expected_from_events(events: Iterable[dict]) -> dict[str, dict]:
    """Exact counters and spend per user, computed the obvious way (the oracle for the pipeline)."""
    out: dict[str, dict] = defaultdict(lambda: {"counts": defaultdict(int), "spend_micros": 0, "last_ts": -1})
    for e in events:
        user = out[str(e["user_id"])]
        user["counts"][e["type"]] += 1
        if e["type"] == "purchase" and e.get("price") is not None:
            user["spend_micros"] += round(e["price"] * e.get("quantity", 1) * 1_000_000)
        user["last_ts"] = max(user["last_ts"], e["ts"])
    return out


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path, error statuses included."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
