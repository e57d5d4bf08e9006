"""Odd input to the commands that read logs offline, found by a sweep of the first hour (session 53): each ends
in one `Error:` line or a usage error, or leaves the bad record out and says so, instead of a result that means
nothing (baselines at recall 1.0, a verdict over half a second of future, a cut in 2164) or minutes of work."""

from __future__ import annotations

import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from models.dataset import usable_events
from stream.events import AHEAD_OF_CLOCK, RecordBatch
from stream.generator import generate

FUTURE = {"event_id": "fut", "user_id": "u1", "ts": "2199-12-31T00:00:00Z", "type": "click", "item_id": "i1",
          "category": "shoes"}


def write(path, rows: list[dict]) -> str:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return str(path)


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def small_log(tmp_path_factory) -> list[dict]:
    return generate(users=30, events=1500, seed=3).events


def test_offline_reading_leaves_out_an_event_stamped_after_the_clock_as_the_daemon_does(small_log):
    records = RecordBatch.of([orjson.dumps(r) for r in [*small_log, FUTURE]], topic="log")
    events, dead = usable_events(records, 65536)
    assert len(events) == len(small_log) and int(events.ts.max()) < 4_102_444_800_000  # before 2100
    assert [d.reason for d in dead] == [AHEAD_OF_CLOCK] and "after this machine's clock" in dead[0].detail


def test_one_event_of_2199_moves_no_evaluation_cut(tmp_path, small_log):
    plain = invoke("evaluate-fields", "--model", "demo", "--events", write(tmp_path / "a.jsonl", small_log), "--json")
    spiked = invoke("evaluate-fields", "--model", "demo", "--events",
                    write(tmp_path / "b.jsonl", [*small_log, FUTURE]), "--json")
    assert plain.exit_code == 0 and spiked.exit_code == 0, spiked.output
    report = orjson.loads(spiked.stdout[spiked.stdout.index("{"):])
    assert report["cut"] == orjson.loads(plain.stdout[plain.stdout.index("{"):])["cut"]


def test_evaluate_refuses_training_or_test_events_it_cannot_use(tmp_path, small_log):
    """Without training events every baseline scores every item 0, and ties rank first: recall 1.0."""
    empty, log_ = tmp_path / "empty.jsonl", write(tmp_path / "log.jsonl", small_log)
    empty.write_bytes(b"")
    for args, option in ((("--train-events", str(empty), "--events", log_), "--train-events"),
                         (("--train-events", log_, "--events", str(empty)), "--events")):
        result = invoke("evaluate", "--model", "demo", *args)
        assert result.exit_code == 1 and f"no usable events in {option}" in error_line(result)


