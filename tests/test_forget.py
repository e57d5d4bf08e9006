"""Right to erasure: forget records in the input, `profiles forget`, and what a restarted daemon restores."""

from __future__ import annotations

import signal
import subprocess
import threading

import numpy as np
import orjson

from consumers.daemon import ProfileDaemon
from consumers.forget import control_record
from models.update_step import load_updater
from consumers.replay import replay
from stream.generator import generate, write_jsonl
from stream.metrics import Metrics
from stream.settings import Settings
from tests.helpers import DEVICE, create_topics, expected_from_events, latest_profiles, produce, read_topic, wait_until
from tests.helpers import profiles_command, published, record_batch, start_daemon
from tests.helpers import EVENTS



def user_state(updater, user: str) -> dict:
    snap = updater.state.snapshot()
    row = snap["user_ids"].index(user)
    return {"counts": snap["counts"][row].tolist(), "spend": int(snap["spend_micros"][row]),
            "hidden": snap["hidden"][row]}


def split_log(seed: int = 41):
    log = generate(users=12, events=400, seed=seed).events
    target = str(log[0]["user_id"])
    return log, target


def test_forget_mid_batch_erases_earlier_events_and_later_ones_start_afresh():
    log, target = split_log()
    cut = 250
    items = log[:cut] + [control_record(target)] + log[cut:]
    updater = load_updater(EVENTS)
    result = updater.process(record_batch(items))
    assert result.erased == [(target, 0)]
    # The reference: the same log in which the user's events before the forget never happened.
    reference = load_updater(EVENTS)
    reference.process(record_batch([e for e in log[:cut] if str(e["user_id"]) != target] + log[cut:]))
    later = [e for e in log[cut:] if str(e["user_id"]) == target]
    assert later, "the generator gave the target user no events after the cut: pick another seed"
    got, want = user_state(updater, target), user_state(reference, target)
    assert got["counts"] == want["counts"] == [
        sum(e["type"] == t for e in later) for t in ("search", "click", "add_to_cart", "purchase")]
    np.testing.assert_allclose(got["hidden"], want["hidden"], atol=1e-6)
    # Other users are untouched by the forget.
    others = [u for u in reference.state.user_ids if u != target]
    for user in others:
        assert user_state(updater, user)["counts"] == user_state(reference, user)["counts"], user


def test_forget_is_batching_invariant_and_skipped_when_re_read_after_new_events():
    log, target = split_log(seed=42)
    items = log[:200] + [control_record(target)] + log[200:]
    whole = load_updater(EVENTS)
    whole.process(record_batch(items))
    small = load_updater(EVENTS)
    for start in range(0, len(items), 37):
        small.process(record_batch(items[start:start + 37], first_offset=start))
    assert user_state(small, target)["counts"] == user_state(whole, target)["counts"]
    np.testing.assert_allclose(user_state(small, target)["hidden"], user_state(whole, target)["hidden"], atol=1e-6)
    # A restart re-reads the forget (offset 200) after the user had new events: the forget is at or
    # below the user's watermark, so it must not erase those newer events.
    before = user_state(whole, target)
    again = whole.process(record_batch(items[200:260], first_offset=200))
    assert again.erased == [] and user_state(whole, target)["counts"] == before["counts"]


def test_forget_on_another_partition_than_the_users_state_is_ignored():
    log, target = split_log(seed=43)
    updater = load_updater(EVENTS)
    updater.process(record_batch(log, partition=1))
    result = updater.process(record_batch([control_record(target)], first_offset=10_000, partition=3))
    assert result.erased == [] and target in updater.state.user_ids
    result = updater.process(record_batch([control_record(target)], first_offset=10_000, partition=1))
    assert result.erased == [(target, 1)] and target not in updater.state.user_ids


def test_forget_by_raw_id_erases_the_pseudonymised_user():
    log, target = split_log(seed=44)
    settings = Settings(device=DEVICE, input_topics=("events",), pseudonymize_key="k3y")
    updater = load_updater(settings)
    updater.process(record_batch(log))
    pseudonym = updater.pseudonymize.one(target)
    assert pseudonym in updater.state.user_ids
    result = updater.process(record_batch([control_record(target)], first_offset=len(log)))
    assert result.erased == [(pseudonym, 0)] and pseudonym not in updater.state.user_ids


