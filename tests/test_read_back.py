"""Issue 18 item 5, reading profiles back without code: `profiles get` and `profiles tail` against the
real broker, as subprocesses (the way a user runs them)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import orjson
from confluent_kafka import Producer

from consumers.readback import murmur2, partition_for
from tests.helpers import create_topics, produce, read_topic
from tests.helpers import profiles_command


def profile(user: str, version: int) -> bytes:
    return orjson.dumps({"user_id": user, "version": version, "counts": {"click": version}})


def seeded_topic(kafka, unique) -> str:
    """3 partitions: u1 twice (latest version 2), u2 then its tombstone, u3 to u9 once, and filler."""
    topic = unique("profiles")
    create_topics(kafka, {topic: 3})
    records = [(b"u1", profile("u1", 1)), (b"u2", profile("u2", 1))]
    records += [(f"u{i}".encode(), profile(f"u{i}", 1)) for i in range(3, 10)]
    records += [(f"filler{i}".encode(), profile(f"filler{i}", 1)) for i in range(30)]
    records += [(b"u1", profile("u1", 2)), (b"u2", None)]
    produce(kafka, topic, records)
    return topic


def cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(profiles_command() + list(args), capture_output=True, timeout=timeout_s,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(profiles_command() + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)


class Lines:
    """A process's stdout, line by line, with a deadline on each line (select on the pipe: no sleeping)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.fd, self.buffer = proc.stdout.fileno(), b""

    def next(self, deadline: float) -> bytes | None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while b"\n" not in self.buffer:
                if not sel.select(max(0.0, deadline - time.monotonic())):
                    return None
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


def test_partition_for_matches_librdkafka_partitioners(kafka, unique):
    assert murmur2(b"21") - (1 << 32) == -973932308  # Kafka's own murmur2 test vector
    for partitioner in ("consistent_random", "murmur2_random", "fnv1a_random"):
        topic = unique(partitioner.replace("_", "-"))
        create_topics(kafka, {topic: 5})
        producer = Producer(kafka.client_config(partitioner=partitioner))
        for i in range(40):
            producer.produce(topic, b"{}", f"user-{i}".encode())
        assert producer.flush(30) == 0
        placed = {r.key: r.partition for r in read_topic(kafka, topic)}
        assert len(placed) == 40 and len(set(placed.values())) > 1
        assert placed == {k: partition_for(k, 5, partitioner) for k in placed}, partitioner


def test_get_prints_each_users_latest_profile_and_names_the_missing(kafka, unique):
    topic = seeded_topic(kafka, unique)
    result = cli("get", "u1", "u3", "u2", "--topic", topic, "--bootstrap-servers", kafka.bootstrap_servers)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert lines == [orjson.loads(profile("u1", 2)), orjson.loads(profile("u3", 1)),
                     {"user_id": "u2", "erased": True}]
    assert result.stderr == b""

    result = cli("get", "u4", "nobody", "--topic", topic, "--bootstrap-servers", kafka.bootstrap_servers)
    assert result.returncode == 1
    assert [orjson.loads(line) for line in result.stdout.splitlines()] == [orjson.loads(profile("u4", 1))]
    err = result.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "nobody" in err[0] and "u4" not in err[0], err


def test_get_reads_backwards_in_chunks_to_an_early_record(kafka, unique):
    from consumers.readback import get_latest

    topic = unique("profiles")
    create_topics(kafka, {topic: 1})
    produce(kafka, topic, [(b"early", profile("early", 1))] + [(b"busy", profile("busy", i)) for i in range(2500)])
    result = get_latest(kafka, topic, ["early", "busy", "never"], chunk=1000)
    assert result.found == {"early": profile("early", 1), "busy": profile("busy", 2499)}
    assert result.missing == ["never"]
    assert result.records_read == 2501  # 1000, then 1501 (the chunk doubled, cut at the start)


def test_tail_from_beginning_prints_exactly_max_json_lines(kafka, unique):
    topic = seeded_topic(kafka, unique)
    result = cli("tail", "--from-beginning", "--max", "5", "--topic", topic,
                 "--bootstrap-servers", kafka.bootstrap_servers)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    assert all(orjson.loads(line)["user_id"] for line in lines)
    assert result.stderr == b""


def test_tail_from_the_end_prints_only_new_records_and_ctrl_c_exits_130(kafka, unique):
    topic = seeded_topic(kafka, unique)
    proc = start("tail", "--topic", topic, "--bootstrap-servers", kafka.bootstrap_servers)
    lines = Lines(proc)
    try:
        # The tail positions itself at the end some time after it starts: keep publishing new profiles
        # until one comes out; none of the earlier ones may.
        deadline, sent, line = time.monotonic() + 60, 0, None
        while line is None:
            assert time.monotonic() < deadline, "tail printed nothing"
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            sent += 1
            produce(kafka, topic, [(b"fresh", profile("fresh", sent))])
            line = lines.next(time.monotonic() + 1.0)
        first = orjson.loads(line)
        assert first["user_id"] == "fresh" and 1 <= first["version"] <= sent
        # Whatever else it prints is one of the new records, in order.
        produce(kafka, topic, [(b"fresh", None)])
        rest = []
        while not rest or rest[-1].get("erased") is None:
            next_line = lines.next(time.monotonic() + 30)
            assert next_line, f"tail stopped after {rest}"
            rest.append(orjson.loads(next_line))
        assert [r.get("version") for r in rest[:-1]] == list(range(first["version"] + 1, sent + 1))
        assert rest[-1] == {"user_id": "fresh", "erased": True}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert out == b"" and lines.buffer == b""
    err_lines = err.decode().strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("tail: ") and "printed" in err_lines[0], err_lines


def test_unreachable_broker_is_one_line(tmp_path: Path):
    for command in (["get", "u1"], ["tail"]):
        result = cli(*command, "--bootstrap-servers", "127.0.0.1:1", "--connect-timeout", "2s")
        assert result.returncode == 1
        err = result.stderr.decode().strip().splitlines()
        assert len(err) == 1 and "no Kafka broker reachable at 127.0.0.1:1" in err[0], err
