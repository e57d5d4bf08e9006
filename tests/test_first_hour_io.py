"""The first hour with replay, split and import: a log in the wrong layout fails with why, every command's
`--out -` is standard output, a byte-order mark is no dead letter, an output is never one of the inputs,
and rows a dataset format cannot convert are dead letters of the replay."""

from __future__ import annotations

import base64
import gzip
import logging

import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from stream.generator import generate
from tests.helpers import DEVICE

BOM = b"\xef\xbb\xbf"
TAOBAO = b"user_id,item_id,category_id,behavior_type,timestamp\n1,2,3,pv,1511658000\n1,3,3,buy,1511658100\n"


def events(users: int = 20, n: int = 300) -> list[dict]:
    return generate(users=users, events=n, seed=3).events


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in rows)


def invoke(*args: str, device: bool = False):
    return CliRunner().invoke(main, [*args, *(["--device", DEVICE] if device else [])])


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def in_seconds(rows: list[dict]) -> list[dict]:
    return [{**e, "ts": e["ts"] // 1000} for e in rows]


@pytest.mark.parametrize("content, expected", [
    (lambda: jsonl(in_seconds(events())), ["300 as invalid_field", ":1: 'ts' ", "epoch seconds?"]),
    (lambda: TAOBAO, ["as not_json", "looks like CSV", "profiles import --format` (taobao"]),
    (lambda: orjson.dumps(events()[:5], option=orjson.OPT_INDENT_2), ["as not_json", "one JSON object per line"]),
    # One line over the 64 KiB limit: was "too_large" alone; UTF-16 was taken for CSV.
    (lambda: orjson.dumps(events(n=1000)), ["as too_large", "is it a JSON array?"]),
    (lambda: jsonl(events()[:20]).decode().encode("utf-16"), ["as not_json", "UTF-16", "iconv"]),
], ids=["epoch-seconds", "csv-without-format", "pretty-json-array", "json-array-on-one-line", "utf-16"])
def test_a_replay_that_applies_no_event_fails_with_the_reason_and_an_example(tmp_path, content, expected):
    log = tmp_path / "log.jsonl"
    log.write_bytes(content())
    earlier = b'{"user_id":"earlier"}\n'
    (tmp_path / "p.jsonl").write_bytes(earlier)
    result = invoke("replay", str(log), "--out", str(tmp_path / "p.jsonl"), device=True)
    assert result.exit_code == 1, result.output
    error = error_line(result)
    assert error.startswith(f"Error: no usable events in {log} (") and "records broke the event contract" in error
    assert all(part in error for part in expected), error
    # A failed run: the earlier output stays, no dead letters file or temporary is left.
    assert (tmp_path / "p.jsonl").read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "p.jsonl"]


def test_the_replay_summary_breaks_dead_letters_down_by_reason(tmp_path):
    good = events()
    log = tmp_path / "log.jsonl"
    log.write_bytes(jsonl(in_seconds(good[:2]) + good) + b"not json\n")
    result = invoke("replay", str(log), "--out", str(tmp_path / "p.jsonl"), device=True)
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    assert "303 records (300 events, 3 dead letters" in summary, summary
    assert f"dead letters by reason: invalid_field 2 (e.g. {log}:1: 'ts' " in summary, summary
    assert f"not_json 1 (e.g. {log}:303: not valid JSON)" in summary, summary


@pytest.mark.parametrize("content", [b"", jsonl(in_seconds(events()))], ids=["empty", "no-valid-event"])
def test_split_of_a_log_without_events_is_a_one_line_error(tmp_path, content):
    log = tmp_path / "log.jsonl"
    log.write_bytes(content)
    result = invoke("split", str(log), "--train-out", str(tmp_path / "a"), "--test-out", str(tmp_path / "b"))
    assert result.exit_code == 1, result.output
    error = error_line(result)
    assert error.startswith(f"Error: no usable events in {log}") and "IndexError" not in error, error
    if content:
        assert "(300 records broke the event contract, 300 as invalid_field, e.g." in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_split_of_a_topic_names_the_ranges_that_cut_it(tmp_path):
    """A topic needs no copy to be cut: the usage error names the kafka:// ranges (and --until/--cut) instead of
    saying that a file named kafka://... does not exist."""
    result = invoke("split", "kafka://events", "--train-out", str(tmp_path / "a"), "--test-out", str(tmp_path / "b"))
    assert result.exit_code == 2, result.output
    error = error_line(result)
    assert "kafka://TOPIC?to=CUT" in error and "kafka://TOPIC?from=CUT" in error and "does not exist" not in error
    assert not any(tmp_path.iterdir())


def test_import_and_split_write_standard_output_for_a_dash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tb.csv").write_bytes(TAOBAO)
    result = invoke("import", "--format", "taobao", "tb.csv", "--out", "-")
    assert result.exit_code == 0, result.output
    assert [orjson.loads(line)["type"] for line in result.stdout.splitlines()] == ["click", "purchase"]
    assert "written to standard output" in result.stderr
    (tmp_path / "log.jsonl").write_bytes(jsonl(events()))
    result = invoke("split", "log.jsonl", "--test-fraction", "0.25", "--train-out", "-", "--test-out", "b.jsonl")
    assert result.exit_code == 0, result.output
    train = [orjson.loads(line) for line in result.stdout.splitlines()]
    test = [orjson.loads(line) for line in (tmp_path / "b.jsonl").read_bytes().splitlines()]
    assert len(train) + len(test) == 300 and max(e["ts"] for e in train) < min(e["ts"] for e in test)
    assert not (tmp_path / "-").exists()
    result = invoke("split", "log.jsonl", "--train-out", "-", "--test-out", "-")
    assert result.exit_code == 2 and "cannot both be '-'" in result.output, result.output


def test_lines_of_only_whitespace_are_blank_lines_and_the_others_keep_their_numbers(tmp_path):
    """An editor's indented blank line, a tab, a CRLF file's blank line: no event in them, so no dead letter
    either, as an empty line; trailing spaces after an event are no part of it. Line numbers still count them."""
    rows = jsonl(events()).splitlines(keepends=True)
    blank = [b"   \n", b"\t\r\n", b" \r\n"]
    log = b"".join(rows[:100] + blank + [r.rstrip(b"\n") + b"  \r\n" for r in rows[100:]])
    (tmp_path / "ws.jsonl").write_bytes(log)
    result = invoke("replay", str(tmp_path / "ws.jsonl"), "--out", str(tmp_path / "p.jsonl"), device=True)
    assert result.exit_code == 0, result.output
    assert "300 records (300 events, 0 dead letters" in result.output, result.output
    from stream.sources import FileSource

    source = FileSource([tmp_path / "ws.jsonl"], 1 << 20)
    numbers = []
    while not source.exhausted:
        numbers += list(source.next_batch().offsets)
    assert numbers == [*range(1, 101), *range(104, 304)]


def test_a_replay_without_dead_letters_leaves_no_empty_dead_letter_file(tmp_path):
    """No dead letters: no empty <out>.dlq.jsonl beside the output, and the summary names no file. A file an
    earlier run left at the path is replaced (empty): its dead letters are not this output's."""
    (tmp_path / "log.jsonl").write_bytes(jsonl(events()))
    out, dead = tmp_path / "p.jsonl", tmp_path / "p.jsonl.dlq.jsonl"
    result = invoke("replay", str(tmp_path / "log.jsonl"), "--out", str(out), device=True)
    assert result.exit_code == 0, result.output
    assert "300 records (300 events, 0 dead letters) of" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "p.jsonl"], result.output
    dead.write_bytes(b'{"reason":"an earlier run\'s"}\n')
    result = invoke("replay", str(tmp_path / "log.jsonl"), "--out", str(out), device=True)
    assert result.exit_code == 0, result.output
    assert dead.read_bytes() == b""
    (tmp_path / "log.jsonl").write_bytes(jsonl(events()) + b"not json\n")
    result = invoke("replay", str(tmp_path / "log.jsonl"), "--out", str(out), device=True)
    assert f"1 dead letters -> {dead}" in result.output, result.output
    assert len(dead.read_bytes().splitlines()) == 1


