"""Issue 18, the first hour with profiles: Ctrl-C stops cleanly (exit 130, a summary, partial output
kept aside), output files are complete or clearly partial, user mistakes are one-line errors, and an
unreachable broker is one fast error. The Ctrl-C tests send SIGINT to real processes' process groups,
as a terminal does."""

from __future__ import annotations

import gzip
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from models.checkpoint_io import load_checkpoint
from tests.helpers import DEVICE, wait_until
from tests.helpers import profiles_command

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1


def start(args: list[str], cwd: Path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) -> subprocess.Popen:
    """A `profiles` process in its own process group, like a command in a terminal's foreground."""
    return subprocess.Popen(profiles_command() + args, cwd=cwd, stdout=stdout, stderr=stderr,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)


def ctrl_c(proc: subprocess.Popen, timeout_s: float = 30.0) -> tuple[float, str, str]:
    """SIGINT to the whole process group (what Ctrl-C does); (seconds until exit, stdout, stderr)."""
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=timeout_s)
    return time.monotonic() - started, (out or b"").decode(), (err or b"").decode()


def write_events(path: Path, events: int, users: int = 200) -> None:
    result = CliRunner().invoke(main, ["generate", "--users", str(users), "--events", str(events), "--out", str(path)])
    assert result.exit_code == 0, result.output


def temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith((".tmp", ".tmp.gz"))]


def test_ctrl_c_in_demo_stops_the_daemon_before_the_broker(tmp_path):
    proc = start(["demo", "--users", "100", "--rate", "1000"], tmp_path, stdout=open(tmp_path / "out", "wb"))
    wait_until(lambda: b"embedded broker on" in (tmp_path / "out").read_bytes(), 60, "the demo's broker")
    port = int((tmp_path / "out").read_text().split("embedded broker on 127.0.0.1:")[1].split(";")[0])
    wait_until(lambda: b"latest profiles" in (tmp_path / "out").read_bytes(), 60, "the first frame")
    took, _, err = ctrl_c(proc)
    out = (tmp_path / "out").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert took < 10, f"Ctrl-C took {took:.1f}s"
    assert out.strip().splitlines()[-1].startswith("demo finished:")
    assert "did not finish" not in err and err.count("|FAIL|") <= 1, err[-2000:]
    with pytest.raises(OSError):  # the broker is gone too
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_ctrl_c_in_run_commits_and_exits_130(kafka, unique, tmp_path):
    from tests.helpers import create_topics

    topic = unique("events")
    create_topics(kafka, {topic: 1})
    err_path = tmp_path / "err"
    proc = start(["run", "--model", "demo", "--bootstrap-servers", kafka.bootstrap_servers, "--input-topics", topic,
                  "--output-topic", unique("profiles"), "--group-id", unique("group"), "--device", DEVICE,
                  "--session-timeout-ms", "6000"], tmp_path, stderr=open(err_path, "wb"))
    wait_until(lambda: b"consuming" in err_path.read_bytes(), 90, "the daemon to start consuming")
    took, _, _ = ctrl_c(proc)
    err = err_path.read_text()
    # The shipped model: the log says how to make it this shop's, on the daemon's own input topic.
    assert f"profiles calibrate --model demo --events kafka://{topic} --out shop.pt" in err, err[-2000:]
    assert proc.returncode == 130, err[-2000:]
    assert took < 10, f"Ctrl-C took {took:.1f}s"
    assert err.strip().splitlines()[-1].startswith("stopped: 0 events applied"), err[-2000:]


