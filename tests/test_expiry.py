"""State that expires (--state-ttl): the rule, batching invariance, replay against the daemon on the real broker,
tombstones that keep expired users out of a restore, a returning user's fresh start, publish vs drop, the metric."""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np
import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from consumers.daemon import ProfileDaemon
from consumers.replay import replay
from models.update_step import load_updater
from stream import expiry
from stream.generator import generate, write_jsonl
from stream.metrics import Metrics
from stream.settings import Settings
from tests.helpers import (
    DEVICE, EVENTS, STATE_ATOL, create_topics, latest_profiles, produce, record_batch, run_until_drained)

DAY_MS = 86_400_000
TTL_MS = 4 * DAY_MS
TYPES = ("search", "click", "add_to_cart", "purchase")


def traffic(seed: int = 61, users: int = 120, events: int = 2400) -> list[dict]:
    """60 days of generated traffic: sessions days apart, users who go quiet for good, users who come back."""
    return generate(users=users, events=events, seed=seed, span_days=60).events


def expected(log: list[dict], ttl_ms: int, end_ms: int, ttl_from: int = 0,
             ) -> tuple[dict[str, list[int]], int, set[str]]:
    """The rule, the obvious way: (counts of each user still in state at `end_ms`, over its events since its
    last gap of more than the TTL; expiries in all; the users who came back after one). Gaps before the
    event at index `ttl_from` of the log were applied without a TTL."""
    events = defaultdict(list)
    for i, e in enumerate(log):
        events[str(e["user_id"])].append((e["ts"], i, e["type"]))
    kept, expiries, returned = {}, 0, set()
    for user, evs in events.items():
        evs.sort()
        start = 0
        for k in range(1, len(evs)):
            if evs[k][0] - evs[k - 1][0] > ttl_ms and evs[k][1] >= ttl_from:
                start, expiries = k, expiries + 1
                returned.add(user)
        if end_ms - evs[-1][0] > ttl_ms:
            expiries += 1
        else:
            kept[user] = [sum(t == name for _, _, t in evs[start:]) for name in TYPES]
    return kept, expiries, returned


def expire_the_rest(updater) -> int:
    """Expire the users idle past the TTL at the end, as a replay ends; returns how many."""
    expired = 0
    while found := len(updater.expire_idle(force=True)):
        expired += found
    return expired


def counts_by_user(updater) -> dict[str, list[int]]:
    state = updater.state
    return {u: state.counts[i].tolist() for i, u in enumerate(state.user_ids)}


def hidden_of(updater, user: str) -> np.ndarray:
    return updater.state.states[updater.state.row(user)].cpu().numpy()


def test_users_idle_longer_than_the_ttl_expire_whatever_the_batching(monkeypatch):
    monkeypatch.setattr(expiry, "EXPIRE_PER_PASS", 5)  # a scan that finds more leaves the rest to the next one
    log = traffic()
    end = max(e["ts"] for e in log)
    kept, expiries, returned = expected(log, TTL_MS, end)
    assert returned and len(kept) < 120, "the log must have users who come back and users who leave for good"
    settings = Settings(device=DEVICE, input_topics=("events",), state_ttl_ms=TTL_MS)
    runs = {}
    for size in (len(log), 97, 7):  # one batch (every restart inside it), and many
        updater = load_updater(settings)
        expired = sum(len(updater.process(record_batch(log[i:i + size], first_offset=i)).expired)
                      for i in range(0, len(log), size))
        expired += expire_the_rest(updater)
        assert counts_by_user(updater) == kept, size
        assert expired == expiries, size
        runs[size] = updater
    for user in kept:
        np.testing.assert_allclose(hidden_of(runs[7], user), hidden_of(runs[len(log)], user), atol=STATE_ATOL)


