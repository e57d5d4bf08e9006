"""Replay: files through the daemon's pipeline, equal to a streamed run of the same events."""

from __future__ import annotations

import base64
import gzip

import numpy as np
import orjson
import pytest
import torch

from consumers.replay import replay
from stream.generator import generate, write_jsonl
from stream.malformed import corrupt_some
from stream.settings import Settings
from stream.sources import SourceError
from stream.snapshot_files import read_snapshot
from tests.helpers import (
    DEVICE, STATE_ATOL, create_topics, expected_from_events, latest_profiles, produce, run_until_drained)

ON_DEVICE = Settings(device=DEVICE)


def run(tmp_path, sources, **kw) -> tuple[dict[str, dict], object]:
    out = tmp_path / "profiles.jsonl"
    report = replay(ON_DEVICE, [str(s) for s in sources], kw.pop("fmt", "jsonl"), str(out), None,
                    kw.pop("every_update", False), kw.pop("state_out", None),
                    str(kw.pop("dead_letters", tmp_path / "dlq.jsonl")), kw.pop("batch_records", 50_000),
                    show_progress=False)
    assert not kw
    profiles = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    return {p["user_id"]: p for p in profiles}, report


def rows_of(users: list[str], snapshot: dict) -> list[int]:
    """The rows of these users in a state snapshot (to compare two tables user by user)."""
    row = {u: i for i, u in enumerate(snapshot["user_ids"])}
    return [row[u] for u in users]


def test_replay_equals_a_streamed_run_of_the_same_events(kafka, settings_factory, tmp_path):
    log = generate(users=200, events=3000, seed=21)
    settings = settings_factory(batch_max_events=97)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 3})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events])
    streamed = run_until_drained(settings).updater.state.snapshot()
    live_profiles, _ = latest_profiles(kafka, settings.output_topic)

    write_jsonl(log.events, tmp_path / "log.jsonl")
    replayed_profiles, report = run(tmp_path, [tmp_path / "log.jsonl"], state_out=tmp_path / "state",
                                    batch_records=1000)
    assert report.records == 3000 and report.dead_letters == 0 and report.users == 200
    replayed, meta = read_snapshot(tmp_path / "state")
    assert meta["records"] == 3000 and meta["model_version"].startswith("untrained")

    idx = rows_of(streamed["user_ids"], replayed)
    np.testing.assert_array_equal(streamed["counts"], replayed["counts"][idx])
    np.testing.assert_array_equal(streamed["spend_micros"], replayed["spend_micros"][idx])
    np.testing.assert_array_equal(streamed["last_ts"], replayed["last_ts"][idx])
    np.testing.assert_allclose(streamed["hidden"], replayed["hidden"][idx], atol=STATE_ATOL)
    assert set(replayed_profiles) == set(live_profiles)
    for user, live in live_profiles.items():
        assert replayed_profiles[user]["counts"] == live["counts"]
        np.testing.assert_allclose(replayed_profiles[user]["embedding"], live["embedding"], atol=STATE_ATOL)


def test_gzip_directory_and_glob_sources(tmp_path):
    events = generate(users=50, events=1200, seed=4).events
    parts = tmp_path / "parts"
    parts.mkdir()
    write_jsonl(events[:500], parts / "a.jsonl")
    write_jsonl(events[500:], parts / "b.jsonl.gz")
    assert gzip.open(parts / "b.jsonl.gz").readline().startswith(b"{")
    expected = expected_from_events(events)

    for sources in ([parts], [parts / "a.jsonl", parts / "b.jsonl.gz"], [str(parts / "*.jsonl*")]):
        profiles, report = run(tmp_path, sources, batch_records=333)
        assert report.records == 1200
        assert {u: p["counts"]["click"] for u, p in profiles.items()} == {
            u: e["counts"].get("click", 0) for u, e in expected.items()}
    with pytest.raises(SourceError, match="does not exist"):
        run(tmp_path, [tmp_path / "missing.jsonl"])
    with pytest.raises(SourceError, match="no file matches"):
        run(tmp_path, [str(tmp_path / "nothing-*.jsonl")])


