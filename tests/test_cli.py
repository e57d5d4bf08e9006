"""The `profiles` command line, in-process (click's runner)."""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from consumers.commands import live
from consumers.commands.live import run
from stream.settings import KafkaSettings, Settings
from stream.decode import decode_batch
from tests.helpers import read_topic, record_batch


# Every option of `run`: (the value given, the Settings field it sets, what that field then holds).
# {dir} and {file} stand for a directory and a properties file (client.id=from-file) the test makes.
RUN_OPTIONS = {
    "--bootstrap-servers": ("b1:9092,b2:9092", "kafka", KafkaSettings("b1:9092,b2:9092")),
    "--kafka-config": ("client.id=x", "kafka", KafkaSettings("localhost:9092", (("client.id", "x"),))),
    "--kafka-config-file": ("{file}", "kafka", KafkaSettings("localhost:9092", (("client.id", "from-file"),))),
    "--connect-timeout": ("3s", None, 3.0),  # the start-up broker check's, not a Settings field
    "--input-topics": ("a, b", "input_topics", ("a", "b")),
    "--output-topic": ("out", "output_topic", "out"),
    "--dlq-topic": ("dead", "dlq_topic", "dead"),
    "--group-id": ("g1", "group_id", "g1"),
    "--model": ("demo", "model_path", "demo"),
    "--untrained": (None, None, None),  # lets `run` start without --model; every case here gives it
    "--device": ("cpu", "device", "cpu"),
    "--torch-threads": ("3", "torch_threads", 3),
    "--gru-threads": ("2", "gru_threads", 2),
    "--batch-max-events": ("10", "batch_max_events", 10),
    "--batch-max-ms": ("20", "batch_max_ms", 20),
    "--max-event-bytes": ("128", "max_event_bytes", 128),
    "--no-embedding": (None, "emit_embedding", False),
    "--next-items": ("5", "next_items", 5),
    "--no-stream-calibration": (None, "stream_calibration", False),
    "--metrics-port": ("9100", "metrics_port", 9100),
    "--metrics-address": ("127.0.0.1", "metrics_address", "127.0.0.1"),
    "--restore-from": ("{dir}", "restore_from", "{dir}"),
    "--snapshot-start": ("2023-11-14T22:13:20Z", "snapshot_start", "1700000000000"),
    "--idle-rescore-after": ("30m", "idle_rescore_after_ms", 1_800_000),
    "--publish-interval": ("2s", "publish_interval_ms", 2000),
    "--state-ttl": ("400d", "state_ttl_ms", 400 * 86_400_000),
    "--on-expire": ("drop", "on_expire", "drop"),
    "--state-dtype": ("float32", "state_dtype", "float32"),  # float16 by default
    "--session-timeout-ms": ("7000", "session_timeout_ms", 7000),
    "--max-poll-interval-ms": ("60000", "max_poll_interval_ms", 60000),
    "--max-ahead": ("2h", "max_ahead_ms", 7_200_000),
    "--max-categories": ("5000", "max_categories", 5000),
    "--dedupe-window": ("3", "dedupe_window", 3),
    "--state-topic": ("st", "state_topic", "st"),
    "--repartition": (None, "repartition", True),
    "--pseudonymize-key": ("k3y", "pseudonymize_key", "k3y"),
    "--guarantee": ("exactly-once", "guarantee", "exactly-once"),
    "--transactional-id": ("tx-1", "transactional_id", "tx-1"),
}
RUN_PARAMS = {p.opts[0]: p for p in run.params if isinstance(p, click.Option)}


def _run_settings(monkeypatch, args: list[str], env: dict[str, str] | None = None) -> tuple[Settings, float]:
    """The Settings (and broker check timeout) `profiles run ARGS` starts the daemon with; nothing starts."""
    seen: dict[str, object] = {}
    monkeypatch.setattr(live, "check_broker", lambda kafka, timeout: seen.update(timeout=timeout))
    monkeypatch.setattr(live, "install_stop_handlers", lambda stop, grace_s: [])
    monkeypatch.setattr(live, "run_daemon", lambda settings, stop: seen.update(settings=settings))
    result = CliRunner().invoke(main, ["run", "--untrained", *args], env=env)
    assert result.exit_code == 0, result.output
    return seen["settings"], seen["timeout"]


def test_every_run_option_is_covered_here():
    """Generated from the command: an option added to `run` fails here until RUN_OPTIONS says what it sets."""
    assert set(RUN_PARAMS) == set(RUN_OPTIONS)


def test_run_defaults_are_the_settings_defaults(monkeypatch):
    settings, timeout = _run_settings(monkeypatch, [])
    assert settings == Settings() and timeout == 10.0