def test_replay_honours_forget_records_in_the_log(tmp_path):
    log, target = split_log(seed=45)
    src = tmp_path / "log.jsonl"
    write_jsonl(log, src)
    with open(src, "ab") as f:
        f.write(control_record(target) + b"\n")
    out, updates = tmp_path / "final.jsonl", tmp_path / "updates.jsonl"
    report = replay(EVENTS, [str(src)], "jsonl", str(out), None, False, None, str(tmp_path / "d"), 100,
                    show_progress=False)
    users = {orjson.loads(line)["user_id"] for line in out.read_bytes().splitlines()}
    assert report.erased == 1 and report.dead_letters == 0
    assert target not in users and users == {str(e["user_id"]) for e in log} - {target}
    replay(EVENTS, [str(src)], "jsonl", str(updates), None, True, None, str(tmp_path / "d2"), 100, show_progress=False)
    last = orjson.loads(updates.read_bytes().splitlines()[-1])
    assert last == {"user_id": target, "erased": True}


def test_unknown_control_records_are_dead_letters():
    updater = load_updater(EVENTS)
    result = updater.process(record_batch([b'{"control": "shred", "user_id": "u1"}', b'{"control": "forget"}',
                                           b'{"control": "forget", "user_id": "\\u0000meta"}']))
    # (the last would write a tombstone keyed as the state topic's meta record)
    assert [d.reason for d in result.dead_letters] == ["unknown_type", "missing_field", "invalid_field"]


def test_profiles_forget_erases_the_user_everywhere_and_a_restart_restores_no_trace(kafka, unique):
    log = generate(users=300, events=6000, seed=46).events
    target = str(log[0]["user_id"])
    topic, out, group = unique("events"), unique("profiles"), unique("group")
    create_topics(kafka, {topic: 4})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    args = ("--input-topics", topic, "--output-topic", out, "--group-id", group)
    proc = start_daemon(kafka, *args)
    try:
        wait_until(lambda: proc.poll() is not None or published(kafka, out) > 0, 90, "the first profiles")
        wait_until(lambda: proc.poll() is not None or target in latest_profiles(kafka, out)[0], 60,
                   "the target's profile")
        wait_until(lambda: proc.poll() is not None or published(kafka, f"{group}.state") > 0, 30, "changelog")
        forget = subprocess.run(profiles_command() + ["forget", target, "--bootstrap-servers", kafka.bootstrap_servers,
                                                      "--input-topics", topic, "--group-id", group, "--wait", "60s"],
                                capture_output=True, timeout=120)
        assert forget.returncode == 0, forget.stderr.decode()[-2000:]
        assert "the partition holding its state; erased" in forget.stdout.decode()
        # The user comes back later: only events after the forget count.
        again = [dict(e, event_id=f"again-{i}", ts=e["ts"] + 10**9) for i, e in enumerate(log)
                 if str(e["user_id"]) == target][:3]
        produce(kafka, topic, [(target.encode(), orjson.dumps(e)) for e in again])
        wait_until(lambda: proc.poll() is not None or
                   latest_profiles(kafka, out)[0].get(target, {}).get("counts", {}).get(again[0]["type"]) == 1
                   and sum(latest_profiles(kafka, out)[0][target]["counts"].values()) == len(again), 60,
                   "the target's new profile")
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-2000:]

    # The output topic: a tombstone for the target between its old and new profiles.
    values = [r.value for r in read_topic(kafka, out) if r.key == target.encode()]
    first_tombstone = values.index(None)
    assert first_tombstone > 0 and values[-1] is not None

    # What a restarted daemon restores: every other user exactly, the target only with its new events.
    settings = Settings(kafka=kafka, input_topics=(topic,), output_topic=out, group_id=group, device=DEVICE)
    daemon = ProfileDaemon(settings, load_updater(settings), Metrics(), threading.Event())
    daemon.restore_partitions([0, 1, 2, 3])
    state = daemon.updater.state.snapshot()
    want = expected_from_events([e for e in log if str(e["user_id"]) != target] + again)
    assert sorted(state["user_ids"]) == sorted(want)
    row = state["user_ids"].index(target)
    assert state["counts"][row].sum() == len(again) and state["last_ts"][row] == max(e["ts"] for e in again)
    daemon.source.close()