def test_bad_lines_go_to_the_dead_letter_file_with_their_reason(tmp_path):
    events = generate(users=30, events=800, seed=9).events
    values, bad = corrupt_some(events, fraction=0.05, seed=2)
    (tmp_path / "log.jsonl").write_bytes(b"".join(v + b"\n" for v in values))
    profiles, report = run(tmp_path, [tmp_path / "log.jsonl"], batch_records=100)
    assert report.dead_letters == len(bad) and report.events == 800 - len(bad)
    lines = [orjson.loads(line) for line in (tmp_path / "dlq.jsonl").read_bytes().splitlines()]
    assert [(d["line"], d["reason"]) for d in lines] == [(i + 1, reason) for i, reason in sorted(bad.items())]
    for d in lines:
        assert base64.b64decode(d["value_base64"]) == values[d["line"] - 1]
        assert d["source"].endswith("log.jsonl") and d["detail"]
    valid = [e for i, e in enumerate(events) if i not in bad]
    assert {u: p["counts"] for u, p in profiles.items()} == {
        u: {t: e["counts"].get(t, 0) for t in ("search", "click", "add_to_cart", "purchase")}
        for u, e in expected_from_events(valid).items()}


def test_every_update_writes_one_profile_per_touched_user_per_batch(tmp_path):
    events = generate(users=20, events=600, seed=5).events
    write_jsonl(events, tmp_path / "log.jsonl")
    profiles_out = tmp_path / "profiles.jsonl"
    _, report = run(tmp_path, [tmp_path / "log.jsonl"], every_update=True, batch_records=100)
    lines = [orjson.loads(x) for x in profiles_out.read_bytes().splitlines()]
    touched = sum(len({str(e["user_id"]) for e in events[i:i + 100]}) for i in range(0, 600, 100))
    assert report.profiles == len(lines) >= touched  # plus idle re-scores
    final = {}
    for p in lines:
        final[p["user_id"]] = p
    assert {u: p["counts"]["click"] for u, p in final.items()} == {
        u: e["counts"].get("click", 0) for u, e in expected_from_events(events).items()}


def test_topic_replay_takes_exactly_the_events_in_the_time_range(kafka, unique, tmp_path):
    from datetime import datetime, timezone

    from tests.helpers import end_offsets

    log = generate(users=80, events=2000, seed=13, span_days=10)
    topic = unique("history")
    create_topics(kafka, {topic: 2})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events])
    ts = sorted(e["ts"] for e in log.events)
    start, end = ts[500], ts[1500]  # [from, to): events 500..1499 by event time

    def iso(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="milliseconds")

    uri = f"kafka://{topic}?from={iso(start)}&to={iso(end)}"
    settings = Settings(kafka=kafka, device=DEVICE)
    out = tmp_path / "p.jsonl"
    report = replay(settings, [uri], "jsonl", str(out), None, False, str(tmp_path / "state"),
                    str(tmp_path / "dlq.jsonl"), 300, show_progress=False)
    inside = [e for e in log.events if start <= e["ts"] < end]
    assert len(inside) == 1000
    assert report.events == 1000 and report.out_of_range == 1000 and report.records == 2000
    profiles = {p["user_id"]: p for p in map(orjson.loads, out.read_bytes().splitlines())}
    expected = expected_from_events(inside)
    assert set(profiles) == set(expected)
    for user, want in expected.items():
        assert profiles[user]["counts"] == {t: want["counts"].get(t, 0)
                                            for t in ("search", "click", "add_to_cart", "purchase")}
        assert profiles[user]["last_event_ts"] == want["last_ts"]
    # The snapshot says where a daemon started from it continues: at the first event past the range,
    # in each partition (the replay read to the end, but did not apply those).
    from tests.helpers import read_topic

    first_after = {}
    for record in read_topic(kafka, topic):
        if orjson.loads(record.value)["ts"] >= end:
            first_after.setdefault(str(record.partition), record.offset)
    _, meta = read_snapshot(tmp_path / "state")
    assert meta["kafka_offsets"][topic] == first_after
    assert all(first_after[str(p)] < o for p, o in end_offsets(kafka, topic).items())


