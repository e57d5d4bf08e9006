"""Shared fixtures: one real Kafka-protocol broker (Tansu) per test session, and factories around it."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from stream.broker import EmbeddedBroker
from stream.kafka import admin_client, ensure_topics
from stream.kafka import end_offsets
from stream.settings import KafkaSettings, Settings

# The embedded broker's group join waits for the session timeout: keep it short in tests.
SESSION_TIMEOUT_MS = 6000


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterable[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as b:
        yield b


class ReplaceableBroker:
    """A broker of its own for one test, which the test can stop and replace by an empty one on the same port."""

    def __init__(self, log_path) -> None:
        self.log_path = log_path
        self.current = EmbeddedBroker(log_path=log_path).start()
        self.port = self.current.port
        self.kafka = KafkaSettings(self.current.bootstrap_servers)

    def stop(self) -> None:
        self.current.stop()

    def start_empty(self) -> None:
        """A new broker (memory storage: no topics, no groups) where the old one listened."""
        self.current = EmbeddedBroker(port=self.port, log_path=self.log_path).start()


@pytest.fixture
def replaceable_broker(tmp_path) -> Iterable[ReplaceableBroker]:
    broker = ReplaceableBroker(tmp_path / "tansu.log")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka(broker: EmbeddedBroker) -> KafkaSettings:
    return KafkaSettings(broker.bootstrap_servers)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique topic/group names, so tests sharing the session broker never see each other's data."""
    suffix = uuid.uuid4().hex[:8]
    return lambda name: f"{name}-{suffix}"


@pytest.fixture
def settings_factory(kafka: KafkaSettings, unique: Callable[[str], str]) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        base = dict(kafka=kafka, input_topics=(unique("events"),), output_topic=unique("profiles"),
                    group_id=unique("group"), batch_max_ms=100, session_timeout_ms=SESSION_TIMEOUT_MS,
                    device="cpu")
        base.update(overrides)
        return Settings(**base)  # type: ignore[arg-type]

    return make


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
