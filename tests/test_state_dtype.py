"""--state-dtype float16 (the default): the model state stored in half float32's bytes, computed in float32, carried
by the changelog and snapshots in its own layout; counters unchanged, learned fields moved by rounding only. A
restore reads records and snapshots of either layout, so a switch (or the default's move) keeps the state."""

from __future__ import annotations

import dataclasses

import numpy as np
import orjson
import pytest
import torch

from models.update_step import load_updater
from stream.changelog_records import META_KEY, RefusedRecords
from stream.events import EVENT_TYPES
from stream.generator import generate, write_jsonl
from stream.settings import Settings
from stream.state import StateTable
from tests.helpers import (
    DEVICE, create_topics, expected_from_events, produce, read_topic, record_batch, replayed_log,
    run_until_drained)

def replayed(tmp_path, state_dtype: str) -> tuple[dict[str, dict], dict]:
    return replayed_log(Settings(device=DEVICE, state_dtype=state_dtype), tmp_path / "log.jsonl", state_dtype, 700)


def test_a_float16_replay_keeps_the_counters_and_moves_the_state_by_rounding_only(tmp_path):
    write_jsonl(generate(users=150, events=4000, seed=5).events, tmp_path / "log.jsonl")
    full, full_state = replayed(tmp_path, "float32")
    half, half_state = replayed(tmp_path, "float16")
    assert half_state["hidden"].dtype == np.float16 and full_state["hidden"].dtype == np.float32
    assert half_state["user_ids"] == full_state["user_ids"]
    for name in ("counts", "spend_micros", "last_ts", "cat_key", "sessions"):
        np.testing.assert_array_equal(half_state[name], full_state[name])
    # Rounded at every batch (6 of them), the state drifts by about float16's resolution, not more.
    np.testing.assert_allclose(half_state["hidden"], full_state["hidden"], atol=5e-3)
    assert not np.array_equal(half_state["hidden"].astype(np.float32), full_state["hidden"]), "stored in half"
    assert set(half) == set(full)
    for user, profile in full.items():
        assert half[user]["counts"] == profile["counts"] and half[user]["spend"] == profile["spend"]
        assert abs(half[user]["churn_risk"] - profile["churn_risk"]) < 5e-3
        np.testing.assert_allclose(half[user]["embedding"], profile["embedding"], atol=5e-3)


def test_float16_halves_the_states_bytes_and_its_records():
    full = StateTable(80, torch.device(DEVICE), watermark_slots=1, dedupe_window=8)
    half = StateTable(80, torch.device(DEVICE), watermark_slots=1, dedupe_window=8, state_dtype=torch.float16)
    for table in (full, half):
        table.rows_for([f"u{i}" for i in range(100)])
    assert full.state_bytes()["host"] == half.state_bytes()["host"]
    device = str(full.device)
    assert full.state_bytes()[device] == 100 * 80 * 4 and half.state_bytes()[device] == 100 * 80 * 2
    assert full.record_dtype().itemsize - half.record_dtype().itemsize == 80 * 2


def changelog_of(state_dtype: str) -> tuple[StateTable, dict[bytes, bytes]]:
    updater = load_updater(Settings(device=DEVICE, input_topics=("events",), state_dtype=state_dtype))
    updater.process(record_batch(generate(users=40, events=800, seed=8).events))
    state = updater.state
    return state, dict(zip((u.encode() for u in state.user_ids), state.changelog_values(np.arange(len(state)))))


def table_like(state: StateTable, state_dtype: torch.dtype) -> StateTable:
    return StateTable(state.state_size, torch.device(DEVICE), watermark_slots=1, dedupe_window=state.dedupe_window,
                      state_dtype=state_dtype)