@pytest.mark.parametrize("flag", sorted(RUN_OPTIONS))
def test_each_run_option_sets_its_settings_field_from_the_flag_and_the_environment(flag, monkeypatch, tmp_path):
    value, field, expected = RUN_OPTIONS[flag]
    (tmp_path / "client.properties").write_text("# mounted\nclient.id = from-file\n")
    places = {"{dir}": str(tmp_path), "{file}": str(tmp_path / "client.properties")}
    value, expected = places.get(value, value), places.get(expected, expected)
    param = RUN_PARAMS[flag]
    base, _ = _run_settings(monkeypatch, [])
    for args, env in [([flag] if value is None else [flag, value], None), ([], {param.envvar: value or "1"})]:
        settings, timeout = _run_settings(monkeypatch, args, env)
        if field is None and flag == "--connect-timeout":
            assert timeout == expected
        for f in dataclasses.fields(Settings):  # the option's field changed, and no other
            want = expected if f.name == field else getattr(base, f.name)
            assert getattr(settings, f.name) == want, (flag, env, f.name)


def test_help_shows_every_run_option_with_its_environment_variable():
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for flag, param in RUN_PARAMS.items():
        assert flag in result.output and param.envvar in result.output, flag
    assert RUN_PARAMS["--bootstrap-servers"].envvar == "KAFKA_BOOTSTRAP_SERVERS"
    assert all(p.envvar == "PROFILES_" + f.lstrip("-").upper().replace("-", "_")
               for f, p in RUN_PARAMS.items() if f != "--bootstrap-servers")


KAFKA_FLAGS = ("--bootstrap-servers", "--kafka-config", "--kafka-config-file", "--connect-timeout")


@pytest.mark.parametrize("command", ["run", "forget", "tail", "get", "replay", "inspect", "generate", "bench", "train",
                                     "calibrate", "evaluate-fields", "evaluate"])
def test_every_command_that_talks_to_kafka_takes_the_same_kafka_options(command):
    """One declaration: the same flags, environment variables, defaults and help (bar what needs the brokers,
    and bench's default: no brokers, for an embedded one)."""
    options = {p.opts[0]: p for p in main.commands[command].params if isinstance(p, click.Option)}
    for flag in KAFKA_FLAGS:
        mine, runs = options[flag], RUN_PARAMS[flag]
        default = None if (command, flag) == ("bench", "--bootstrap-servers") else runs.default
        assert (mine.envvar, mine.default, mine.multiple) == (runs.envvar, default, runs.multiple), (command, flag)
        assert mine.help.startswith(runs.help.split(" Needed")[0].split(" Without")[0]), (command, flag)


@pytest.mark.parametrize("command", ["run", "replay", "inspect", "bench", "train", "evaluate", "evaluate-fields",
                                     "evaluate-synthetic"])
def test_device_is_one_option_everywhere(command):
    device = next(p for p in main.commands[command].params if p.name == "device")
    assert (device.envvar, device.default, device.help) == ("PROFILES_DEVICE", "auto", "auto picks CUDA when present.")


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
    cols, dead = decode_batch(record_batch(lines, topic="f", keys=None), 65536)
    assert len(cols) + len(dead) == 2000
    assert 40 <= len(dead) <= 160 and len({d.reason for d in dead}) == 8


def test_generate_says_how_many_days_the_log_spans_and_when_that_is_not_what_was_asked(tmp_path):
    """A structured shop of one user runs out before --span-days (it goes quiet early), and too few events for the
    users run past it, or end it early in the classic shop, replenishers or not: each is said, with the days the log
    holds; a log within the span is not remarked on (a structured shop's 200 users as well)."""
    def generate(*args: str) -> tuple[str, list[int]]:
        out = tmp_path / "log.jsonl"
        result = CliRunner().invoke(main, ["generate", "--seed", "1", "--out", str(out), *args])
        assert result.exit_code == 0, result.output
        ts = [orjson.loads(line)["ts"] for line in out.read_bytes().splitlines()]
        return " ".join(result.output.split()), ts

    for args, said in ((["--users", "200", "--events", "4000"], None),
                       (["--users", "200", "--events", "4000", "--shop-seed", "3"], None),
                       (["--users", "1", "--events", "100", "--shop-seed", "3"],
                        "ran out after 8.1 of the 30 days asked: in this shop a visit holds many events"),
                       (["--users", "10", "--events", "50"], "past the 30 asked"),
                       (["--users", "1000", "--events", "200"], "too few events per user for more than their first"),
                       (["--users", "1000", "--events", "5000", "--replenish-share", "1"],  # a classic shop still
                        "too few events per user for more than their first")):
        output, ts = generate(*args)
        days = (max(ts) - min(ts)) / 86_400_000
        assert f"{days:.1f} days of event time" in output
        assert ("note:" in output) == (said is not None) and (said is None or said in output)
        assert (said is None) == (0.85 * 30 <= days <= 30 / 0.85)
        assert "after this machine's clock" not in output
    output, ts = generate("--users", "10", "--events", "60", "--span-days", "900")  # runs years past today
    assert "after this machine's clock" in output and max(ts) > time.time() * 1000