def test_bad_kafka_uris_are_refused_clearly():
    from stream.sources import parse_kafka_uri

    assert parse_kafka_uri("kafka://t")[0] == "t"
    assert parse_kafka_uri("kafka://t?from=1000&to=2000")[1].end_ms == 2000
    for bad, why in [("kafka://", "is not kafka://"), ("kafka://t?since=1", "unknown parameter"),
                     ("kafka://t?from=yesterday", "ISO-8601"), ("kafka://t?from=2000&to=1000", "after from")]:
        with pytest.raises(SourceError, match=why):
            parse_kafka_uri(bad)


def test_backfill_then_go_live(kafka, settings_factory, unique, tmp_path):
    """Replay a topic offline into a snapshot, then start the daemon from it under a new group:
    it continues exactly where the replay stopped, and the result equals one uninterrupted run."""
    log = generate(users=150, events=3000, seed=17)
    topic = unique("events")
    create_topics(kafka, {topic: 4})
    keyed = [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events]
    produce(kafka, topic, keyed[:1700])
    settings = Settings(kafka=kafka, device=DEVICE)
    replay(settings, [f"kafka://{topic}"], "jsonl", str(tmp_path / "backfill.jsonl"), None, False,
           str(tmp_path / "state"), str(tmp_path / "dlq.jsonl"), 500, show_progress=False)
    produce(kafka, topic, keyed[1700:])  # live traffic arrives after the backfill

    live = run_until_drained(settings_factory(input_topics=(topic,), restore_from=str(tmp_path / "state")))
    reference = run_until_drained(settings_factory(input_topics=(topic,), group_id=unique("reference"),
                                                   output_topic=unique("reference-profiles")))  # one uninterrupted run
    a, b = live.updater.state.snapshot(), reference.updater.state.snapshot()
    idx = rows_of(a["user_ids"], b)
    assert sorted(a["user_ids"]) == sorted(b["user_ids"])
    np.testing.assert_array_equal(a["counts"], b["counts"][idx])  # nothing applied twice, nothing missed
    np.testing.assert_array_equal(a["spend_micros"], b["spend_micros"][idx])
    np.testing.assert_allclose(a["hidden"], b["hidden"][idx], atol=STATE_ATOL)
    assert live.stats.events == 1300  # the daemon itself only read what came after the replay


def test_go_live_after_a_replay_with_an_end_bound(kafka, settings_factory, unique, tmp_path):
    """A replay bounded by `to=` leaves the events past the bound unapplied: a daemon started from its
    snapshot reads them (and skips a late event the replay did apply), so nothing is lost or doubled."""
    log = generate(users=150, events=3000, seed=16).events
    bound = log[1700]["ts"]
    # One in-range event produced after the bound's events: the last event of a user with none at or
    # after the bound (its last by event time too, so that no batch orders that user's events otherwise).
    quiet = {str(e["user_id"]) for e in log} - {str(e["user_id"]) for e in log if e["ts"] >= bound}
    late = max(i for i, e in enumerate(log) if str(e["user_id"]) == min(quiet))
    order = log[:late] + log[late + 1:] + [log[late]]
    topic = unique("events")
    create_topics(kafka, {topic: 3})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in order])
    report = replay(Settings(kafka=kafka, device=DEVICE), [f"kafka://{topic}?to={bound}"], "jsonl", None, None,
                    False, str(tmp_path / "state"), str(tmp_path / "dlq.jsonl"), 500, show_progress=False)
    assert report.out_of_range == sum(e["ts"] >= bound for e in log) > 0

    live = run_until_drained(settings_factory(input_topics=(topic,), restore_from=str(tmp_path / "state")))
    reference = run_until_drained(settings_factory(input_topics=(topic,), group_id=unique("reference"),
                                                   output_topic=unique("reference-profiles")))
    a, b = live.updater.state.snapshot(), reference.updater.state.snapshot()
    idx = rows_of(a["user_ids"], b)
    assert sorted(a["user_ids"]) == sorted(b["user_ids"])
    np.testing.assert_array_equal(a["counts"], b["counts"][idx])
    np.testing.assert_allclose(a["hidden"], b["hidden"][idx], atol=STATE_ATOL)
    assert live.stats.events == report.out_of_range  # the daemon applied what the replay left...
    skipped = live.metrics.registry.get_sample_value("profiles_events_skipped_total", {"reason": "replayed"})
    assert skipped == 1  # ...and skipped the late event the replay had applied