def test_a_byte_order_mark_at_the_start_of_a_file_is_no_dead_letter(tmp_path):
    log = BOM + jsonl(events())
    (tmp_path / "bom.jsonl").write_bytes(log)
    (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress(log))
    for name in ("bom.jsonl", "bom.jsonl.gz"):
        result = invoke("replay", str(tmp_path / name), "--out", str(tmp_path / "p.jsonl"), device=True)
        assert result.exit_code == 0, result.output
        assert "300 records (300 events, 0 dead letters" in result.output, result.output
    result = invoke("split", str(tmp_path / "bom.jsonl"), "--train-out", str(tmp_path / "a.jsonl"),
                    "--test-out", str(tmp_path / "b.jsonl"))
    assert result.exit_code == 0, result.output
    assert orjson.loads((tmp_path / "a.jsonl").read_bytes().splitlines()[0])  # the mark is not copied
    (tmp_path / "tb.csv").write_bytes(BOM + TAOBAO)
    (tmp_path / "tb.csv.gz").write_bytes(gzip.compress(BOM + TAOBAO))
    for name in ("tb.csv", "tb.csv.gz"):
        result = invoke("import", "--format", "taobao", str(tmp_path / name), "--out", str(tmp_path / "t.jsonl"))
        assert result.exit_code == 0, result.output
        assert len((tmp_path / "t.jsonl").read_bytes().splitlines()) == 2