def test_evaluate_fields_wants_minutes_of_future_after_a_cut(tmp_path, small_log):
    """A log spanning one second: two cuts half a second apart were judged "ahead" over windows of 0 hours."""
    squeezed = [{**e, "ts": 1_700_000_000_000 + i // 2} for i, e in enumerate(small_log[:2000])]
    result = invoke("evaluate-fields", "--model", "demo", "--events", write(tmp_path / "s.jsonl", squeezed),
                    "--cuts", "2")
    assert result.exit_code == 1 and "past the cut" in error_line(result)


@pytest.mark.parametrize("args", [
    ("replay", "LOG", "--out", "OUT", "--torch-threads", "100000"),  # crashed torch's thread pool (exit 139)
    ("replay", "LOG", "--out", "OUT", "--gru-threads", "5000"),
    ("split", "LOG", "--test-fraction", "nan", "--train-out", "A", "--test-out", "B"),
    ("train", "--events", "LOG", "--out", "M", "--lr", "inf"),  # an epoch of nan losses, then a RuntimeError
    ("generate", "--users", "3", "--events", "10", "--invalid-fraction", "nan", "--out", "OUT"),  # read as 0
    ("generate", "--users", "3", "--events", "10", "--span-days", "1e9", "--out", "OUT"),  # a log replay refuses
])
def test_values_no_machine_or_log_can_take_are_usage_errors(tmp_path, small_log, args):
    paths = {"LOG": write(tmp_path / "log.jsonl", small_log), "OUT": str(tmp_path / "out.jsonl"),
             "A": str(tmp_path / "a.jsonl"), "B": str(tmp_path / "b.jsonl"), "M": str(tmp_path / "m.pt")}
    result = invoke(*[paths.get(a, a) for a in args])
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "m.pt").exists()


def test_inspect_refuses_idle_rescores_by_the_million(tmp_path, small_log):
    user = small_log[0]["user_id"]
    result = invoke("inspect", user, "--events", write(tmp_path / "log.jsonl", small_log),
                    "--idle-rescore-after", "1s")
    assert result.exit_code == 1 and "would re-score the user" in error_line(result)


def test_a_yoochoose_session_id_beyond_64_bits_is_one_bad_row_not_a_failed_import(tmp_path):
    src = tmp_path / "clicks.dat"
    src.write_text("SessionId\tItemId\tTime\n1\t214536502\t1396839069\n"
                   "18446744073709551616\t214536502\t1396839070\n9223372036854775807\t214536503\t1396839071\n")
    result = invoke("import", str(src), "--format", "yoochoose", "--out", str(tmp_path / "yc.jsonl"))
    assert result.exit_code == 0 and "bad_id=1" in result.output, result.output
    rows = [orjson.loads(line) for line in (tmp_path / "yc.jsonl").read_bytes().splitlines()]
    assert [r["user_id"] for r in rows] == [1, 9223372036854775807]


def test_a_checkpoint_with_weights_that_are_not_numbers_is_refused_before_it_serves(tmp_path, small_log):
    """Served, a diverged model published null scores for every user and said nothing."""
    import torch

    from models.checkpoint_io import DEMO_MODEL_PATH

    payload = torch.load(DEMO_MODEL_PATH, weights_only=True)
    name = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][name] = torch.full_like(payload["state_dict"][name], float("nan"))
    torch.save(payload, tmp_path / "nan.pt")
    result = invoke("replay", write(tmp_path / "log.jsonl", small_log), "--out", str(tmp_path / "out.jsonl"),
                    "--model", str(tmp_path / "nan.pt"))
    assert result.exit_code == 1 and "not finite numbers" in error_line(result) and name in result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_a_cut_given_twice_is_judged_once(tmp_path, small_log):
    cut = "2023-11-25T00:00:00+00:00"
    result = invoke("evaluate-fields", "--model", "demo", "--events", write(tmp_path / "log.jsonl", small_log),
                    "--cut", cut, "--cut", cut, "--json")
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout[result.stdout.index("{"):])
    assert "cuts" not in report and report["cut"] == cut


def test_split_of_a_log_whose_events_share_one_time_says_there_is_no_later_part(tmp_path, small_log):
    same = [{**e, "ts": 1_700_000_000_000} for e in small_log]
    result = invoke("split", write(tmp_path / "log.jsonl", same), "--train-out", str(tmp_path / "a.jsonl"),
                    "--test-out", str(tmp_path / "b.jsonl"))
    assert result.exit_code == 1 and "would be empty" in error_line(result)
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


def test_train_on_one_event_says_one_not_none(tmp_path, small_log):
    result = invoke("train", "--events", write(tmp_path / "one.jsonl", small_log[:1]), "--out", str(tmp_path / "m.pt"))
    assert result.exit_code == 1 and "one usable event" in error_line(result)