def test_backfill_then_go_live_with_two_members(kafka, settings_factory, unique, tmp_path):
    """Two members start from one snapshot: each takes from it only the users of the partitions it is
    assigned (so neither holds, or re-scores when idle, a user whose events the other reads), and
    every user's state equals one uninterrupted run's."""
    from tests.helpers import run_members_until_drained

    log = generate(users=300, events=6000, seed=18)
    topic = unique("events")
    create_topics(kafka, {topic: 4})
    keyed = [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events]
    produce(kafka, topic, keyed[:3000])
    # Replayed under a default settings object: the snapshot records the replayed topic's partitions.
    replay(Settings(kafka=kafka, device=DEVICE), [f"kafka://{topic}"], "jsonl", None, None, False,
           str(tmp_path / "state"), str(tmp_path / "dlq.jsonl"), 500, show_progress=False)
    produce(kafka, topic, keyed[3000:])

    member = settings_factory(input_topics=(topic,), restore_from=str(tmp_path / "state"))
    live = run_members_until_drained([member, member])
    reference = run_until_drained(settings_factory(input_topics=(topic,), group_id=unique("reference"),
                                                   output_topic=unique("reference-profiles")))
    ref = reference.updater.state.snapshot()
    held: dict[str, tuple] = {}
    for daemon in live:
        state = daemon.updater.state.snapshot()
        owned = {p for _, p in daemon.assigned_when_drained}
        assert owned and set(state["partition"].tolist()) <= owned, "a member holds users of partitions it does not own"
        for i, user in enumerate(state["user_ids"]):
            assert user not in held, f"{user} is held by both members"
            held[user] = (state["counts"][i], state["spend_micros"][i], state["hidden"][i])
    assert sorted(held) == sorted(ref["user_ids"])
    for i, user in enumerate(ref["user_ids"]):
        counts, spend, hidden = held[user]
        np.testing.assert_array_equal(counts, ref["counts"][i])
        assert spend == ref["spend_micros"][i]
        np.testing.assert_allclose(hidden, ref["hidden"][i], atol=STATE_ATOL)


