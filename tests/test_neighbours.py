"""The neighbour sessions' votes (models/neighbours.py): session kNN over the training log, weighted on held-out
time."""

from __future__ import annotations

import numpy as np
import orjson
import torch

from consumers.model_info import checkpoint_info
from models.checkpoint_io import load_checkpoint, save_checkpoint
from models.dataset import load_events
from models import neighbours
from models.neighbours import NEIGHBOUR_SCALE, RECENT_ITEMS, SessionNeighbours
from models.profile_model import ModelConfig
from models.sequence_training import TrainConfig, train
from models.update_step import ProfileUpdater, shift_in
from stream.generator import write_jsonl
from tests.helpers import DEVICE, record_batch

GAP_MS = 30 * 60_000


def brute_force(sessions: list[set[int]], recent: np.ndarray, n_items: int, k: int) -> np.ndarray:
    """V-SKNN written out: cosine of the position-weighted query with each session's item set, the k most
    similar vote with their similarity, log1p(NEIGHBOUR_SCALE * votes)."""
    out = np.zeros((len(recent), n_items))
    for u, row in enumerate(recent):
        known = [(j, item) for j, item in enumerate(row) if 0 <= item < n_items]
        if not known:
            continue
        span = max(j for j, _ in known) + 1
        query: dict[int, float] = {}
        for j, item in known:
            query.setdefault(item, (span - j) / span)  # the latest occurrence's weight
        sims = np.array([sum(query.get(i, 0.0) for i in s) / np.sqrt(len(query) * len(s)) for s in sessions])
        order = sorted((i for i in range(len(sessions)) if sims[i] > 0), key=lambda i: -sims[i])[:k]
        for i in order:
            for item in sessions[i]:
                out[u, item] += sims[i]
    return np.log1p(NEIGHBOUR_SCALE * out)