def test_forget_of_a_user_not_in_state_asks_every_partition(kafka, unique):
    topic, group = unique("events"), unique("group")
    create_topics(kafka, {topic: 3})
    forget = subprocess.run(profiles_command() + ["forget", "nobody", "--bootstrap-servers", kafka.bootstrap_servers,
                                                  "--input-topics", topic, "--group-id", group],
                            capture_output=True, timeout=60)
    assert forget.returncode == 0, forget.stderr.decode()[-2000:]
    assert "all 3 partitions" in forget.stdout.decode()
    written = read_topic(kafka, topic)
    assert sorted(r.partition for r in written) == [0, 1, 2]
    assert all(orjson.loads(r.value)["control"] == "forget" and r.key == b"nobody" for r in written)


def test_forget_with_repartition_writes_one_record_the_daemon_re_keys(kafka, unique):
    topic, group = unique("events"), unique("group")
    create_topics(kafka, {topic: 3})
    forget = subprocess.run(profiles_command() + ["forget", "nobody", "--bootstrap-servers", kafka.bootstrap_servers,
                                                  "--input-topics", topic, "--group-id", group, "--repartition"],
                            capture_output=True, timeout=60)
    assert forget.returncode == 0, forget.stderr.decode()[-2000:]
    assert "re-keyed to the user's partition by the daemon" in forget.stdout.decode()
    written = read_topic(kafka, topic)
    assert [(r.partition, r.key, orjson.loads(r.value)["control"]) for r in written] == [(0, b"nobody", "forget")]


def test_forget_leaves_no_raw_id_in_the_pseudonym_cache_and_counts_only_users_it_erased():
    log, target = split_log(seed=47)
    updater = load_updater(Settings(device=DEVICE, input_topics=("events",), pseudonymize_key="k3y"))
    updater.process(record_batch(log))
    assert target in updater.pseudonymize  # the cache holds raw id -> pseudonym for users it saw
    result = updater.process(record_batch([control_record(target), control_record("never-seen")], first_offset=len(log)))
    assert len(result.erased) == 2  # tombstones for both: forget cannot tell who a partition held
    assert result.forgotten == 1  # ...but only the user with state was erased
    assert target not in updater.pseudonymize and "never-seen" not in updater.pseudonymize
    # Events earlier in the same batch are data too: their user counts as erased.
    mixed = updater.process(record_batch([log[0], control_record(str(log[0]["user_id"]))], first_offset=10_000))
    assert mixed.forgotten == 1


def test_the_forgotten_counter_on_the_broker_counts_erased_users_not_forget_records(kafka, settings_factory):
    from consumers.forget import forget_users
    from tests.helpers import run_until_drained

    settings = settings_factory(pseudonymize_key="k3y")
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 3})
    log = generate(users=30, events=600, seed=48).events
    target = str(log[0]["user_id"])
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    # No changelog yet: each forget record goes to all 3 partitions; one user has state, the other never had.
    requests = forget_users(settings, [target, "never-seen"])
    assert [len(r.partitions) for r in requests] == [3, 3]

    daemon = run_until_drained(settings)

    assert daemon.metrics.registry.get_sample_value("profiles_users_forgotten_total") == 1
    pseudonym = daemon.updater.pseudonymize.one(target)
    assert pseudonym not in daemon.updater.state.user_ids
    assert target not in daemon.updater.pseudonymize and "never-seen" not in daemon.updater.pseudonymize
    profiles, _ = latest_profiles(kafka, settings.output_topic)
    assert pseudonym not in profiles and len(profiles) == len({str(e["user_id"]) for e in log}) - 1


SECRET, SHARED, OTHER = "zz.only-the-erased-user", "books.cooking", "shoes.running"