def test_a_snapshot_of_files_hands_each_user_over_at_its_first_event(tmp_path):
    """A snapshot replayed from files knows no partitions: its users enter the table at their first
    event, with their replayed state; an erased user does not come back from it."""
    from models.update_step import load_updater
    from stream.snapshot_files import read_snapshot
    from tests.helpers import record_batch

    log = generate(users=60, events=2000, seed=19).events
    write_jsonl(log[:1500], tmp_path / "old.jsonl")
    run(tmp_path, [tmp_path / "old.jsonl"], state_out=tmp_path / "state")
    snapshot, meta = read_snapshot(tmp_path / "state")
    assert (snapshot["partition"] == -1).all() and meta["input_topics"] == ["events"]

    settings = Settings(device=DEVICE, input_topics=("events",))
    whole = load_updater(settings)
    whole.process(record_batch(log[:1500], topic="file"))  # the replay's events (not from the topic: no watermark)
    whole.process(record_batch(log[1500:], first_offset=1500, partition=1))
    live = load_updater(settings)
    assert live.state.attach_base(snapshot, meta["input_topics"], settings.input_topics) == 60
    assert len(live.state) == 0 and live.state.load_base_partitions([0, 1, 2]) == 0  # no partitions known
    live.process(record_batch(log[1500:], first_offset=1500, partition=1))
    returning = {str(e["user_id"]) for e in log[1500:]}
    assert sorted(live.state.user_ids) == sorted(returning) and len(returning) < 60
    for user in returning:
        a, b = live.state.row(user), whole.state.row(user)
        np.testing.assert_array_equal(live.state.counts[a], whole.state.counts[b])
        assert live.state.partition[a] == 1
        torch.testing.assert_close(live.state.states[a], whole.state.states[b], atol=1e-5, rtol=1e-4)

    gone = next(u for u in snapshot["user_ids"] if u not in returning)
    live.state.forget([gone])
    again = next(e for e in log if str(e["user_id"]) == gone)
    live.process(record_batch([again], first_offset=5000, partition=1))
    assert live.state.counts[live.state.row(gone)].sum() == 1  # a fresh start, not the erased history


def test_a_snapshot_of_another_model_is_refused(kafka, settings_factory, tmp_path):
    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.kafka import StreamError
    from stream.metrics import Metrics
    from stream.snapshot_files import write_snapshot

    settings = settings_factory(restore_from=str(tmp_path / "s"))
    updater = load_updater(settings)
    write_snapshot(tmp_path / "s", updater.state.snapshot(), {"model_version": "gru-other"})
    import threading

    daemon = ProfileDaemon(settings, updater, Metrics(), threading.Event())
    with pytest.raises(StreamError, match="built by model 'gru-other'"):
        daemon.restore(str(tmp_path / "s"))
    with pytest.raises(StreamError, match="no readable state snapshot"):
        daemon.restore(str(tmp_path))
    # Refused before the daemon makes any topic (it made the output, dead-letter and state topics first).
    with pytest.raises(StreamError, match="built by model 'gru-other'"):
        ProfileDaemon(settings, updater, Metrics(), threading.Event()).run()
    from stream.kafka import admin_client

    assert settings.output_topic not in admin_client(settings.kafka).list_topics(timeout=10).topics


def test_a_snapshot_whose_users_are_named_otherwise_is_refused(settings_factory, tmp_path):
    """Raw ids in the snapshot, pseudonyms in the daemon (or another key): none of its users would ever be
    matched, and the backfill would be lost without a word (found by an audit)."""
    import threading

    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.kafka import StreamError
    from stream.metrics import Metrics
    from stream.snapshot_files import write_snapshot

    plain = load_updater(settings_factory())
    write_snapshot(tmp_path / "raw", plain.state.snapshot(), {"model_version": plain.state_version,
                                                              "user_ids": plain.user_ids})
    keyed = settings_factory(pseudonymize_key="k1")
    with pytest.raises(StreamError, match="holds raw user ids, but this daemon keeps pseudonyms"):
        ProfileDaemon(keyed, load_updater(keyed), Metrics(), threading.Event()).checked_snapshot(str(tmp_path / "raw"))
    other = load_updater(settings_factory(pseudonymize_key="k2"))
    write_snapshot(tmp_path / "k2", other.state.snapshot(), {"model_version": other.state_version,
                                                             "user_ids": other.user_ids})
    with pytest.raises(StreamError, match=r"\(another key\)"):
        ProfileDaemon(keyed, load_updater(keyed), Metrics(), threading.Event()).checked_snapshot(str(tmp_path / "k2"))
    same = load_updater(keyed)  # the same key: accepted
    write_snapshot(tmp_path / "k1", same.state.snapshot(), {"model_version": same.state_version,
                                                            "user_ids": same.user_ids})
    ProfileDaemon(keyed, same, Metrics(), threading.Event()).checked_snapshot(str(tmp_path / "k1"))