def test_votes_equal_session_knn_written_out(monkeypatch):
    rng = np.random.default_rng(0)
    n_items, users = 40, 60
    user, ts, item = [], [], []
    for u in range(users):  # each user two sessions, an hour apart; some events without a vocabulary item
        for s in range(2):
            for e in range(int(rng.integers(1, 7))):
                user.append(u), ts.append(u * 10**8 + s * 3_600_000 + e * 1000)
                item.append(int(rng.integers(n_items)) if rng.random() > 0.1 else -1)
    user, ts, item = np.array(user), np.array(ts), np.array(item)
    table = SessionNeighbours.from_events(user, ts, item, n_items, GAP_MS)
    sessions = [set(table.session_items[table.session_indptr[s]:table.session_indptr[s + 1]].tolist())
                for s in range(len(table.session_size))]
    expected_sessions = {}
    for u, t, i in zip(user, ts, item):
        if i >= 0:
            expected_sessions.setdefault((u, (t - u * 10**8) // 3_600_000), set()).add(int(i))
    assert sorted(map(sorted, sessions)) == sorted(map(sorted, expected_sessions.values()))

    recent = rng.integers(-1, n_items, size=(25, RECENT_ITEMS))
    recent[0] = -1  # nothing to ask with
    recent[1, :3] = [7, 7, 7]  # one item three times counts once
    recent[2, 0] = n_items + 5  # outside the index: ignored
    for k in (3, 100):
        got = table.scores(torch.from_numpy(recent), None, n_items, neighbours=k).numpy()
        np.testing.assert_allclose(got, brute_force(sessions, recent, n_items, k), rtol=1e-5, atol=1e-6)
    columns = torch.tensor([1, 5, 7, 30])  # a sorted subset, as training's sampled candidates
    np.testing.assert_allclose(table.scores(torch.from_numpy(recent), columns, 4).numpy(),
                               brute_force(sessions, recent, n_items, 100)[:, [1, 5, 7, 30]], rtol=1e-5, atol=1e-6)
    assert SessionNeighbours.empty(n_items).scores(torch.from_numpy(recent), None, n_items).abs().sum() == 0
    monkeypatch.setattr(neighbours, "MAX_PAIRS", 7)  # users scored in parts: the same votes
    np.testing.assert_allclose(table.scores(torch.from_numpy(recent), None, n_items).numpy(),
                               brute_force(sessions, recent, n_items, 100), rtol=1e-5, atol=1e-6)


def test_the_index_holds_sessions_over_by_the_cut_and_the_latest_ones():
    # User 0: a session at t = 0-2 s and one at 1 h - 1 h 2 s; user 1: one session going on across the cut.
    user = np.array([0, 0, 0, 0, 1, 1])
    ts = np.array([0, 2_000, 3_600_000, 3_602_000, 3_500_000, 3_700_000])
    item = np.array([1, 2, 3, 4, 5, 6])
    cut = SessionNeighbours.from_events(user, ts, item, 10, GAP_MS, until_ts=3_601_000)
    assert cut.session_items.tolist() == [1, 2]  # not user 0's second session, nor user 1's: both go on past it
    latest = SessionNeighbours.from_events(user, ts, item, 10, GAP_MS, max_sessions=2)
    assert sorted(latest.session_items.tolist()) == [3, 4, 5, 6]  # the oldest session fell out
    # Per item, the latest sessions only: item 9 in three sessions, looked up in the latest two.
    user, ts, item = np.array([0, 1, 2]), np.array([10, 30, 20]), np.array([9, 9, 9])
    table = SessionNeighbours.from_events(user, ts, item, 10, GAP_MS, per_item=2)
    held = table.item_sessions[table.item_indptr[9]:table.item_indptr[10]].tolist()
    assert held == [2, 1]  # sessions by time: user 0's (0), user 2's (1), user 1's (2)


def test_the_latest_items_are_the_same_however_the_events_were_batched():
    rng = np.random.default_rng(1)
    items = rng.integers(0, 50, 23)
    at_once = shift_in(np.full((1, RECENT_ITEMS), -1), items, np.array([0]), np.array([23]))
    step = np.full((1, RECENT_ITEMS), -1)
    for a, b in ((0, 1), (1, 4), (4, 13), (13, 14), (14, 23)):
        step = shift_in(step, items[a:b], np.array([0]), np.array([b - a]))
    assert at_once.tolist() == step.tolist() == [items[::-1][:RECENT_ITEMS].tolist()]
    two_users = shift_in(np.array([[3] * RECENT_ITEMS, [4] * RECENT_ITEMS]), np.array([7, 8, 9]),
                         np.array([0, 2]), np.array([2, 1]))
    assert two_users.tolist() == [[8, 7] + [3] * (RECENT_ITEMS - 2), [9] + [4] * (RECENT_ITEMS - 1)]


def template_log(users: int, seed: int, start_ts: int = 1_700_000_000_000) -> tuple[list[dict], list[list[str]]]:
    """Each user visits a, b, c, d of one of 30 templates: a (one of 10) and b (one of 3) name the template, c and
    d are its own. What follows b is c, which b alone does not tell (ten templates share it): the transition
    counts from b spread over ten items, sessions holding both a and b name it."""
    rng = np.random.default_rng(seed)
    events, visits = [], []
    for u in range(users):
        a, b = int(rng.integers(10)), int(rng.integers(3))
        visit = [f"a{a}", f"b{b}", f"c{a}-{b}", f"d{a}-{b}"]
        visits.append(visit)
        for step, item in enumerate(visit):
            events.append({"event_id": f"{seed}-{u}-{step}", "user_id": f"s{seed}u{u}", "type": "click",
                           "ts": start_ts + u * 3_600_000 + step * 30_000, "item_id": item})
    return events, visits


def test_the_weight_is_chosen_on_held_out_time_saved_and_served_with_next_items(tmp_path):
    path = tmp_path / "templates.jsonl"
    write_jsonl(template_log(users=900, seed=0)[0], path)
    config = ModelConfig(hidden_size=8, item_buckets=512, category_buckets=64, query_buckets=64, dropout=0.0)
    model, vocab, _ = train(load_events([path]), config, TrainConfig(epochs=1, batch_size=64, val_fraction=0.2,
                                                                   refit=False), torch.device(DEVICE))
    assert model.neighbour_weight[0] > 0  # the validation period ranked best with the votes
    assert len(model.neighbours().session_size) == 900  # served: every training session
    save_checkpoint(tmp_path / "m.pt", model, "v1", {}, vocab)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert torch.equal(loaded.model.neighbour_weight, model.neighbour_weight.cpu())
    assert torch.equal(loaded.model.neighbours().session_items, model.neighbours().session_items.cpu())
    assert checkpoint_info(str(tmp_path / "m.pt"))["neighbours"] == {"sessions": 900,
                                                                     "weight": float(model.neighbour_weight[0])}

    # New users after a and b, served through the daemon's batch step (a in one batch, b in the next).
    events, visits = template_log(users=200, seed=1, start_ts=1_800_000_000_000)

    def share_served_c() -> float:
        updater = ProfileUpdater(loaded, torch.device(DEVICE), max_event_bytes=65536, emit_embedding=False,
                                 next_items=4)
        for step in ("0", "1"):
            batch = updater.process(record_batch([e for e in events if e["event_id"].endswith(f"-{step}")],
                                                 topic="t", keys=None))
        out = {k.decode(): orjson.loads(v) for k, v in batch.profiles}
        return np.mean([visit[2] in out[f"s1u{u}"]["next_items"] for u, visit in enumerate(visits)])

    with_votes = share_served_c()
    with torch.no_grad():
        loaded.model.neighbour_weight.zero_()
    without = share_served_c()
    assert with_votes > 0.8 and with_votes > without + 0.3, (with_votes, without)