def test_ctrl_c_in_replay_keeps_partial_output_aside_and_the_earlier_file_intact(tmp_path):
    write_events(tmp_path / "events.jsonl", 60_000)
    earlier = b'{"user_id":"from an earlier, complete run"}\n'
    (tmp_path / "p.jsonl").write_bytes(earlier)
    # Every update, in small batches: slow enough to be interrupted midway.
    proc = start(["replay", "events.jsonl", "--out", "p.jsonl", "--every-update", "--batch-events", "50",
                  "--device", DEVICE], tmp_path)
    wait_until(lambda: any(p.stat().st_size > 0 for p in temporaries(tmp_path) if p.name.startswith(".p.jsonl.")),
               90, "the replay to write profiles")
    took, _, err = ctrl_c(proc)
    assert proc.returncode == 130, err[-2000:]
    assert took < 5, f"Ctrl-C took {took:.1f}s"
    assert "Traceback" not in err and "Aborted" not in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("interrupted: ") and "p.jsonl.partial" in summary, summary
    assert (tmp_path / "p.jsonl").read_bytes() == earlier
    partial = (tmp_path / "p.jsonl.partial").read_bytes().splitlines()
    assert partial and all(orjson.loads(line)["user_id"] for line in partial)
    assert not (tmp_path / "p.jsonl.dlq.jsonl.partial").exists()  # no dead letters, no file of them
    assert not temporaries(tmp_path)


def test_ctrl_c_in_generate_keeps_partial_output(tmp_path):
    proc = start(["generate", "--users", "1000", "--events", "50000000", "--out", "big.jsonl"], tmp_path)
    wait_until(lambda: any(p.stat().st_size > 100_000 for p in temporaries(tmp_path)), 60, "records written")
    took, _, err = ctrl_c(proc)
    assert proc.returncode == 130, err[-2000:]
    assert took < 5
    assert err.strip().splitlines()[-1].endswith("records written to big.jsonl.partial (partial)"), err[-500:]
    assert not (tmp_path / "big.jsonl").exists() and not temporaries(tmp_path)
    assert (tmp_path / "big.jsonl.partial").stat().st_size > 100_000