def test_a_model_calibrated_again_serves_the_state_of_the_model_it_came_from(kafka, settings_factory, tmp_path):
    """`profiles calibrate` changes only the probabilities' calibration: a daemon switched to its checkpoint
    restores the snapshot and changelog of the model it was calibrated from, and publishes its own version."""
    import threading

    from consumers.daemon import ProfileDaemon
    from models.checkpoint_io import load_checkpoint, save_checkpoint
    from models.update_step import load_updater
    from stream.metrics import Metrics
    from stream.snapshot_files import write_snapshot

    base = load_checkpoint("demo")
    with torch.no_grad():
        base.model.fields.event.calibration[1] -= 0.5
    save_checkpoint(tmp_path / "cal.pt", base.model, base.version + "+cal-test",
                    {**base.metadata, "state_version": base.version}, base.item_vocab)
    # (A snapshot without Kafka offsets, as from files: --snapshot-start says where the group starts.)
    settings = settings_factory(model_path=str(tmp_path / "cal.pt"), snapshot_start="earliest")
    updater = load_updater(settings)
    assert (updater.model_version, updater.state_version) == (base.version + "+cal-test", base.version)
    write_snapshot(tmp_path / "s", updater.state.snapshot(), {"model_version": base.version})
    daemon = ProfileDaemon(settings, updater, Metrics(), threading.Event())
    daemon.restore(str(tmp_path / "s"))
    assert daemon.changelog.model_version == base.version


def test_inspect_shows_a_users_timeline_and_plots_one_panel_per_field(tmp_path):
    from consumers.inspect import CHARTED, InspectError, plot, render_table, timeline

    log = generate(users=40, events=1500, seed=8)
    write_jsonl(log.events, tmp_path / "log.jsonl")
    user = max(log.users, key=lambda u: sum(str(e["user_id"]) == u for e in log.events))
    mine = [e for e in log.events if str(e["user_id"]) == user]
    settings = Settings(device=DEVICE, emit_embedding=False, idle_rescore_after_ms=0)
    tl = timeline(settings, [str(tmp_path / "log.jsonl")], "jsonl", user)
    rows = tl.events
    assert [r["event"]["event_id"] for r in rows] == [e["event_id"] for e in mine]
    assert [sum(r["profile"]["counts"].values()) for r in rows] == list(range(1, len(mine) + 1))
    assert rows[-1]["profile"]["spend"] * 1e6 == pytest.approx(expected_from_events(mine)[user]["spend_micros"])
    # Category shares are among all the log's categories, not only this user's.
    assert any(r["profile"]["top_categories"][0]["score"] < 1.0 for r in rows)
    # Without idle re-scores: the events, and the final profile a replay writes if the log goes on after them.
    assert [r["kind"] for r in tl.rows] == ["event"] * len(mine) + (["end"] if tl.log_end_ms > mine[-1]["ts"] else [])
    assert render_table(tl).row_count == len(tl.rows)

    png = tmp_path / "user.png"
    assert len(plot(tl, str(png)).axes) == len(CHARTED)
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 150 * len(CHARTED)
    with pytest.raises(InspectError, match="no valid events of user 'nobody'"):
        timeline(settings, [str(tmp_path / "log.jsonl")], "jsonl", "nobody")


def test_pseudonymized_replay_keeps_no_user_id_and_the_same_profiles(tmp_path):
    import hashlib
    import hmac

    log = generate(users=60, events=1500, seed=24)
    src = tmp_path / "events.jsonl"
    write_jsonl(log.events, src)
    plain, _ = run(tmp_path, [src])
    key = "rotate-me-yearly"
    out = tmp_path / "pseudonymous.jsonl"
    replay(Settings(device=DEVICE, pseudonymize_key=key), [str(src)], "jsonl", str(out), None, False, None,
           str(tmp_path / "dlq2.jsonl"), 50_000, show_progress=False)
    text = out.read_text()
    assert not any(f'"{user}"' in text for user in plain)  # no original id anywhere in the output
    hidden = {p["user_id"]: p for p in map(orjson.loads, text.splitlines())}

    def pseudonym(user: str) -> str:
        return hmac.new(key.encode(), user.encode(), hashlib.sha256).hexdigest()[:32]

    assert set(hidden) == {pseudonym(u) for u in plain}
    for user, profile in plain.items():  # same events, same counters, under the pseudonym
        assert hidden[pseudonym(user)]["counts"] == profile["counts"]
        assert hidden[pseudonym(user)]["spend"] == profile["spend"]