def test_a_user_expired_from_a_snapshot_base_is_not_taken_from_it_again():
    log = traffic(seed=64)
    half = len(log) // 2
    backfill = load_updater(EVENTS)
    backfill.process(record_batch(log[:half]))
    live = load_updater(Settings(device=DEVICE, input_topics=("events",), state_ttl_ms=TTL_MS))
    live.state.attach_base(backfill.state.snapshot(), ["events"], ["events"])
    assert live.state.load_base_partitions([0]) == len(backfill.state)
    expired = sum(len(live.process(record_batch(log[i:i + 97], first_offset=i)).expired)
                  for i in range(half, len(log), 97))
    expired += expire_the_rest(live)
    kept, expiries, _ = expected(log, TTL_MS, max(e["ts"] for e in log), ttl_from=half)
    # Users the first half left idle expire once: the second half's scans drop them, and one who comes back
    # starts afresh, not from its state in the snapshot.
    assert counts_by_user(live) == kept and expired == expiries


def test_a_returning_user_starts_from_a_fresh_state():
    log = traffic()
    _, _, returned = expected(log, TTL_MS, max(e["ts"] for e in log))
    user = sorted(returned)[0]
    mine = sorted((e for e in log if str(e["user_id"]) == user), key=lambda e: e["ts"])
    gaps = [k for k in range(1, len(mine)) if mine[k]["ts"] - mine[k - 1]["ts"] > TTL_MS]
    since = mine[gaps[-1]:]
    updater = load_updater(Settings(device=DEVICE, input_topics=("events",), state_ttl_ms=TTL_MS))
    updater.process(record_batch(mine))
    fresh = load_updater(EVENTS)  # a user seen for the first time at its return
    fresh.process(record_batch(since, first_offset=gaps[-1]))
    row, new = updater.state.row(user), fresh.state.row(user)
    assert updater.state.counts[row].tolist() == [sum(e["type"] == t for e in since) for t in TYPES]
    for name, column in updater.state.columns.items():  # counters, statistics and bookkeeping as a new user's
        np.testing.assert_array_equal(column[row], fresh.state.columns[name][new], err_msg=name)
    np.testing.assert_allclose(hidden_of(updater, user), hidden_of(fresh, user), atol=1e-6)


def replay_file(tmp_path, log, name: str, **settings) -> tuple[list[dict], object]:
    src = tmp_path / "log.jsonl"
    if not src.exists():
        write_jsonl(log, src)
    out = tmp_path / f"{name}.jsonl"
    every_update = settings.pop("every_update", False)
    report = replay(Settings(device=DEVICE, **settings), [str(src)], "jsonl", str(out), None, every_update, None,
                    str(tmp_path / f"{name}.dlq.jsonl"), 500, show_progress=False)
    return [orjson.loads(line) for line in out.read_bytes().splitlines()], report


def test_replay_publishes_a_last_profile_saying_expired_or_drops_the_user(tmp_path):
    log = traffic(seed=62)
    kept, expiries, returned = expected(log, TTL_MS, max(e["ts"] for e in log))
    everyone = {str(e["user_id"]) for e in log}

    published, report = replay_file(tmp_path, log, "publish", state_ttl_ms=TTL_MS)
    final = {p["user_id"]: p for p in published}
    assert len(published) == len(final) == len(everyone) and report.expired == expiries
    assert {u for u, p in final.items() if p.get("expired")} == everyone - set(kept)
    assert all("expired" not in final[u] and final[u]["counts"] == dict(zip(TYPES, kept[u])) for u in kept)

    dropped, report = replay_file(tmp_path, log, "drop", state_ttl_ms=TTL_MS, on_expire="drop")
    assert {p["user_id"] for p in dropped} == set(kept) and report.expired == expiries
    assert not any("expired" in p for p in dropped)

    # Every update: a returning user's last profile before the gap says expired, the next one starts afresh.
    updates, _ = replay_file(tmp_path, log, "updates", state_ttl_ms=TTL_MS, every_update=True)
    user = sorted(returned & set(kept))[0]
    mine = [p for p in updates if p["user_id"] == user]
    first_expired = next(i for i, p in enumerate(mine) if p.get("expired"))
    ts = sorted(e["ts"] for e in log if str(e["user_id"]) == user)
    back = next(t for t, before in zip(ts[1:], ts) if t - before > TTL_MS)  # the first event after a gap
    after = mine[first_expired + 1]
    assert "expired" not in after and mine[first_expired]["last_event_ts"] < back <= after["last_event_ts"]
    assert sum(after["counts"].values()) == sum(back <= t <= after["last_event_ts"] for t in ts)
    assert sum(p.get("expired", False) for p in updates) == expiries
    updates, _ = replay_file(tmp_path, log, "drop-updates", state_ttl_ms=TTL_MS, on_expire="drop", every_update=True)
    assert not any("expired" in p for p in updates)