def test_a_failed_replay_leaves_an_earlier_output_untouched(tmp_path):
    write_events(tmp_path / "events.jsonl.gz", 3000)
    data = (tmp_path / "events.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    earlier = b'{"user_id":"earlier"}\n'
    (tmp_path / "p.jsonl").write_bytes(earlier)
    result = CliRunner().invoke(main, ["replay", str(tmp_path / "cut.jsonl.gz"), "--out", str(tmp_path / "p.jsonl"),
                                       "--device", DEVICE])
    assert result.exit_code == 1
    error = result.output.strip().splitlines()[-1]
    assert error.startswith(f"Error: {tmp_path / 'cut.jsonl.gz'}: gzip data broken after line "), error
    assert (tmp_path / "p.jsonl").read_bytes() == earlier
    assert not temporaries(tmp_path) and not (tmp_path / "p.jsonl.partial").exists()


def test_a_snapshot_that_cannot_be_written_leaves_an_earlier_output_untouched(tmp_path, monkeypatch):
    import consumers.replay

    def full_disk(*_args):
        raise OSError(28, "No space left on device")

    write_events(tmp_path / "events.jsonl", 500, users=20)
    earlier = b'{"user_id":"earlier"}\n'
    (tmp_path / "p.jsonl").write_bytes(earlier)
    monkeypatch.setattr(consumers.replay, "write_snapshot", full_disk)
    result = CliRunner().invoke(main, ["replay", str(tmp_path / "events.jsonl"), "--out", str(tmp_path / "p.jsonl"),
                                       "--state-out", str(tmp_path / "snapshots" / "one"), "--device", DEVICE])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert (tmp_path / "p.jsonl").read_bytes() == earlier and not temporaries(tmp_path)


def test_out_dash_is_stdout_and_dead_letters_then_go_to_the_working_directory(tmp_path, monkeypatch):
    write_events(tmp_path / "events.jsonl", 500, users=20)
    with open(tmp_path / "events.jsonl", "ab") as fh:
        fh.write(b"not json\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["replay", "events.jsonl", "--out", "-", "--device", DEVICE])
    assert result.exit_code == 0, result.output
    profiles = [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(profiles) == 20
    assert not (tmp_path / "-").exists()
    assert len((tmp_path / "replay.dlq.jsonl").read_bytes().splitlines()) == 1
    result = CliRunner().invoke(main, ["replay", "events.jsonl", "--out", os.devnull, "--device", DEVICE])
    assert result.exit_code == 0, result.output
    assert "-> replay.dlq.jsonl" in result.output and not os.path.exists(os.devnull + ".dlq.jsonl")


def test_generate_and_split_write_complete_files_or_none(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["generate", "--users", "10", "--events", "300", "--out", "-"])
    assert result.exit_code == 0 and len([x for x in result.stdout.splitlines() if x.startswith("{")]) == 300
    write_events(tmp_path / "all.jsonl.gz", 1000)
    args = ["split", str(tmp_path / "all.jsonl.gz"), "--train-out", str(tmp_path / "a.jsonl.gz"), "--test-out"]
    assert runner.invoke(main, args + [str(tmp_path / "b.jsonl.gz")]).exit_code == 0
    assert len(gzip.open(tmp_path / "a.jsonl.gz").read().splitlines()) + len(
        gzip.open(tmp_path / "b.jsonl.gz").read().splitlines()) == 1000
    result = runner.invoke(main, args + ["/nonexistent/b.jsonl"])
    assert result.exit_code == 1 and "directory /nonexistent does not exist" in result.output
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["replay", "--format", "taobao", "{events}", "--out", "{tmp}/p.jsonl"],
     "not a taobao UserBehavior file"),
    (["replay", "{events}", "--out", "/nonexistent/x"], "cannot write --out /nonexistent/x: directory /nonexistent"),
    (["replay", "{tmp}/missing.jsonl", "--out", "{tmp}/p.jsonl"], "missing.jsonl' does not exist"),
    (["inspect", "u1", "--events", "{cut}"], "gzip data broken after line"),
    (["split", "{cut}", "--train-out", "{tmp}/a", "--test-out", "{tmp}/b"], "gzip data broken after line"),
    # Two outputs that are one file: the dead letters replaced the profiles (exit 0, "200 profiles written").
    (["replay", "{events}", "--out", "{tmp}/p.jsonl", "--dead-letters", "{tmp}/./p.jsonl"],
     "--out and --dead-letters are the same file"),
    # Outputs written after the work, checked before it: a directory that takes no new file (/proc, even for
    # root), a snapshot directory under a file.
    (["replay", "{events}", "--out", "{tmp}/p.jsonl", "--state-out", "{events}/st"], "is not a directory"),
    (["replay", "{events}", "--out", "{tmp}/p.jsonl", "--state-out", "/proc/st"], "cannot write --state-out /proc/st"),
    (["split", "{events}", "--train-out", "/proc/a", "--test-out", "{tmp}/b"], "cannot write --train-out/--test-out"),
    (["evaluate-fields", "--model", "demo", "--events", "{events}", "--plot", "/proc/p.png"],
     "cannot write --plot /proc/p.png"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, message):
    events = tmp_path / "events.jsonl"
    write_events(events, 2000)
    gz = gzip.compress(events.read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    args = [a.format(events=events, tmp=tmp_path, cut=tmp_path / "cut.jsonl.gz") for a in args]
    result = CliRunner().invoke(main, args + (["--device", DEVICE] if args[0] != "split" else []))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "--events", "{events}", "--out", "/nonexistent/m.pt"], "cannot write --out /nonexistent/m.pt"),
    (["calibrate", "--model", "demo", "--events", "{events}", "--out", "/nonexistent/m.pt"],
     "cannot write --out /nonexistent/m.pt"),
    (["calibrate", "--model", "demo", "--events", "{events}", "--until", "soon", "--out", "{tmp}/m.pt"],
     "Invalid value for --until"),
    (["train", "--events", "{events}", "--until", "1700000000", "--out", "{tmp}/m.pt"], "epoch seconds?"),
    (["calibrate", "--model", "{tmp}", "--events", "{events}", "--out", "{tmp}/m.pt"], "is a directory"),
    (["train", "--events", "{events}", "--out", "/proc/m.pt"], "cannot write --out /proc/m.pt"),
    (["calibrate", "--model", "demo", "--events", "{events}", "--out", "/proc/m.pt"], "cannot write --out /proc/m.pt"),
])
def test_train_and_calibrate_refuse_a_mistake_before_any_work(tmp_path, args, message):
    """Minutes of training (seconds of calibration) must not end in an error the arguments already showed:
    the events are not even read ("N events of M users" is the work's first line)."""
    write_events(tmp_path / "events.jsonl", 2000)
    args = [a.format(events=tmp_path / "events.jsonl", tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, args + ["--device", DEVICE])
    assert result.exit_code in (1, 2), result.output
    assert message in result.output and "events of" not in result.output, result.output


def test_train_and_evaluate_fields_refuse_a_log_whose_events_are_all_at_one_time(tmp_path):
    # was exit 0 and "validation loss 0.0000": no event after the validation cut, so the losses were of nothing
    write_events(tmp_path / "events.jsonl", 300, users=20)
    lines = [orjson.loads(line) for line in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    (tmp_path / "one.jsonl").write_bytes(b"".join(orjson.dumps({**e, "ts": lines[0]["ts"]}) + b"\n" for e in lines))
    args = ["--events", str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "m.pt"), "--epochs", "1"]
    result = CliRunner().invoke(main, ["train", *args, "--hidden-size", "4", "--device", DEVICE])
    assert result.exit_code == 1 and "is at " in result.output and "has none" in result.output, result.output
    assert not (tmp_path / "m.pt").exists()
    # evaluate-fields said its default cut "is not inside the log (T .. T)", though no cut was given
    result = CliRunner().invoke(main, ["evaluate-fields", "--model", "demo", "--events", str(tmp_path / "one.jsonl"),
                                       "--device", DEVICE])
    assert result.exit_code == 1 and "has no later events" in result.output, result.output


@pytest.mark.parametrize("args", [
    ["evaluate", "--train-events", "{events}", "--events", "{events}", "--json"],
    ["evaluate-synthetic", "--users", "20", "--events", "400"],
    ["evaluate-fields", "--events", "{events}", "--json"],
])
def test_every_command_that_judges_a_model_takes_the_shipped_one_by_name(tmp_path, args):
    """`--model demo` names the packaged model in every command (evaluate and evaluate-synthetic once refused
    it as a missing file); a missing file is one Error line."""
    write_events(tmp_path / "events.jsonl", 2000)
    args = [a.format(events=tmp_path / "events.jsonl") for a in args]
    result = CliRunner().invoke(main, args + ["--model", "demo", "--device", DEVICE])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output)["model"] == load_checkpoint("demo").version
    missing = CliRunner().invoke(main, args + ["--model", str(tmp_path / "missing.pt"), "--device", DEVICE])
    assert missing.exit_code == 1 and "does not exist" in missing.output, missing.output