def test_every_source_is_a_batch_source(tmp_path):
    """The daemon's and the replay's sources share one contract (stream/sources.BatchSource)."""
    from consumers.source import KafkaBatchSource
    from stream.sources import BatchSource, FileSource

    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n')
    files = FileSource([path], 10)
    assert isinstance(files, BatchSource) and not files.exhausted and files.time_range is None
    batch = files.next_batch()
    assert batch.offsets == [1, 3] and batch.topics == [str(path)] * 2 and files.exhausted  # line numbers
    assert files.positions() == {} and files.progress() == (path.stat().st_size, path.stat().st_size)
    live = KafkaBatchSource(Settings(input_topics=("events",)), print, print, print)
    try:
        assert isinstance(live, BatchSource) and not live.exhausted and live.time_range is None
        assert live.positions() == {} and live.progress() == (0, 0)
    finally:
        live.close()


def test_go_live_from_a_replay_of_files_needs_to_be_told_where_to_start(kafka, settings_factory, unique, tmp_path):
    """A snapshot replayed from files records no Kafka offsets. Where the topic holds the files' events too,
    starting from its earliest offsets applied them a second time (found by an audit: counts doubled for
    395 of 456 users). The daemon refuses to guess; --snapshot-start at the time the files end continues
    exactly, as one uninterrupted run."""
    import threading
    import time

    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.kafka import StreamError
    from stream.metrics import Metrics
    from tests.helpers import wait_until

    log = generate(users=150, events=3000, seed=19)
    lines = [orjson.dumps(e) for e in log.events]
    (tmp_path / "history.jsonl").write_bytes(b"".join(line + b"\n" for line in lines[:1700]))
    replay(Settings(kafka=kafka, device=DEVICE), [str(tmp_path / "history.jsonl")], "jsonl", None, None, False,
           str(tmp_path / "state"), str(tmp_path / "dlq.jsonl"), 500, show_progress=False)
    topic = unique("events")
    create_topics(kafka, {topic: 4})
    keyed = [(str(e["user_id"]).encode(), line) for e, line in zip(log.events, lines)]
    produce(kafka, topic, keyed[:1700])  # the topic holds the files' events too
    files_end = int(time.time() * 1000) + 1
    wait_until(lambda: time.time() * 1000 > files_end, 5, "the clock to pass the files' end")
    produce(kafka, topic, keyed[1700:])

    unsure = settings_factory(input_topics=(topic,), restore_from=str(tmp_path / "state"))
    with pytest.raises(StreamError, match="records no offsets .* --snapshot-start"):
        ProfileDaemon(unsure, load_updater(unsure), Metrics(), threading.Event()).restore(str(tmp_path / "state"))

    live = run_until_drained(settings_factory(input_topics=(topic,), restore_from=str(tmp_path / "state"),
                                              snapshot_start=str(files_end)))
    reference = run_until_drained(settings_factory(input_topics=(topic,), group_id=unique("reference"),
                                                   output_topic=unique("reference-profiles")))
    assert live.stats.events == 1300  # only what came after the files
    # The users with events after the files (a file snapshot's others stay under the table until their next
    # event) hold what one uninterrupted run holds: nothing applied twice, nothing missed.
    a, b = live.updater.state.snapshot(), reference.updater.state.snapshot()
    assert set(a["user_ids"]) == {str(e["user_id"]) for e in log.events[1700:]}
    np.testing.assert_array_equal(a["counts"], b["counts"][rows_of(a["user_ids"], b)])