@pytest.mark.parametrize("command, flag, victim", [
    (["replay", "{log}", "--out", "{log}"], "--out", "log.jsonl"),
    (["replay", "{log}", "--out", "{tmp}/p.jsonl", "--dead-letters", "{log}"], "--dead-letters", "log.jsonl"),
    (["split", "{log}", "--train-out", "{tmp}/a.jsonl", "--test-out", "{log}"], "--test-out", "log.jsonl"),
    (["import", "--format", "taobao", "{csv}", "--out", "{csv}"], "--out", "tb.csv"),
], ids=["replay-out", "replay-dead-letters", "split-test-out", "import-out"])
def test_an_output_that_is_one_of_the_inputs_is_refused(tmp_path, command, flag, victim):
    (tmp_path / "log.jsonl").write_bytes(jsonl(events()))
    (tmp_path / "tb.csv").write_bytes(TAOBAO)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    args = [a.format(log=tmp_path / "log.jsonl", csv=tmp_path / "tb.csv", tmp=tmp_path) for a in command]
    result = invoke(*args, device=command[0] == "replay")
    assert result.exit_code == 1, result.output
    assert error_line(result).startswith(f"Error: {flag} {tmp_path / victim} is one of the inputs"), result.output
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_replay_of_a_directory_skips_its_own_earlier_output_and_snapshot(tmp_path, caplog):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "events.jsonl").write_bytes(jsonl(events()) + b"not json\n")
    args = ["replay", str(logs), "--out", str(logs / "out.jsonl"), "--state-out", str(logs)]
    first = invoke(*args, device=True)
    assert first.exit_code == 0 and (logs / "out.jsonl.dlq.jsonl").exists(), first.output
    (logs / "out.jsonl.partial").write_bytes((logs / "out.jsonl").read_bytes())  # an interrupted run's
    with caplog.at_level(logging.WARNING, logger="stream.sources"):
        again = invoke(*args, device=True)
    assert again.exit_code == 0, again.output
    assert "301 records (300 events, 1 dead letters" in again.output, again.output
    skipped = sorted(r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("skipping"))
    assert skipped == [f"skipping {logs / name}" for name in ("out.jsonl", "out.jsonl.dlq.jsonl",
                                                              "out.jsonl.partial", "state.json", "state.npz")]


def test_rows_a_format_cannot_convert_are_dead_letters_of_the_replay(tmp_path):
    rows = tmp_path / "tb.csv"
    rows.write_bytes(b"1,2,3,pv,1511658000\n1,x,3,buy,1511658100\n1,3,3,zz,1511658100\n1,3,3\n")
    result = invoke("replay", str(rows), "--format", "taobao", "--out", str(tmp_path / "p.jsonl"), device=True)
    assert result.exit_code == 0, result.output
    assert "4 records (1 events, 3 dead letters" in result.output, result.output
    dead = [orjson.loads(line) for line in (tmp_path / "p.jsonl.dlq.jsonl").read_bytes().splitlines()]
    assert [(d["reason"], d["line"], base64.b64decode(d["value_base64"])) for d in dead] == [
        ("bad_id", 2, b"1,x,3,buy,1511658100"), ("unknown_event_type", 3, b"1,3,3,zz,1511658100"),
        ("wrong_column_count", 4, b"1,3,3")]
    assert all(d["source"] == str(rows) and "--format taobao" in d["detail"] for d in dead)