def test_evaluate_synthetic_judges_in_the_shop_asked_for_and_says_what_its_truth_is():
    runs = {}
    for shop in (None, 0):
        result = CliRunner().invoke(main, ["evaluate-synthetic", "--model", "demo", "--users", "60", "--events",
                                           "3000", "--device", DEVICE] + ([] if shop is None else ["--shop-seed", "0"]))
        assert result.exit_code == 0, result.output
        runs[shop] = orjson.loads(result.output)
    assert runs[None]["shop_seed"] is None and runs[0]["shop_seed"] == 0
    assert runs[None]["baselines"] != runs[0]["baselines"]  # another world's log, not the classic one again
    assert "evaluate-fields" in runs[0]["note"]


def test_an_unreachable_broker_is_one_line_within_the_connect_timeout(tmp_path):
    started = time.monotonic()
    proc = subprocess.run(profiles_command() + ["run", "--untrained", "--bootstrap-servers", UNREACHABLE, "--connect-timeout", "2s"],
                          capture_output=True, timeout=60, cwd=tmp_path)
    took = time.monotonic() - started
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert [line for line in err.splitlines() if line.strip()] == [err.strip()], err[-2000:]
    assert UNREACHABLE in err and "KAFKA_BOOTSTRAP_SERVERS" in err and "--bootstrap-servers" in err
    assert "%3|" not in err
    assert took < 2 + 20  # the timeout, plus starting Python on a busy machine


