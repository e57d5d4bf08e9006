"""Exactly-once state: watermarks, duplicate event ids, the state changelog, and SIGKILL at random moments."""

from __future__ import annotations

import os
import random
import signal

import numpy as np
import orjson
import torch

from models.update_step import load_updater
from consumers.replay import replay
from stream.generator import generate, write_jsonl
from stream.settings import Settings
from stream.state import StateTable
from tests.helpers import DEVICE, EVENTS, committed_offsets, create_topics, end_offsets, latest_profiles, produce, wait_until
from tests.helpers import STATE_ATOL, published, record_batch, start_daemon




def test_re_consumed_records_are_skipped_by_watermark():
    log = generate(users=30, events=600, seed=31).events
    updater = load_updater(EVENTS)
    updater.process(record_batch(log[:400]))
    before = updater.state.snapshot()
    again = updater.process(record_batch(log[:400]))  # a restart re-reads records it had applied
    assert again.replayed == 400 and len(again.profiles) == len({e["user_id"] for e in log[:400]})
    after = updater.state.snapshot()
    for name in ("counts", "spend_micros", "last_ts", "watermark"):
        np.testing.assert_array_equal(before[name], after[name])
    np.testing.assert_array_equal(before["hidden"], after["hidden"])
    # Overlapping re-delivery: only the records past the watermark are applied.
    tail = updater.process(record_batch(log[300:], first_offset=300))
    assert tail.replayed == 100 and len(tail.events) == 200
    whole = load_updater(EVENTS)
    whole.process(record_batch(log))
    np.testing.assert_array_equal(updater.state.snapshot()["counts"], whole.state.snapshot()["counts"])


def test_duplicate_event_ids_are_applied_once():
    log = generate(users=20, events=300, seed=32).events
    rng = random.Random(3)
    duplicated = list(log)
    for i in sorted(rng.sample(range(len(log)), 40), reverse=True):  # re-sent a little later, new offsets
        duplicated.insert(min(i + rng.randint(0, 4), len(duplicated)), log[i])
    once, twice = load_updater(EVENTS), load_updater(EVENTS)
    once.process(record_batch(log))
    results = [twice.process(record_batch(duplicated[i:i + 50], first_offset=i)) for i in range(0, len(duplicated), 50)]
    assert sum(r.duplicates for r in results) == 40
    a, b = once.state.snapshot(), twice.state.snapshot()
    by_user = {u: i for i, u in enumerate(b["user_ids"])}
    order = [by_user[u] for u in a["user_ids"]]
    np.testing.assert_array_equal(a["counts"], b["counts"][order])
    np.testing.assert_array_equal(a["spend_micros"], b["spend_micros"][order])


def test_an_integer_event_id_and_its_decimal_string_are_the_same_event():
    click = {"event_id": 7, "user_id": "u1", "type": "click", "ts": 1_700_000_000_000, "item_id": "i1"}
    updater = load_updater(EVENTS)
    first = updater.process(record_batch([click]))
    again = updater.process(record_batch([{**click, "event_id": "7"}], first_offset=1))  # re-sent by another producer
    assert len(first.events) == 1 and again.duplicates == 1 and len(again.events) == 0


def test_changelog_records_rebuild_the_same_state():
    log = generate(users=50, events=1000, seed=33).events
    updater = load_updater(EVENTS)
    updater.process(record_batch(log, partition=2))
    state = updater.state
    rows = np.arange(len(state))
    records = dict(zip((u.encode() for u in state.user_ids), state.changelog_values(rows)))
    restored = StateTable(state.state_size, torch.device(DEVICE), watermark_slots=1,
                          dedupe_window=state.dedupe_window)
    assert restored.load_changelog(records) == len(state)
    a, b = state.snapshot(), restored.snapshot()
    assert a["user_ids"] == b["user_ids"]
    for name in state.columns:
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(a["hidden"], b["hidden"])
    assert set(b["partition"].tolist()) == {2}
    # A tombstone erases the user.
    gone = state.user_ids[0]
    restored.load_changelog({gone.encode(): None})
    assert gone not in restored.snapshot()["user_ids"] and len(restored) == len(state) - 1


def reference_profiles(events: list[dict], tmp_path) -> dict[str, dict]:
    """One uninterrupted pass over the events (a replay: equal to a streamed run by the invariance tests)."""
    src, out = tmp_path / "reference-events.jsonl", tmp_path / "reference.jsonl"
    write_jsonl(events, src)
    replay(Settings(device=DEVICE), [str(src)], "jsonl", str(out), None, False, None, str(tmp_path / "ref.dlq"),
           50_000, show_progress=False)
    return {p["user_id"]: p for p in map(orjson.loads, out.read_bytes().splitlines())}


