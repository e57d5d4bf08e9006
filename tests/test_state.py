"""The state table on its own (stream/state.py): rows for users, growth, dropping and erasing users,
snapshots in memory and on disk. No model, no pipeline, no broker."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream.snapshot_files import read_snapshot, write_snapshot
from stream.state import StateTable
from tests.helpers import DEVICE

ON_DEVICE = torch.device(DEVICE)


def table(capacity: int = 4, **kwargs: int) -> StateTable:
    return StateTable(state_size=3, device=ON_DEVICE, capacity=capacity, **kwargs)


def mark(state: StateTable, user: str, value: int) -> None:
    """Give the user's row values of its own, to see them follow the user."""
    row = state.row(user)
    state.states[row] = float(value)
    state.counts[row] = value
    state.partition[row] = value % 2


def test_rows_for_adds_new_users_in_order_of_first_appearance_and_keeps_known_ones():
    state = table()
    rows = state.rows_for(["b", "a", "b", "c"])
    assert rows.tolist() == [0, 1, 0, 2] and state.user_ids == ["b", "a", "c"] and len(state) == 3
    assert state.rows_for(["c", "d", "a"]).tolist() == [2, 3, 1]
    assert state.row("d") == 3 and state.row("nobody") is None
    assert state.counts[:4].tolist() == [[0] * state.counts.shape[1]] * 4  # new rows start empty
    assert (state.watermark[:4] == -1).all() and (state.partition[:4] == -1).all()


def test_the_table_grows_and_keeps_every_row():
    state = table(capacity=2, watermark_slots=2, dedupe_window=3)
    first = [f"u{i}" for i in range(2)]
    state.rows_for(first)
    for i, user in enumerate(first):
        mark(state, user, i + 1)
    state.rows_for([f"u{i}" for i in range(2, 50)])
    assert len(state) == 50 and state.capacity >= 50
    assert state.counts[0, 0] == 1 and state.counts[1, 0] == 2 and state.states[1, 0] == 2.0
    assert state.counts[2:50].sum() == 0 and state.states[2:50].abs().sum() == 0
    assert state.watermark.shape[1:] == (2,) and state.recent_ids.shape[1:] == (3,)


def test_forget_erases_users_and_the_others_keep_their_values():
    state = table()
    state.rows_for(["a", "b", "c", "d"])
    for i, user in enumerate("abcd"):
        mark(state, user, i + 1)
    assert state.forget(["b", "nobody", "d"]) == {"b", "d"}
    assert state.user_ids == ["a", "c"] and state.row("b") is None and state.row("d") is None
    assert state.counts[state.row("c"), 0] == 3 and state.states[state.row("c"), 0] == 3.0
    assert state.rows_for(["b"]).tolist() == [2] and state.counts[2].sum() == 0  # back, as a new user


@pytest.mark.parametrize("dropped", [0.1, 0.8])  # the table stays half full (rows move in place), or not
def test_dropping_rows_keeps_every_other_users_values_and_order(monkeypatch, dropped):
    monkeypatch.setattr("stream.state.MOVE_CHUNK", 7)  # several chunks even in a small table
    state = table(capacity=64, watermark_slots=2, dedupe_window=3)
    users = [f"u{i}" for i in range(100)]
    state.rows_for(users)
    for i, user in enumerate(users):
        mark(state, user, i + 1)
    drop = np.random.default_rng(3).random(100) < dropped
    drop[:2] = False  # the first rows stay where they are
    capacity = state.capacity
    state.drop_rows(drop)
    kept = [u for u, d in zip(users, drop) if not d]
    assert state.user_ids == kept and (state.capacity == capacity) == (dropped < 0.5)
    for row, user in enumerate(kept):
        value = int(user[1:]) + 1
        assert state.row(user) == row and state.counts[row, 0] == value and state.states[row, 2] == float(value)
    assert all(state.row(u) is None for u, d in zip(users, drop) if d)
    back = state.rows_for(["u4", "new"])  # u4 was dropped (rng 3): both start afresh after the kept rows
    assert drop[4] and back.tolist() == [len(kept), len(kept) + 1]
    assert state.counts[back].sum() == 0 and state.states[back].abs().sum() == 0 and (state.partition[back] == -1).all()