@pytest.mark.parametrize("timeout", ["60s", "30d"])
def test_ctrl_c_while_waiting_for_a_broker_exits_at_once(timeout, tmp_path):
    # The wait was one librdkafka call: Ctrl-C was served only when it ended, and 30 days (past its 31-bit
    # milliseconds) ended at once with "no broker reachable within 2.592e+06s".
    err_path = tmp_path / "err"
    proc = start(["--log-level", "debug", "run", "--untrained", "--bootstrap-servers", UNREACHABLE,
                  "--connect-timeout", timeout], tmp_path, stderr=open(err_path, "wb"))
    # the wait under way (a Ctrl-C before it is Python's start-up, not what is tested)
    wait_until(lambda: b"waiting up to" in err_path.read_bytes(), 60, "the broker check to start waiting")
    took, _, _ = ctrl_c(proc)
    err = err_path.read_text()
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert took < 10, f"Ctrl-C took {took:.1f}s"


@pytest.mark.parametrize("args", [
    ["generate", "--topic", "t"], ["inspect", "u1", "--events", "kafka://events"],
    ["replay", "kafka://events", "--out", "p.jsonl"], ["replay", "x.jsonl", "--output-topic", "p"],
    ["forget", "u1"], ["train", "--events", "kafka://events", "--out", "m.pt"],
    ["calibrate", "--model", "demo", "--events", "kafka://events", "--out", "m.pt"],
    ["evaluate-fields", "--model", "demo", "--events", "kafka://events"],
    ["evaluate", "--model", "demo", "--train-events", "kafka://events", "--events", "kafka://events"],
])
def test_every_command_that_talks_to_kafka_checks_the_broker_first(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    started = time.monotonic()
    result = CliRunner().invoke(main, args + ["--bootstrap-servers", UNREACHABLE, "--connect-timeout", "1s"])
    assert result.exit_code == 1, result.output
    assert f"no Kafka broker reachable at {UNREACHABLE} within 1s" in result.output
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("user, problem", [("", "is an empty string"), ("u" * 257, "longer than 256 characters"),
                                           ("\x00meta", "starts with a NUL character")])
def test_forget_refuses_a_user_id_no_event_can_have_before_asking_a_broker(user, problem):
    result = CliRunner().invoke(main, ["forget", "u1", user, "--bootstrap-servers", UNREACHABLE,
                                       "--connect-timeout", "1s"])
    assert result.exit_code == 2 and problem in result.output and "nothing to erase" in result.output
    assert "no Kafka broker reachable" not in result.output


def test_version_and_log_level_after_the_subcommand():
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"profiles {version('profiles')}"
    result = CliRunner().invoke(main, ["generate", "--users", "5", "--events", "5", "--out", "-",
                                       "--log-level", "warning"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["generate", "--log-level=nonsense", "--users", "5", "--out", "-"])
    assert result.exit_code == 2 and "--log-level" in result.output


def test_model_info_reads_a_checkpoint_without_code(tmp_path):
    from models.profile_model import ModelConfig, ProfileModel
    from models.checkpoint_io import save_checkpoint

    path = tmp_path / "m.pt"
    save_checkpoint(path, ProfileModel.fresh(ModelConfig(hidden_size=8, n_items=3)), "gru-h8-test",
                    {"created_at": "2026-01-02T03:04:05+00:00", "events": ["train.jsonl"], "torch": "2.x",
                     "train_config": {"epochs": 4}, "report": {"best_epoch": 3, "best_val_loss": 1.23456}},
                    ["i1", "i2", "i3"])
    result = CliRunner().invoke(main, ["model", "info", str(path)])
    assert result.exit_code == 0, result.output
    assert "gru-h8-test" in result.output
    assert any(line.startswith("next-item vocabulary") and line.endswith(" 3 items")
               for line in result.output.splitlines()), result.output
    assert "train.jsonl" in result.output and "best_val_loss" in result.output and "1.235" in result.output
    info = orjson.loads(CliRunner().invoke(main, ["model", "info", str(path), "--json"]).output)
    assert info["model_version"] == "gru-h8-test" and info["next_item_vocabulary"] == 3
    assert info["config"]["hidden_size"] == 8 and info["report"]["best_epoch"] == 3
    # The state's bytes per user, as a table of the default --state-dtype stores them.
    import torch

    from stream.settings import Settings
    from stream.changelog_records import STATE_DTYPE_NAMES
    from stream.state import StateTable
    from stream.statistics import stat_bytes_per_user
    table = StateTable(info["state_floats_per_user"], torch.device("cpu"),
                       state_dtype=STATE_DTYPE_NAMES[Settings().state_dtype])
    table.rows_for(["a", "b"])
    held = info["state_bytes_per_user"]
    assert held["model_state"] * 2 == table.state_bytes()["cpu"] and held["statistics"] == stat_bytes_per_user() > 0
    assert f"{held['model_state']} bytes of model state (float16) + {held['statistics']} of behaviour" in result.output
    shipped = CliRunner().invoke(main, ["model", "info", "demo"])  # the packaged model, as --model demo names it
    assert shipped.exit_code == 0 and "checkpoints/demo.pt (format" in shipped.output, shipped.output
    missing = CliRunner().invoke(main, ["model", "info", str(tmp_path / "missing.pt")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
    (tmp_path / "not.pt").write_bytes(b"nope")
    result = CliRunner().invoke(main, ["model", "info", str(tmp_path / "not.pt")])
    assert result.exit_code == 1 and "is not a readable profiles checkpoint" in result.output


def test_librdkafka_log_goes_through_python_logging_rate_limited():
    import logging

    from stream.kafka import RateLimit
    from stream.settings import LIBRDKAFKA_LOG, KafkaSettings

    assert KafkaSettings("h:1").client_config()["logger"] is LIBRDKAFKA_LOG
    limit = RateLimit(interval_s=60)

    def record(msg: str) -> logging.LogRecord:
        return logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, msg, None, None)

    assert limit.filter(record("FAIL|rdkafka#producer-1| Connect failed (after 0ms in state CONNECT)"))
    assert not limit.filter(record("FAIL|rdkafka#producer-1| Connect failed (after 512ms in state CONNECT)"))
    assert limit.filter(record("FAIL|rdkafka#producer-1| Name or service not known"))


@pytest.mark.parametrize("servers", ["localhost:notaport", "localhost:0", ":9092", "a:9092,b:x"])
def test_a_broker_address_that_is_not_host_port_is_a_usage_error(servers):
    """librdkafka would read 'localhost:notaport' as port 0 and fail later, less clearly."""
    result = CliRunner().invoke(main, ["get", "u1", "--bootstrap-servers", servers])
    assert result.exit_code == 2 and "is not host:port" in result.output, result.output


def test_evaluate_fields_on_a_handful_of_users_says_they_are_too_few_and_sends_no_one_to_calibrate(tmp_path):
    write_events(tmp_path / "events.jsonl", 300, users=5)
    result = CliRunner().invoke(main, ["evaluate-fields", "--model", "demo", "--events", str(tmp_path / "events.jsonl"),
                                       "--device", DEVICE])
    assert result.exit_code == 0, result.output
    assert "users are too few to judge a field" in result.output and "profiles calibrate" not in result.output


@pytest.mark.parametrize("args, code, message", [
    # librdkafka's refusal was "Error: KafkaException: KafkaError{code=_INVALID_ARG,val=-186,...}"
    (["run", "--untrained", "--bootstrap-servers", UNREACHABLE, "--kafka-config", "no.such.prop=1"], 1,
     'the Kafka settings were refused: No such configuration property: "no.such.prop" (--kafka-config'),
    # a keystore given for the properties file: "'utf-8' codec can't decode byte 0x94 ...", naming neither
    (["run", "--untrained", "--bootstrap-servers", UNREACHABLE, "--kafka-config-file", "{tmp}/keystore.p12"], 2,
     "--kafka-config-file {tmp}/keystore.p12 is not UTF-8 text"),
    # 0 * 1000 is no better: "epoch seconds? (use 0 or an ISO time)"
    (["train", "--events", "{tmp}/e.jsonl", "--until", "0", "--out", "{tmp}/m.pt"], 2, "give an ISO time"),
    (["generate", "--users", "100000000000000000000", "--out", "{tmp}/g.jsonl"], 2, "not in the range"),
])
def test_settings_that_cannot_work_are_named(tmp_path, args, code, message):
    (tmp_path / "keystore.p12").write_bytes(b"\x94\x00\xff\x30\x82")
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, args + ["--connect-timeout", "1s"] if args[0] == "run" else args)
    assert result.exit_code == code and message.format(tmp=tmp_path) in result.output, result.output
    assert "Traceback" not in result.output and "KafkaError{" not in result.output