@pytest.mark.parametrize("args", [["replay", "none.jsonl", "--out", "p.jsonl"],
                                  ["inspect", "u1", "--events", "none.jsonl"],
                                  ["calibrate", "--out", "x.pt", "--events", "none.jsonl"],
                                  ["evaluate", "--events", "none.jsonl", "--train-events", "none.jsonl"],
                                  ["evaluate-fields", "--events", "none.jsonl"]])
def test_model_demo_is_the_shipped_model_even_beside_a_folder_named_demo(tmp_path, monkeypatch, args):
    """`--model demo` names the shipped model; a folder of that name in the working directory (a checkout, a
    user's own) does not make it "a directory": the command goes on to its next check (here: the missing log)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    result = CliRunner().invoke(main, [*args, "--model", "demo"])
    assert result.exit_code != 0 and "'none.jsonl' does not exist" in result.output, result.output
    result = CliRunner().invoke(main, [*args, "--model", "demo/"])  # a path to that folder is still refused
    assert result.exit_code == 2 and "is a directory" in result.output


def test_generate_with_replenishers_adds_their_rebuys_and_share_0_changes_nothing(tmp_path):
    def log(name: str, *extra: str) -> bytes:
        args = ["generate", "--users", "100", "--events", "6000", "--seed", "4", "--shop-seed", "2", "--span-days",
                "90", "--out", str(tmp_path / name), *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        return (tmp_path / name).read_bytes()

    plain, zero, rhythm = log("a.jsonl"), log("b.jsonl", "--replenish-share", "0"), log("c.jsonl", "--replenish-share",
                                                                                       "0.5")
    assert plain == zero and rhythm != plain
    share = lambda data: sum(b'"purchase"' in line for line in data.splitlines()) / 6000  # noqa: E731
    assert share(rhythm) > share(plain)  # the staples' rebuys come on top of the shop's purchases


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


def test_shell_completion_names_the_commands_and_a_commands_options():
    """What docs/operations.md tells a user to install: click's completion of `profiles`."""
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_PROFILES_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split(" ")) - 1)}
        script = Path(sys.executable).parent / "profiles"  # the console script: completion keys on its name
        out = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
        return [line.split(",", 1)[1] for line in out.splitlines() if "," in line]

    assert {"run", "replay", "evaluate-fields", "tail"} <= set(complete("profiles "))
    assert "--bootstrap-servers" in complete("profiles run --boot")
    assert {"auto", "cpu", "cuda"} <= set(complete("profiles train --device "))


def test_the_cli_offers_exactly_the_formats_the_sources_read():
    from consumers.commands.logs import FORMATS
    from stream.import_formats import FORMATS as IMPORT_FORMATS
    from stream.sources import IMPORT_FORMATS as SOURCE_FORMATS, JSON_FORMATS

    assert FORMATS == [*JSON_FORMATS, *IMPORT_FORMATS]
    assert SOURCE_FORMATS == IMPORT_FORMATS


@pytest.mark.parametrize("command, args, expected", [
    # What `--events logs/*.jsonl` gives: the files after the option's first value are sources too.
    ("train", ["--events", "a.jsonl", "b.jsonl", "--out", "m.pt"], {"event_files": ("a.jsonl", "b.jsonl")}),
    ("calibrate", ["--model", "demo", "--events=a.jsonl", "b.jsonl", "c.jsonl", "--out", "m.pt"],
     {"event_files": ("a.jsonl", "b.jsonl", "c.jsonl"), "model_path": "demo"}),
    ("evaluate-fields", ["--model", "demo", "--events", "a.jsonl", "--events", "b.jsonl", "c.jsonl"],
     {"event_files": ("a.jsonl", "b.jsonl", "c.jsonl")}),
    ("evaluate", ["--model", "demo", "--train-events", "a.jsonl", "b.jsonl", "--events", "c.jsonl", "d.jsonl"],
     {"train_files": ("a.jsonl", "b.jsonl"), "test_files": ("c.jsonl", "d.jsonl")}),
    # inspect's USER given first, the words after --events are sources; given after them, it is the USER.
    ("inspect", ["u1", "--events", "a.jsonl", "b.jsonl"], {"user": "u1", "sources": ("a.jsonl", "b.jsonl")}),
    ("inspect", ["--events", "a.jsonl", "u1"], {"user": "u1", "sources": ("a.jsonl",)}),
    # Only the words right after it: another option's value stays its own.
    ("evaluate-fields", ["--events", "a.jsonl", "--cuts", "3", "--model", "demo"],
     {"event_files": ("a.jsonl",), "spread": 3, "model_path": "demo"}),
])
def test_several_sources_may_follow_one_events_option(command, args, expected):
    params = main.commands[command].make_context(command, list(args)).params
    assert {name: params[name] for name in expected} == expected


def test_a_word_after_a_count_is_not_taken_for_a_source():
    result = CliRunner().invoke(main, ["generate", "--events", "100", "extra", "--out", "x.jsonl"])
    assert result.exit_code == 2 and "unexpected extra argument (extra)" in result.output