def hold(state: StateTable, user: str, slots: list[int], last: int = 0) -> None:
    """Give the user category slots (keys) and a latest category, as the statistics would."""
    row = state.rows_for([user])[0]
    state.columns["cat_key"][row, :len(slots)] = slots
    state.columns["last_category"][row] = last


def test_forget_drops_the_names_of_categories_no_remaining_user_holds():
    state = table()
    state.merge_category_names({3: "secret", 5: "shared", 7: "latest-only", 9: "fell-out", 11: "base-only"})
    hold(state, "gone", [3, 5, 9])
    hold(state, "stays", [5], last=7)  # key 7: only its latest event's category, not in a slot
    base = table()
    hold(base, "in-base", [11])
    state.attach_base(base.snapshot(), None, [])
    version = state.categories_version
    seen_before = state.seen_categories().tolist()
    assert seen_before == [3, 5, 7, 9, 11]

    assert state.forget(["gone"]) == {"gone"}
    # 3 and 9 (which no one holds any more, whoever brought it) leave; the rest is held by a user of
    # the table or of the base snapshot.
    assert state.category_names == {5: "shared", 7: "latest-only", 11: "base-only"}
    assert state.seen_categories().tolist() == [5, 7, 11]
    assert state.seen_category_names().tolist() == ["shared", "latest-only", "base-only"]
    assert state.snapshot()["category_names"] == {5: "shared", 7: "latest-only", 11: "base-only"}
    assert state.categories_version > version  # so the changelog re-sends the meta record

    state.forget(["in-base"])  # a base user erased before it was ever loaded
    assert state.category_names == {5: "shared", 7: "latest-only"}
    version = state.categories_version
    state.forget(["nobody"])
    assert state.categories_version == version  # nothing dropped: nothing to re-send


def test_drop_partitions_drops_the_users_of_lost_partitions():
    state = table()
    state.rows_for(["a", "b", "c", "d"])
    for i, user in enumerate("abcd"):
        mark(state, user, i + 1)  # partition = value % 2: a, c -> 1; b, d -> 0
    assert state.drop_partitions([1]) == 2
    assert state.user_ids == ["b", "d"] and state.counts[state.row("d"), 0] == 4


def test_snapshot_and_restore_round_trip_in_memory_and_on_disk(tmp_path):
    state = table(watermark_slots=1, dedupe_window=2)
    state.rows_for(["a", "b", "c"])
    for i, user in enumerate("abc"):
        mark(state, user, i + 1)
    state.category_names[7] = "shoes"
    state.max_event_ts = 1_700_000_000_000
    snap = state.snapshot()
    state.rows_for(["later"])  # the snapshot is a copy: later changes do not reach it
    mark(state, "a", 9)
    assert snap["user_ids"] == ["a", "b", "c"] and snap["counts"][0, 0] == 1

    write_snapshot(tmp_path / "snap", snap, {"note": "test"})
    on_disk, meta = read_snapshot(tmp_path / "snap")
    assert meta == {"note": "test"}
    for restored_from in (snap, on_disk):
        other = table(watermark_slots=1, dedupe_window=2)
        other.restore(restored_from)
        assert other.user_ids == ["a", "b", "c"] and other.row("c") == 2
        np.testing.assert_array_equal(other.counts[:3], snap["counts"])
        np.testing.assert_array_equal(other.states[:3].cpu().numpy(), snap["hidden"])
        assert other.category_names == {7: "shoes"} and other.max_event_ts == 1_700_000_000_000
        assert other.rows_for(["d"]).tolist() == [3]  # and it goes on taking users


def test_restore_refuses_another_snapshot_format(tmp_path):
    snap = table().snapshot()
    with pytest.raises(ValueError, match="format"):
        table().restore({**snap, "format": 999})
    with pytest.raises(ValueError, match="no readable state snapshot"):
        read_snapshot(tmp_path / "missing")


def test_state_bytes_counts_the_rows_in_use():
    state = table()
    empty = state.state_bytes()
    state.rows_for(["a", "b"])
    grown = state.state_bytes()
    device = str(state.device)
    assert empty == {"host": 0, device: 0} and grown["host"] > 0
    assert grown[device] == 2 * 3 * 4  # the model states, by device: two users, 3 float32 each