def test_a_changelog_of_either_dtype_restores_into_a_table_of_either():
    half, half_records = changelog_of("float16")
    full, full_records = changelog_of("float32")
    assert half.states.dtype == torch.float16 and full.states.dtype == torch.float32
    assert Settings().state_dtype == "float16", "the default"
    for records, written in ((half_records, half), (full_records, full)):
        for dtype in (torch.float16, torch.float32):
            restored = table_like(written, dtype)
            assert restored.load_changelog(records) == len(written)
            assert restored.states.dtype == dtype and restored.user_ids == written.user_ids
            # float16 into float32 is exact; float32 into float16 rounds as storing it would have.
            np.testing.assert_array_equal(restored.snapshot()["hidden"],
                                          written.snapshot()["hidden"].astype(restored.snapshot()["hidden"].dtype))
            np.testing.assert_array_equal(restored.snapshot()["counts"], written.snapshot()["counts"])
    # Users written before a switch and others after it, in one batch: each record read by its own layout.
    users = list(full_records)
    mixed = {u: (full_records if i % 2 else half_records)[u] for i, u in enumerate(users)}
    restored = table_like(half, torch.float16)
    assert restored.load_changelog(mixed) == len(users)
    expected = np.where((np.arange(len(users)) % 2 == 1)[:, None], full.snapshot()["hidden"].astype(np.float16),
                        half.snapshot()["hidden"])
    np.testing.assert_array_equal(restored.snapshot()["hidden"], expected)
    # A record of neither layout (another model's state size) is still refused, with both sizes named.
    short = {users[0]: full_records[users[0]][:-2]}
    sizes = f"expected {len(half_records[users[0]])} or {len(full_records[users[0]])}"
    with pytest.raises(RefusedRecords, match=sizes):
        table_like(half, torch.float16).load_changelog(short)


def test_a_snapshot_crosses_dtypes_by_rounding():
    full = StateTable(6, torch.device(DEVICE), watermark_slots=1)
    full.rows_for(["a", "b", "c"])
    full.states[:3] = torch.tensor(np.random.default_rng(1).standard_normal((3, 6)), dtype=torch.float32)
    half = StateTable(6, torch.device(DEVICE), watermark_slots=1, state_dtype=torch.float16)
    half.restore(full.snapshot())
    assert half.states.dtype == torch.float16 and half.user_ids == ["a", "b", "c"]
    np.testing.assert_array_equal(half.states[:3].cpu().numpy(), full.states[:3].cpu().numpy().astype(np.float16))


def test_the_daemon_writes_float16_records_its_next_owner_restores(kafka, settings_factory):
    settings = settings_factory(batch_max_events=300)  # float16 by default
    create_topics(kafka, {settings.input_topics[0]: 2})
    log = generate(users=60, events=1200, seed=13).events
    produce(kafka, settings.input_topics[0], [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log])
    daemon = run_until_drained(settings)
    held = daemon.updater.state.snapshot()
    assert held["hidden"].dtype == np.float16 and len(held["user_ids"]) == 60
    latest = {r.key: r.value for r in read_topic(settings.kafka, settings.changelog_topic) if r.key != META_KEY}
    restored = StateTable(held["hidden"].shape[1], torch.device(DEVICE), watermark_slots=1,
                          dedupe_window=settings.dedupe_window, state_dtype=torch.float16)
    assert restored.load_changelog(latest) == 60
    row = {u: i for i, u in enumerate(restored.user_ids)}
    order = [row[u] for u in held["user_ids"]]
    np.testing.assert_array_equal(restored.snapshot()["hidden"][order], held["hidden"])
    np.testing.assert_array_equal(restored.snapshot()["counts"][order], held["counts"])


def test_a_float32_daemons_state_carries_on_in_a_float16_one(kafka, settings_factory):
    """The upgrade: a group whose changelog holds float32 states (the default before) restarted with float16."""
    settings = settings_factory(state_dtype="float32", batch_max_events=300)
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    log = generate(users=60, events=2400, seed=17).events
    records = [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log]
    produce(kafka, topic, records[:1200])
    first = run_until_drained(settings).updater.state.snapshot()
    assert first["hidden"].dtype == np.float32
    produce(kafka, topic, records[1200:])
    upgraded = dataclasses.replace(settings, state_dtype="float16")
    state = run_until_drained(upgraded).updater.state
    held = state.snapshot()
    assert held["hidden"].dtype == np.float16
    expected = expected_from_events(log)  # every event counted once: the first half's from the restored state
    assert sorted(held["user_ids"]) == sorted(expected)
    for i, user in enumerate(held["user_ids"]):
        assert held["counts"][i].tolist() == [expected[user]["counts"].get(t, 0) for t in EVENT_TYPES], user
    # The users the second half never touched kept the first daemon's states, rounded.
    later = {str(e["user_id"]) for e in log[1200:]}
    assert len(set(expected) - later) >= 5  # 14 of this seed's users
    row = {u: i for i, u in enumerate(first["user_ids"])}
    for i, user in enumerate(held["user_ids"]):
        if user not in later:
            np.testing.assert_array_equal(held["hidden"][i], first["hidden"][row[user]].astype(np.float16))


def test_settings_refuse_an_unknown_state_dtype():
    with pytest.raises(ValueError, match="--state-dtype must be one of float32, float16"):
        Settings(state_dtype="bfloat16").validate()
