"""The state table's user index (stream/user_index.py) against a dict: random batches with repeats, drops,
growth, and ids whose hashes collide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream.state import StateTable
from stream.user_index import UserIndex, hashes_of
from tests.helpers import DEVICE


class Colliding(str):
    """An id whose hash is one of a few values: every lookup has to tell ids apart by comparing them."""

    def __hash__(self) -> int:
        return [7, 7 << 32, -3][len(self) % 3]


def table() -> StateTable:
    return StateTable(4, torch.device(DEVICE), watermark_slots=1, dedupe_window=2)


def check(state: StateTable, reference: list[str]) -> None:
    assert state.user_ids == reference and len(state) == len(reference)
    assert state.rows_for(reference).tolist() == list(range(len(reference)))  # no new rows for known users
    assert len(state) == len(reference)
    for i in (0, len(reference) // 2, len(reference) - 1) if reference else ():
        assert state.row(reference[i]) == i
    assert state.row("never-seen") is None


@pytest.mark.parametrize("seed, make", [(0, str), (1, str), (2, Colliding), (3, Colliding)])
def test_rows_match_a_dict_through_batches_drops_and_growth(seed, make):
    rng = np.random.default_rng(seed)
    pool = [make(f"u{i}" * (1 + i % 3)) for i in range(3000 if make is str else 300)]
    state, reference = table(), []
    for step in range(40):
        batch = [pool[i] for i in rng.integers(0, len(pool), int(rng.integers(1, 400)))]
        if step % 2:  # fresh objects, as ids decoded from events are
            batch = np.array([make(str(u)) for u in batch], dtype=object)
        rows = state.rows_for(batch)
        for user in batch:
            if user not in reference:
                reference.append(user)
        assert rows.tolist() == [reference.index(u) for u in batch]
        if step % 7 == 6:
            drop = rng.random(len(state)) < 0.3
            state.drop_rows(drop)
            reference = [u for u, d in zip(reference, drop) if not d]
        check(state, reference)
    state.forget(reference[:5])
    check(state, reference[5:])


def test_ids_sharing_a_hash_in_one_batch_are_still_two_users():
    state = table()
    a, b = Colliding("xa"), Colliding("yb")  # same length: the same hash
    assert hash(a) == hash(b)
    assert state.rows_for([a, b, a, b, Colliding("xa")]).tolist() == [0, 1, 0, 1, 0]
    assert state.user_ids == ["xa", "yb"] and state.row("yb") is None  # a plain str hashes otherwise
    assert state.row(Colliding("yb")) == 1


def test_the_index_grows_past_its_first_slots_and_keeps_every_row():
    index, ids = UserIndex(), [f"user-{i}" for i in range(20_000)]
    for start in range(0, len(ids), 1500):
        index.add(ids[start:start + 1500], hashes_of(ids[start:start + 1500]))
    assert len(index.slots) >= 2 * len(ids)
    assert (index.rows(ids) == np.arange(len(ids))).all()
    assert (index.rows([f"other-{i}" for i in range(500)]) == -1).all()
    index.keep(np.arange(0, len(ids), 2))
    assert (index.rows(ids[::2]) == np.arange(len(ids) // 2)).all() and (index.rows(ids[1::2]) == -1).all()