def test_a_replay_checks_its_outputs_before_it_loads_the_model(tmp_path):
    (tmp_path / "log.jsonl").write_bytes(jsonl(events()))
    result = invoke("replay", str(tmp_path / "log.jsonl"), "--model", str(tmp_path / "missing.pt"),
                    "--out", "/nonexistent/p.jsonl", device=True)
    assert result.exit_code == 1
    assert "cannot write --out /nonexistent/p.jsonl" in error_line(result)


@pytest.mark.parametrize("command", [["train"], ["calibrate", "--model", "demo"]])
def test_train_and_calibrate_say_what_a_log_of_no_event_is_instead(tmp_path, command):
    # was "Error: no usable events in LOG", with no reason nor hint
    log = tmp_path / "log.json"
    log.write_bytes(orjson.dumps(events(n=1000)))  # one line over the 64 KiB limit
    result = invoke(*command, "--events", str(log), "--out", str(tmp_path / "m.pt"), device=True)
    assert result.exit_code == 1, result.output
    error = error_line(result)
    assert "1 as too_large" in error and "is it a JSON array?" in error, error
    assert not (tmp_path / "m.pt").exists()


def test_import_reads_a_directory_as_replay_does_and_empty_inputs_are_said(tmp_path):
    data = tmp_path / "taobao"
    (data / "part").mkdir(parents=True)
    (data / "a.csv").write_bytes(TAOBAO)
    (data / "part" / "b.csv").write_bytes(TAOBAO.replace(b"1,2,3,pv", b"7,2,3,pv"))
    result = invoke("import", "--format", "taobao", str(data), "--out", str(tmp_path / "t.jsonl"))
    assert result.exit_code == 0, result.output
    users = [orjson.loads(line)["user_id"] for line in (tmp_path / "t.jsonl").read_bytes().splitlines()]
    assert users == ["1", "1", "7", "1"] and "warning" not in result.output  # a.csv, then part/b.csv
    (tmp_path / "none").mkdir()
    result = invoke("import", "--format", "taobao", str(tmp_path / "none"), "--out", str(tmp_path / "n.jsonl"))
    assert result.exit_code == 1 and "holds no files" in error_line(result)
    # An empty file: written, and said (a quiet day's log is no error, but a wrong path to one should show).
    (tmp_path / "empty.csv").write_bytes(b"")
    result = invoke("import", "--format", "taobao", str(tmp_path / "empty.csv"), "--out", str(tmp_path / "e.jsonl"))
    assert result.exit_code == 0 and "warning: " + str(tmp_path / "empty.csv") + " held no rows" in result.output
    assert (tmp_path / "e.jsonl").read_bytes() == b""
    (tmp_path / "empty.jsonl").write_bytes(b"")
    result = invoke("replay", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "p.jsonl"), device=True)
    assert result.exit_code == 0 and "held no records: nothing was replayed" in result.output, result.output


def test_split_says_how_many_lines_it_kept_in_training_that_are_no_usable_event(tmp_path, caplog):
    rows = events()
    (tmp_path / "log.jsonl").write_bytes(jsonl(rows[:10]) + b"not json\n" + jsonl(rows[10:]))
    with caplog.at_level(logging.WARNING, logger="models.dataset"):
        result = invoke("split", str(tmp_path / "log.jsonl"), "--train-out", str(tmp_path / "a.jsonl"),
                        "--test-out", str(tmp_path / "b.jsonl"))
    assert result.exit_code == 0, result.output
    said = [r.getMessage() for r in caplog.records if "kept in the training part" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 line(s) that are no usable event (not_json)"), said
    assert "e.g. line 11:" in said[0]
    assert b"not json\n" in (tmp_path / "a.jsonl").read_bytes()
