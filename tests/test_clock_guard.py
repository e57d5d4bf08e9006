"""One event stamped years ahead must not move every user's clock: it is dead-lettered as ahead_of_clock."""

from __future__ import annotations

import time

import orjson
from click.testing import CliRunner

from consumers.cli import main
from consumers.replay import replay
from stream.events import AHEAD_OF_CLOCK
from stream.generator import generate
from stream.settings import Settings
from tests.helpers import DEVICE

DAY = 86_400_000


def final_profiles(settings: Settings, lines: list[bytes], tmp_path, name: str) -> tuple[dict, list[dict]]:
    src, out, dlq = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl", tmp_path / f"{name}.dlq.jsonl"
    src.write_bytes(b"".join(line + b"\n" for line in lines))
    replay(settings, [str(src)], "jsonl", str(out), None, False, None, str(dlq), 50_000, show_progress=False)
    profiles = {p["user_id"]: p for p in map(orjson.loads, out.read_bytes().splitlines())}
    for p in profiles.values():
        p.pop("updated_at")  # the wall clock at publishing
    # No dead letters, no file (consumers/replay.py).
    return profiles, [orjson.loads(line) for line in dlq.read_bytes().splitlines()] if dlq.exists() else []


def test_an_event_stamped_years_ahead_is_dead_lettered_and_moves_no_clock(tmp_path):
    lines = [orjson.dumps(e) for e in generate(30, 600, seed=2).events]
    stamped_ahead = [orjson.dumps({"event_id": "x1", "user_id": "zz", "type": "search",
                                   "ts": int(time.time() * 1000) + 3 * 365 * DAY, "query": "q"})]
    settings = Settings(device=DEVICE, emit_embedding=False, state_ttl_ms=30 * DAY)
    clean, _ = final_profiles(settings, lines, tmp_path, "clean")
    guarded, dead = final_profiles(settings, lines[:300] + stamped_ahead + lines[300:], tmp_path, "guarded")
    assert [d["reason"] for d in dead] == [AHEAD_OF_CLOCK] and "days after this machine's clock" in dead[0]["detail"]
    assert guarded == clean  # no user expired, every churn_risk as without the line
    # Without the guard the one event is everyone's clock: all 30 users expire (the failure it prevents).
    unguarded, dead = final_profiles(Settings(device=DEVICE, emit_embedding=False, state_ttl_ms=30 * DAY,
                                              max_ahead_ms=0), lines[:300] + stamped_ahead + lines[300:],
                                     tmp_path, "unguarded")
    assert not dead and sum(bool(p.get("expired")) for p in unguarded.values()) == 30


def test_replay_of_a_log_stamped_in_the_future_says_so_and_takes_max_ahead_0(tmp_path):
    ahead = int(time.time() * 1000) + 5 * DAY - 1_700_000_000_000
    path = tmp_path / "future.jsonl"
    events = generate(20, 300, seed=1).events
    path.write_bytes(b"".join(orjson.dumps(dict(e, ts=e["ts"] + ahead)) + b"\n" for e in events))
    args = ["replay", str(path), "--out", str(tmp_path / "p.jsonl"), "--device", DEVICE]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "300 as ahead_of_clock" in result.output
    assert "0 turns the check off" in result.output
    result = CliRunner().invoke(main, args + ["--max-ahead", "0"])
    assert result.exit_code == 0 and len((tmp_path / "p.jsonl").read_bytes().splitlines()) == 20, result.output


def test_the_commands_that_read_logs_offline_take_max_ahead_too(tmp_path):
    # Each refusal names the option that lifts it, and --max-ahead 0 reads the log (a synthetic one, years ahead).
    ahead = int(time.time() * 1000) + 3 * 365 * DAY - 1_700_000_000_000
    path = tmp_path / "future.jsonl"
    path.write_bytes(b"".join(orjson.dumps(dict(e, ts=e["ts"] + ahead)) + b"\n"
                              for e in generate(20, 400, seed=1).events))
    commands = [["split", str(path), "--train-out", str(tmp_path / "a.jsonl"), "--test-out", str(tmp_path / "b.jsonl")],
                ["evaluate-fields", "--model", "demo", "--events", str(path), "--json", "--device", DEVICE]]
    for args in commands:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and "400 as ahead_of_clock" in result.output, result.output
        assert "--max-ahead 24h; 0 turns the check off" in result.output
        result = CliRunner().invoke(main, args + ["--max-ahead", "0"])
        assert result.exit_code == 0, result.output
    assert len((tmp_path / "a.jsonl").read_bytes().splitlines()) == 320
    assert orjson.loads(result.stdout)["events"] == 400