@pytest.mark.parametrize("value, message", [
    ("12 parsecs", "'12 parsecs' is not a duration like 12h, 30d or 400d (or off)"),
    ("-3d", "'-3d' is not a duration like 12h, 30d or 400d (or off)"),
    ("999999999d", "at most 100000d"),
])
@pytest.mark.parametrize("command", ["run", "replay"])
def test_a_bad_state_ttl_is_a_usage_error(command, value, message, tmp_path):
    args = ["run", "--untrained"] if command == "run" else ["replay", str(tmp_path / "x.jsonl"), "--out", "-"]
    result = CliRunner().invoke(main, [*args, "--state-ttl", value])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--state-ttl'" in result.output and message in result.output
    from_env = CliRunner().invoke(main, args, env={"PROFILES_STATE_TTL": value})
    assert from_env.exit_code == 2 and message in from_env.output


def test_the_daemon_expires_the_users_a_replay_does_and_its_tombstones_keep_them_out_of_a_restore(
        kafka, settings_factory, tmp_path):
    log = traffic(seed=63, users=150, events=3000)
    # The daemon's clocks are per input partition, the file's is the log's: 30 users closing the log at one
    # time bring every partition's clock to its end (else users idle for about the TTL could differ).
    end = max(e["ts"] for e in log) + 1
    log += [dict(log[-1], user_id=f"closing-{i}", event_id=f"closing-{i}", ts=end) for i in range(30)]
    settings = settings_factory(batch_max_events=97, state_ttl_ms=TTL_MS)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 3})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    kept, expiries, returned = expected(log, TTL_MS, end)
    everyone = {str(e["user_id"]) for e in log}
    assert returned and 30 < len(kept) < len(everyone)

    daemon = run_until_drained(settings)
    assert counts_by_user(daemon.updater) == kept
    registry = daemon.metrics.registry
    assert registry.get_sample_value("profiles_users_expired_total") == expiries
    assert registry.get_sample_value("profiles_users_in_state") == len(kept)

    # The replay of the same log as a file agrees: the same users, counters and states.
    replayed, report = replay_file(tmp_path, log, "final", state_ttl_ms=TTL_MS)
    assert report.expired == expiries
    live, _ = latest_profiles(kafka, settings.output_topic)
    final = {p["user_id"]: p for p in replayed}
    assert set(live) == set(final) == everyone
    for user, profile in live.items():
        assert profile.get("expired", False) == final[user].get("expired", False) == (user not in kept), user
        assert profile["counts"] == final[user]["counts"], user
        np.testing.assert_allclose(profile["embedding"], final[user]["embedding"], atol=STATE_ATOL)

    # A restart restores every user in state from the changelog, and no expired one: their tombstones win.
    restarted = ProfileDaemon(settings, load_updater(settings), Metrics(), threading.Event())
    restarted.restore_partitions([0, 1, 2])
    assert counts_by_user(restarted.updater) == kept
    for user in kept:
        np.testing.assert_allclose(hidden_of(restarted.updater, user), hidden_of(daemon.updater, user), atol=1e-6)
    restarted.source.close()
