"""Logs as producers write them: events sent twice (at-least-once retries) and users erased by forget records.
Training, `evaluate-fields` and `inspect` must see what the daemon applies, no more."""

from __future__ import annotations

import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from consumers.inspect import render_table, timeline
from models.dataset import load_events
from stream.generator import generate
from stream.settings import Settings
from tests.helpers import DEVICE


@pytest.fixture(scope="module")
def shop_log(tmp_path_factory):
    """A generated log of 40 users, its events written once, twice, and once with a forget record for the
    first event's user after them all."""
    d = tmp_path_factory.mktemp("shop")
    lines = [orjson.dumps(e) for e in generate(40, 1500, seed=4).events]
    forgotten = orjson.loads(lines[0])["user_id"]
    (d / "once.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    (d / "twice.jsonl").write_bytes(b"".join(line + b"\n" for line in lines + lines))
    forget = orjson.dumps({"control": "forget", "user_id": forgotten})
    (d / "forget.jsonl").write_bytes(b"".join(line + b"\n" for line in lines + [forget]))
    return d, forgotten


def fields_report(path) -> dict:
    result = CliRunner().invoke(main, ["evaluate-fields", "--model", "demo", "--events", str(path), "--json",
                                       "--device", DEVICE])
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def test_a_log_sent_twice_is_judged_and_trained_on_as_the_log_sent_once(shop_log):
    d, _ = shop_log
    once, twice = fields_report(d / "once.jsonl"), fields_report(d / "twice.jsonl")
    assert twice["events"] == once["events"] == 1500
    assert twice["fields"] == once["fields"]  # the model's profiles and the rules alike
    a, b = load_events([d / "once.jsonl"]), load_events([d / "twice.jsonl"])
    assert len(b) == len(a) == 1500 and (b.events.ts == a.events.ts).all()


def test_a_user_erased_by_a_forget_record_is_neither_judged_nor_trained_on(shop_log):
    d, forgotten = shop_log
    once, erased = fields_report(d / "once.jsonl"), fields_report(d / "forget.jsonl")
    assert erased["users"] == once["users"] - 1
    log = load_events([d / "forget.jsonl"])
    assert forgotten not in set(log.users.tolist()) and len(log.users) == len(load_events([d / "once.jsonl"]).users) - 1


def test_events_after_a_forget_record_are_a_new_user(tmp_path):
    events = [{"event_id": f"e{i}", "user_id": "u1", "type": "click", "ts": 1_700_000_000_000 + i * 60_000,
               "item_id": "i1", "category": "c", "price": 5.0} for i in range(4)]
    lines = [orjson.dumps(e) for e in events[:3]] + [orjson.dumps({"control": "forget", "user_id": "u1"}),
                                                      orjson.dumps(events[3])]
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    log = load_events([path])
    assert log.events.event_id.tolist() == ["e3"]
    tl = timeline(Settings(device=DEVICE, emit_embedding=False), [str(path)], "jsonl", "u1")
    assert [r["event"]["event_id"] for r in tl.events] == ["e3"] and tl.erased_before == 3
    assert tl.events[0]["profile"]["counts"]["click"] == 1
    assert "3 erased by a forget record" in render_table(tl).title


def test_inspect_shows_a_repeated_event_as_skipped_as_the_daemon_skips_it(tmp_path):
    events = [{"event_id": f"e{i}", "user_id": "u1", "type": "click", "ts": 1_700_000_000_000 + i * 60_000,
               "item_id": "i1", "category": "c", "price": 5.0} for i in range(4)]
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events + [events[1]]))
    tl = timeline(Settings(device=DEVICE, emit_embedding=False), [str(path)], "jsonl", "u1")
    assert [r["event"]["event_id"] for r in tl.events] == ["e0", "e1", "e2", "e3"] and tl.duplicates == 1
    assert tl.events[-1]["profile"]["counts"]["click"] == 4
    assert "1 duplicate(s) skipped" in render_table(tl).title