def few_categories_log() -> list[dict]:
    """Three users over three categories: "u-secret" alone brings SECRET (and shares SHARED with
    "u-books"); "u-shoes" has OTHER. With three categories seen, every profile's top 3 lists all three."""
    plan = [("u-secret", SECRET), ("u-secret", SECRET), ("u-secret", SHARED), ("u-books", SHARED),
            ("u-books", SHARED), ("u-shoes", OTHER), ("u-shoes", OTHER), ("u-secret", SECRET)]
    return [{"event_id": f"e{i}", "user_id": user, "type": "click", "ts": 1_700_000_000_000 + i * 60_000,
             "item_id": f"i{i}", "category": category, "price": 10.0} for i, (user, category) in enumerate(plan)]


def top_categories(profiles: list[tuple[bytes, bytes]] | dict[str, dict]) -> dict[str, set[str]]:
    if not isinstance(profiles, dict):
        profiles = {k.decode(): orjson.loads(v) for k, v in profiles}
    return {user: {c["category"] for c in p["top_categories"]} for user, p in profiles.items()}


def test_forget_drops_a_category_only_the_erased_user_brought_and_keeps_a_shared_one():
    log = few_categories_log()
    updater = load_updater(EVENTS)
    updater.process(record_batch(log))
    assert set(updater.state.category_names.values()) == {SECRET, SHARED, OTHER}
    before = top_categories(updater.profiles_for(np.arange(len(updater.state))))
    assert SECRET in before["u-books"] and SECRET in before["u-shoes"]  # why it matters: others show it

    updater.process(record_batch([control_record("u-secret")], first_offset=len(log)))
    assert set(updater.state.category_names.values()) == {SHARED, OTHER}
    assert set(updater.state.snapshot()["category_names"].values()) == {SHARED, OTHER}
    after = top_categories(updater.profiles_for(np.arange(len(updater.state))))
    assert after == {"u-books": {SHARED, OTHER}, "u-shoes": {SHARED, OTHER}}

    # The category comes back when a user's events bring it again.
    back = dict(log[0], event_id="again", user_id="u-shoes", ts=log[-1]["ts"] + 60_000)
    updater.process(record_batch([back], first_offset=len(log) + 1))
    assert set(updater.state.category_names.values()) == {SECRET, SHARED, OTHER}


def test_an_erased_users_own_category_stays_gone_after_a_restore_from_the_changelog(kafka, settings_factory):
    from consumers.forget import forget_users
    from tests.helpers import run_until_drained

    settings = settings_factory()
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    log = few_categories_log()
    produce(kafka, topic, [(e["user_id"].encode(), orjson.dumps(e)) for e in log])
    first = run_until_drained(settings)
    assert set(first.updater.state.category_names.values()) == {SECRET, SHARED, OTHER}
    published_before = top_categories(latest_profiles(kafka, settings.output_topic)[0])
    assert SECRET in published_before["u-books"]

    # The forget goes to the partition holding the user's state; the daemon restores the others from
    # the changelog and gets a batch of the forget record alone (no user's state changes in it).
    forget_users(settings, ["u-secret"])
    erasing = run_until_drained(settings)
    assert set(erasing.updater.state.category_names.values()) == {SHARED, OTHER}
    assert set(erasing.updater.state.snapshot()["category_names"].values()) == {SHARED, OTHER}

    # A restart restores from the changelog (no compaction on this broker: the latest meta record wins)
    # and publishes the others' profiles without the erased user's category.
    more = [dict(e, event_id=f"more-{e['event_id']}", ts=e["ts"] + 10**7) for e in log if e["user_id"] != "u-secret"]
    produce(kafka, topic, [(e["user_id"].encode(), orjson.dumps(e)) for e in more])
    restarted = run_until_drained(settings)
    assert set(restarted.updater.state.category_names.values()) == {SHARED, OTHER}
    published = top_categories(latest_profiles(kafka, settings.output_topic)[0])
    assert "u-secret" not in published
    assert published == {"u-books": {SHARED, OTHER}, "u-shoes": {SHARED, OTHER}}