def assert_same_profiles(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert set(got) == set(want)
    for user, profile in want.items():
        assert got[user]["counts"] == profile["counts"], user
        assert got[user]["spend"] == profile["spend"], user
        assert got[user]["last_event_ts"] == profile["last_event_ts"], user
        np.testing.assert_allclose(got[user]["embedding"], profile["embedding"], atol=STATE_ATOL, err_msg=user)


def stacks_then_kill(proc, timeout_s: float = 10) -> bytes:
    """A daemon's stderr, ending with every thread's stack (SIGUSR1: faulthandler), after which it is killed."""
    if proc.poll() is None:
        os.set_blocking(proc.stderr.fileno(), False)
        proc.send_signal(signal.SIGUSR1)
        seen = bytearray()

        def dumped() -> bool:  # the dump ends at the main thread's outermost frame
            seen.extend(proc.stderr.read() or b"")
            start = seen.find(b"most recent call first")
            return proc.poll() is not None or (start >= 0 and b"in <module>" in seen[start:])

        try:
            wait_until(dumped, timeout_s, "the stack dump", interval_s=0.05)
        except AssertionError:
            pass  # no complete dump: show what there is
        finally:
            proc.kill()
            os.set_blocking(proc.stderr.fileno(), True)
        return bytes(seen) + proc.communicate(timeout=30)[1]
    return proc.communicate(timeout=30)[1]


def kill_at_random_moments(kafka, args: tuple, out: str, group: str, topic: str, ends: dict, kills: int,
                           most_records: int, seed: int) -> None:
    """Start the daemon `kills` times and SIGKILL it each time after 200..`most_records` more output records,
    always before the log is drained."""
    rng = random.Random(seed)
    for _ in range(kills):
        proc = start_daemon(kafka, *args)
        try:
            target = published(kafka, out) + rng.randint(200, most_records)
            wait_until(lambda: proc.poll() is not None or published(kafka, out) > target, 120,
                       "progress before the kill", interval_s=0.05)
            assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
            assert committed_offsets(kafka, group, topic) != ends, "the log was drained before the kill"
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()


def drain_with_a_new_daemon(kafka, args: tuple, group: str, topic: str, ends: dict, what: str) -> str:
    """Start the daemon once more, let it drain the log, stop it cleanly; its stderr."""
    proc = start_daemon(kafka, *args)
    try:
        return drain_then_stop(proc, kafka, group, topic, ends, what)
    finally:
        if proc.poll() is None:
            proc.kill()


def drain_then_stop(proc, kafka, group: str, topic: str, ends: dict, what: str, timeout_s: float = 180) -> str:
    """Wait until `proc` has committed the whole log, stop it with SIGTERM, return its stderr. On a
    timeout the failure shows where the daemon stood (SIGUSR1: every thread's stack) and its log."""
    try:
        wait_until(lambda: proc.poll() is not None or committed_offsets(kafka, group, topic) == ends, timeout_s, what)
    except AssertionError as exc:
        stderr = stacks_then_kill(proc)
        raise AssertionError(f"{exc}; committed {committed_offsets(kafka, group, topic)} of {ends}\n"
                             + stderr.decode()[-6000:]) from None
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    return stderr.decode()


def logged_run(kafka, unique, users: int, events: int, seed: int):
    """A generated log in a fresh 4-partition topic, and the `profiles run` flags for it:
    (events, topic, output topic, group, end offsets, flags)."""
    log = generate(users=users, events=events, seed=seed).events
    topic, out, group = unique("events"), unique("profiles"), unique("group")
    create_topics(kafka, {topic: 4})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    # Small batches: the log takes long enough that each kill lands mid-stream.
    # No event-id dedupe: it would also catch re-consumed events; the watermarks alone must hold.
    args = ("--input-topics", topic, "--output-topic", out, "--group-id", group,
            "--batch-max-events", "25", "--batch-max-ms", "50", "--dedupe-window", "0")
    return log, topic, out, group, end_offsets(kafka, topic), args


def test_sigkill_at_random_moments_changes_nothing(kafka, unique, tmp_path):
    log, topic, out, group, ends, args = logged_run(kafka, unique, users=2000, events=50_000, seed=34)
    kill_at_random_moments(kafka, args, out, group, topic, ends, kills=5, most_records=3000, seed=7)
    drain_with_a_new_daemon(kafka, args, group, topic, ends, "the log to be drained after five kills")
    profiles, _ = latest_profiles(kafka, out)
    assert_same_profiles(profiles, reference_profiles(log, tmp_path))


def test_two_instances_one_killed_equal_one_uninterrupted(kafka, unique, tmp_path):
    log, topic, out, group, ends, args = logged_run(kafka, unique, users=3000, events=60_000, seed=35)
    first = start_daemon(kafka, *args)
    second = start_daemon(kafka, *args)
    first_log = bytearray()
    os.set_blocking(first.stderr.fileno(), False)

    def first_owns() -> list[int]:
        """The partitions the first member was last assigned (its log says), read as the log grows."""
        first_log.extend(first.stderr.read() or b"")
        assigned = [line for line in first_log.decode(errors="replace").splitlines() if " assigned " in line]
        return [int(name.split("[")[1].rstrip("]")) for name in assigned[-1].split(" assigned ")[1].split(", ")
                if name.startswith(f"{topic}[")] if assigned else []

    try:
        # Both members own partitions and the first has committed progress on its own when it is killed.
        # (One member can start alone and be joined a rebalance later, so wait for the first's assignment.)
        wait_until(lambda: first.poll() is not None or first_owns(), 120, "the first member's assignment")
        at_assignment = committed_offsets(kafka, group, topic)
        wait_until(lambda: first.poll() is not None or any(
            committed_offsets(kafka, group, topic)[p] > at_assignment[p] + 500 for p in first_owns()),
            120, "the first member's progress")
        assert first.poll() is None and second.poll() is None
        assert committed_offsets(kafka, group, topic) != ends, "the log was drained before the kill"
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        # The survivor takes over the dead member's partitions (after its session times out) and their state.
        stderr = drain_then_stop(second, kafka, group, topic, ends, "the survivor to drain the log")
        restores = [int(line.split("restored ")[1].split()[0]) for line in stderr.splitlines()
                    if "restored " in line and " users of partition" in line]
        assert any(n > 0 for n in restores), "the survivor restored the dead member's users"
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    profiles, _ = latest_profiles(kafka, out)
    assert_same_profiles(profiles, reference_profiles(log, tmp_path))


def test_exactly_once_mode_survives_sigkill(kafka, unique, tmp_path):
    """--guarantee exactly-once: output, changelog and offsets in one transaction per batch; killed
    mid-transaction three times, the final profiles equal one uninterrupted pass."""
    log, topic, out, group, ends, args = logged_run(kafka, unique, users=2000, events=40_000, seed=36)
    # A stable transactional id, as a StatefulSet would give: each restart aborts the killed one's open
    # transaction. (Tansu never times transactions out; with a fresh id per start the dead transaction's
    # pending offsets would hold back the group's later offset commits for ever.)
    args = (*args, "--guarantee", "exactly-once", "--transactional-id", f"{group}-0")
    kill_at_random_moments(kafka, args, out, group, topic, ends, kills=3, most_records=1500, seed=8)
    drain_with_a_new_daemon(kafka, args, group, topic, ends, "the log to be drained after three kills")
    profiles, _ = latest_profiles(kafka, out)
    assert_same_profiles(profiles, reference_profiles(log, tmp_path))


def test_aborted_transaction_is_produced_again(kafka, unique, tmp_path, monkeypatch):
    """An abortable transaction failure (injected once into a real broker's transaction) aborts it; the
    daemon produces its users' state and profiles again in a new transaction with the same offsets."""
    from confluent_kafka import KafkaError, KafkaException

    from stream.kafka import Publisher
    from tests.helpers import run_until_drained

    log, topic, out, group, ends, _ = logged_run(kafka, unique, users=300, events=5000, seed=37)
    real_commit, calls = Publisher.commit, []

    def commit_failing_once(self, offsets, group_metadata, timeout_s=60.0):
        calls.append(len(offsets))
        if len(calls) == 3:
            raise KafkaException(KafkaError(KafkaError._STATE, "injected abortable failure", txn_requires_abort=True))
        return real_commit(self, offsets, group_metadata, timeout_s)

    monkeypatch.setattr(Publisher, "commit", commit_failing_once)
    settings = Settings(kafka=kafka, input_topics=(topic,), output_topic=out, group_id=group, device=DEVICE,
                        batch_max_events=250, session_timeout_ms=6000, guarantee="exactly-once")
    daemon = run_until_drained(settings)
    assert daemon.metrics.registry.get_sample_value("profiles_transaction_failures_total") == 1
    assert daemon.changelog.resent > 0
    assert committed_offsets(kafka, group, topic) == ends
    profiles, records = latest_profiles(kafka, out)
    # The aborted transaction's profiles may or may not have reached the log (abort purges what is still
    # queued); read uncommitted, every profile of every batch is there once, the re-sent ones at most twice.
    assert daemon.stats.profiles <= records <= daemon.stats.profiles + daemon.changelog.resent
    assert_same_profiles(profiles, reference_profiles(log, tmp_path))
