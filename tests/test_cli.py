"""The `profiles` command line, in-process (click's runner)."""

from __future__ import annotations

import gzip
import re

import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from stream.events import RecordBatch, decode_batch
from tests.conftest import read_topic


def test_help_shows_every_run_option_with_its_environment_variable():
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag, env in [("--bootstrap-servers", "KAFKA_BOOTSTRAP_SERVERS"), ("--input-topics", "PROFILES_INPUT_TOPICS"),
                      ("--output-topic", "PROFILES_OUTPUT_TOPIC"), ("--dlq-topic", "PROFILES_DLQ_TOPIC"),
                      ("--group-id", "PROFILES_GROUP_ID"), ("--model", "PROFILES_MODEL"),
                      ("--device", "PROFILES_DEVICE"), ("--batch-max-events", "PROFILES_BATCH_MAX_EVENTS"),
                      ("--batch-max-ms", "PROFILES_BATCH_MAX_MS"), ("--max-event-bytes", "PROFILES_MAX_EVENT_BYTES"),
                      ("--no-embedding", "PROFILES_NO_EMBEDDING"), ("--metrics-port", "PROFILES_METRICS_PORT"),
                      ("--kafka-config", "PROFILES_KAFKA_CONFIG")]:
        assert flag in result.output and env in result.output, flag


def _every_command(group=main, path=()):
    for name, command in sorted(group.commands.items()):
        yield path + (name,)
        if hasattr(command, "commands"):
            yield from _every_command(command, path + (name,))


@pytest.mark.parametrize("width", [100, 80])
def test_every_help_fits_the_terminal_and_is_never_cut_at_a_hyphen(width):
    """Issue 18: at 100 (and 80) columns, the command list shows whole sentences (no "..."), and no
    line is wider than the terminal or ends inside a hyphenated word (`--from-` / `beginning`)."""
    result = CliRunner().invoke(main, ["--help"], terminal_width=width)
    assert result.exit_code == 0
    listed = result.output.split("Commands:")[1].splitlines()[1:]
    assert len(listed) == len(main.commands) and not any(line.endswith("...") for line in listed), listed
    for command in _every_command():
        result = CliRunner().invoke(main, [*command, "--help"], terminal_width=width)
        assert result.exit_code == 0, command
        for line in result.output.splitlines():
            assert len(line) <= width, (command, line)
            assert not re.search(r"\w-$", line), (command, line)
        assert "\u2011" not in result.output  # the wrapping's non-breaking hyphens are given back as "-"


def test_generate_to_a_gzip_file_with_malformed_records(tmp_path):
    out = tmp_path / "events.jsonl.gz"
    result = CliRunner().invoke(main, ["generate", "--users", "50", "--events", "2000", "--seed", "3",
                                       "--invalid-fraction", "0.05", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = gzip.open(out).read().splitlines()
    assert len(lines) == 2000
    n = len(lines)
    cols, dead = decode_batch(RecordBatch(["f"] * n, [0] * n, list(range(n)), [None] * n, lines), 65536)
    assert len(cols) + len(dead) == 2000
    assert 40 <= len(dead) <= 160 and len({d.reason for d in dead}) == 8


def test_generate_to_a_topic(kafka, unique):
    topic = unique("generated")
    result = CliRunner().invoke(main, ["generate", "--users", "20", "--events", "500", "--topic", topic,
                                       "--bootstrap-servers", kafka.bootstrap_servers, "--partitions", "2"])
    assert result.exit_code == 0, result.output
    records = read_topic(kafka, topic)
    assert len(records) == 500 and {r.partition for r in records} == {0, 1}
    for r in records:  # keyed by user id, so a user's events stay in one partition, in order
        assert str(orjson.loads(r.value)["user_id"]) == r.key.decode()


def test_generate_needs_exactly_one_destination():
    result = CliRunner().invoke(main, ["generate", "--users", "5", "--events", "5"])
    assert result.exit_code == 2 and "exactly one of --out FILE or --topic TOPIC" in result.output


def test_split_by_event_time(tmp_path):
    src = tmp_path / "all.jsonl"
    runner = CliRunner()
    assert runner.invoke(main, ["generate", "--users", "30", "--events", "1000", "--out", str(src)]).exit_code == 0
    with open(src, "ab") as fh:
        fh.write(b"not json\n")  # a bad line is kept, on the training side
    result = runner.invoke(main, ["split", str(src), "--test-fraction", "0.25", "--train-out",
                                  str(tmp_path / "a.jsonl"), "--test-out", str(tmp_path / "b.jsonl")])
    assert result.exit_code == 0, result.output
    train = (tmp_path / "a.jsonl").read_bytes().splitlines()
    test = (tmp_path / "b.jsonl").read_bytes().splitlines()
    assert len(train) + len(test) == 1001 and b"not json" in train
    assert 240 <= len(test) <= 260
    train_ts = [orjson.loads(line)["ts"] for line in train if line != b"not json"]
    assert max(train_ts) < min(orjson.loads(line)["ts"] for line in test)


def test_replay_summary_counts_skipped_duplicates(tmp_path):
    from stream.generator import generate

    events = generate(users=10, events=200, seed=4).events
    log = tmp_path / "log.jsonl"
    log.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events + events[:7]))  # 7 re-sent events
    result = CliRunner().invoke(main, ["replay", str(log), "--out", str(tmp_path / "out.jsonl"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "207 records (200 events, 0 dead letters" in result.output
    assert "7 duplicates skipped" in result.output