@pytest.mark.parametrize("command", ["evaluate-fields", "inspect"])
def test_a_plot_into_a_missing_directory_fails_before_the_work(tmp_path, small_log, command):
    log_ = write(tmp_path / "log.jsonl", small_log)
    args = ["--model", "demo", "--events", log_] if command == "evaluate-fields" else [small_log[0]["user_id"],
                                                                                       "--events", log_]
    result = invoke(command, *args, "--plot", str(tmp_path / "nodir" / "p.png"))
    assert result.exit_code == 1 and "does not exist" in error_line(result)
    assert "replaying" not in result.output and "│" not in result.output  # no report came before the error


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path):
    """`profiles generate --out - | head -1` printed `Error: BrokenPipeError` and exited 1."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "consumers.cli", "generate", "--users", "50", "--events",
                             "50000", "--out", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert orjson.loads(proc.stdout.readline())["event_id"]
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Error" not in err, err


@pytest.mark.parametrize("source", ["-", "/dev/null"])
def test_standard_input_or_a_device_as_a_source_is_named_for_what_it_is(tmp_path, source):
    result = invoke("replay", source, "--out", str(tmp_path / "out.jsonl"))
    assert result.exit_code == 1 and "not from pipes or standard input" in error_line(result)


def test_a_replay_whose_users_expired_does_not_count_the_survivors_as_its_users(tmp_path, small_log):
    """--state-ttl 1ms left one user in state, and the summary said "of 1 users" of a 30-user log."""
    result = invoke("replay", write(tmp_path / "log.jsonl", small_log), "--out", str(tmp_path / "out.jsonl"),
                    "--state-ttl", "1ms")
    assert result.exit_code == 0, result.output
    assert "user state(s) expired" in result.output and " of 1 users" not in result.output


def test_a_damaged_or_edited_checkpoint_is_one_short_error_line(tmp_path, small_log):
    import torch

    from models.checkpoint_io import DEMO_MODEL_PATH

    payload = torch.load(DEMO_MODEL_PATH, weights_only=True)
    torch.save({k: v for k, v in payload.items() if k != "state_dict"}, tmp_path / "no_weights.pt")
    torch.save({**payload, "config": {**payload["config"], "hidden_size": 48}}, tmp_path / "other_size.pt")
    log_ = write(tmp_path / "log.jsonl", small_log)
    for name, expected in (("no_weights.pt", "is damaged or was edited: KeyError"),
                           ("other_size.pt", "does not match this model code: size mismatch")):
        result = invoke("evaluate-fields", "--model", str(tmp_path / name), "--events", log_)
        line = error_line(result)
        assert result.exit_code == 1 and expected in line and len(result.output.strip().splitlines()) == 1, line


def test_inspect_says_how_many_lines_it_left_out(tmp_path, small_log, caplog):
    seconds = [{**e, "ts": e["ts"] // 1000} for e in small_log[:5]]  # epoch seconds: 1970, invalid
    with caplog.at_level("WARNING", logger="consumers.inspect"):
        result = invoke("inspect", small_log[0]["user_id"], "--events",
                        write(tmp_path / "log.jsonl", [*small_log, *seconds, FUTURE]))
    assert result.exit_code == 0, result.output
    assert any(r.getMessage().startswith("6 invalid line(s) skipped") for r in caplog.records), caplog.text


@pytest.mark.parametrize("source, expected", [("kafka://", "is not kafka://TOPIC"),
                                              ("kafka://events?from=notadate", "from= must be ISO-8601")])
def test_a_mistyped_topic_address_is_named_before_any_broker_is_asked(tmp_path, source, expected):
    """No broker listens at port 1: the address is the error, not the broker."""
    result = invoke("train", "--events", source, "--out", str(tmp_path / "m.pt"), "--bootstrap-servers",
                    "127.0.0.1:1", "--connect-timeout", "1s")
    assert result.exit_code == 1 and expected in error_line(result)


def test_a_dataset_download_cut_short_is_named_as_such(tmp_path):
    import gzip

    rows = "user_id,item_id,category_id,behavior_type,timestamp\n" + "".join(
        f"{i},2,3,pv,{1511658000 + i}\n" for i in range(20000))
    (tmp_path / "taobao.csv.gz").write_bytes(gzip.compress(rows.encode())[:30000])
    for command in (("import", str(tmp_path / "taobao.csv.gz"), "--out", str(tmp_path / "a.jsonl")),
                    ("replay", str(tmp_path / "taobao.csv.gz"), "--out", str(tmp_path / "b.jsonl"))):
        result = invoke(*command, "--format", "taobao")
        line = error_line(result)
        assert result.exit_code == 1 and "gzip data broken after" in line and "EOFError" not in line, line
        assert "is --format" not in line


def test_a_foreign_pickle_is_one_error_line_without_torchs_warnings(tmp_path):
    import pickle

    with open(tmp_path / "p4.pt", "wb") as fh:
        pickle.dump({"a": 1}, fh, protocol=4)
    import subprocess
    import sys

    # In a process of its own: pytest records warnings instead of letting them reach stderr.
    result = subprocess.run([sys.executable, "-m", "consumers.cli", "model", "info", str(tmp_path / "p4.pt")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"Error: '{tmp_path / 'p4.pt'}' is not a readable profiles checkpoint (UnpicklingError)"], result.stderr


def test_split_cuts_by_the_events_the_other_commands_use_not_one_of_2199(tmp_path, small_log):
    """The latest 20% by time: an event stamped far ahead was the whole test part's reason to exist."""
    plain = invoke("split", write(tmp_path / "a.jsonl", small_log), "--train-out", str(tmp_path / "a1.jsonl"),
                   "--test-out", str(tmp_path / "a2.jsonl"))
    spiked = invoke("split", write(tmp_path / "b.jsonl", [*small_log, FUTURE]), "--train-out",
                    str(tmp_path / "b1.jsonl"), "--test-out", str(tmp_path / "b2.jsonl"))
    assert plain.exit_code == 0 and spiked.exit_code == 0, spiked.output
    assert (tmp_path / "b2.jsonl").read_bytes() == (tmp_path / "a2.jsonl").read_bytes()
    # ... and the refused line stays on the training side byte for byte, as invalid lines do
    assert (tmp_path / "b1.jsonl").read_bytes() == (tmp_path / "a1.jsonl").read_bytes() + orjson.dumps(FUTURE) + b"\n"
