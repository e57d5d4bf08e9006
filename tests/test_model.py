"""The GRU profile model and the in-process update step."""

from __future__ import annotations

import subprocess
from dataclasses import replace
import sys

import numpy as np
import orjson
import pytest
import torch

from models.update_step import ProfileUpdater
from models.features import build_features, hash_buckets
from models.profile_model import CheckpointError, ModelConfig, ProfileModel
from models.checkpoint_io import load_checkpoint, save_checkpoint, untrained
from stream.generator import generate
from tests.helpers import DEVICE, STATE_ATOL, as_older_checkpoint, record_batch

SMALL = ModelConfig(hidden_size=16, item_buckets=1024, category_buckets=64, query_buckets=256)


def features(model: ProfileModel, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    items = np.array([f"i{k}" for k in rng.integers(0, 50, n)], dtype=object)
    cats = np.array([f"c{k}" for k in rng.integers(0, 5, n)], dtype=object)
    queries = np.array(["red shoes" if k % 3 == 0 else None for k in range(n)], dtype=object)
    price = np.where(rng.random(n) < 0.3, np.nan, rng.random(n) * 100)
    c = model.config
    return build_features(rng.integers(0, 4, n), items, cats, price, queries, rng.random(n) * 1000,
                          np.zeros(n, bool), item_buckets=c.item_buckets, category_buckets=c.category_buckets,
                          query_buckets=c.query_buckets, hash_seed=c.hash_seed, device=model.item_bias.device)


def test_one_packed_call_equals_running_each_user_alone():
    model = ProfileModel.fresh(SMALL)
    lengths = np.array([5, 1, 3, 7])
    user = np.repeat(np.arange(4), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    H = SMALL.hidden_size
    with torch.no_grad():
        x = model.embed(features(model, len(user)))
        s0 = torch.randn(4, SMALL.state_size)
        before = np.array([0, 3, 1, 40])  # events each user had before: their memory's age
        s = model.advance(s0, x, user, position, lengths, before)
        assert s.shape == (4, SMALL.state_size)
        decay = model.memory_decay
        for u in range(4):
            out, ref = model.gru(x[user == u].unsqueeze(1), s0[u, :H].reshape(1, 1, -1))
            torch.testing.assert_close(s[u, :H], ref[0, 0], atol=1e-6, rtol=1e-5)
            memory, n = s0[u, H:], before[u]
            for h_t in out[:, 0]:  # the memory recurrence, one event at a time
                n += 1
                memory = memory + torch.maximum(1 - decay, torch.tensor(1 / n)) * (torch.tanh(model.memory_in(h_t)) - memory)
            torch.testing.assert_close(s[u, H:], memory, atol=1e-6, rtol=1e-5)


def test_a_shop_with_many_categories_is_scored_a_few_users_at_a_time_with_the_same_profiles(monkeypatch):
    """Scoring every user against every category is a (users, categories) matrix: a shop with 100,000 names took
    5.6 GB at 4,096 users at a time. Taken by a bound on the scores instead, the profiles are the same."""
    from models import profile_model

    assert profile_model.users_at_once(1024) == 4096  # the usual shop: as before
    assert 100_000 * profile_model.users_at_once(100_000) <= profile_model.CATEGORY_SCORES_AT_ONCE
    events = [orjson.dumps({"event_id": f"e{i}", "user_id": f"u{i % 30}", "type": "click", "item_id": "i1",
                            "ts": 1_700_000_000_000 + 60_000 * i, "category": f"c{i % 61}"}) for i in range(600)]

    def published() -> list[dict]:
        updater = ProfileUpdater(load_checkpoint("demo"), torch.device(DEVICE), max_event_bytes=65536,
                                 emit_embedding=False)
        profiles = [orjson.loads(v) for _, v in updater.process(record_batch(events)).profiles]
        keys, x = updater.category_candidates(np.arange(30), 1_700_000_000_000 + 60_000 * 600)  # anchor samples'
        return [{k: v for k, v in p.items() if k != "updated_at"} for p in profiles] + [keys.tolist(), x.tolist()]

    whole = published()
    monkeypatch.setattr(profile_model, "CATEGORY_SCORES_AT_ONCE", 61 * 4)  # four users at a time
    assert profile_model.users_at_once(61) == 4
    assert published() == whole


def test_churn_risk_rises_with_idle_time():
    model = ProfileModel.fresh(SMALL)
    h = torch.randn(1, SMALL.state_size).repeat(4, 1)
    with torch.no_grad():
        churn = model.heads(h, torch.tensor([0.0, 1.0, 24.0, 24.0 * 30])).churn_risk
    assert torch.all(churn[1:] > churn[:-1])


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = ProfileModel.fresh(SMALL)
    with torch.no_grad():
        model.cluster_centroids.add_(1.0)  # buffers travel too
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "v-test", {"note": "unit"})
    loaded = load_checkpoint(path)
    assert loaded.version == "v-test" and loaded.trained and loaded.metadata == {"note": "unit"}
    assert loaded.model.config == SMALL
    f = features(model, 12)
    with torch.no_grad():
        a = model.embed(f)
        b = loaded.model.embed(f)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        ha = model.heads(torch.ones(2, SMALL.state_size), torch.zeros(2))
        hb = loaded.model.heads(torch.ones(2, SMALL.state_size), torch.zeros(2))
    torch.testing.assert_close(ha.top_category_probs, hb.top_category_probs, rtol=0, atol=0)
    assert torch.equal(ha.top_category_cols, hb.top_category_cols)
    assert torch.equal(ha.interest_cluster, hb.interest_cluster)


def test_a_format_4_checkpoint_loads_without_copying(tmp_path):
    """Checkpoints from before the copy bonus are read with it switched off: their scores are unchanged."""
    model = ProfileModel.fresh(replace(SMALL, n_items=5))
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, "v-old", {}, [f"i{n}" for n in range(5)])
    as_older_checkpoint(path, path, 4, drop=("item_copy.", "category_copy."))
    loaded = load_checkpoint(path).model
    s = torch.randn(3, SMALL.state_size)
    current = torch.tensor([0, 4, -1])
    with torch.no_grad():
        torch.testing.assert_close(loaded.item_scores(s, current=current), model.item_scores(s), rtol=0, atol=0)
        plain = loaded.category_logits(s, torch.zeros(3))
        copied = loaded.category_logits(s, torch.zeros(3), recent=torch.tensor([[1, 2], [2, 0], [0, 0]]))
    torch.testing.assert_close(copied, plain, rtol=0, atol=0)


def test_unreadable_checkpoints_are_refused_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable profiles checkpoint"):
        load_checkpoint(junk)
    future = tmp_path / "future.pt"
    torch.save({"format": 99, "config": {}, "state_dict": {}}, future)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(future)


def test_feature_hashing_is_identical_across_processes():
    ids = ["i1", "i2", "shoes.running", "ü-unicode", "", "x" * 200]
    here = hash_buckets(ids, 1 << 17, 0).tolist()
    code = f"from models.features import hash_buckets; print(hash_buckets({ids!r}, 1 << 17, 0).tolist())"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert str(here) == there
    assert len(set(here)) == len(ids) and all(b > 0 for b in here)
    assert hash_buckets([None], 8, 0).tolist() == [0]



def test_split_batches_equal_one_batch_and_snapshot_restores_state():
    events = generate(users=40, events=600, seed=2).events
    whole = ProfileUpdater(untrained(SMALL), torch.device(DEVICE), max_event_bytes=65536, emit_embedding=True)
    whole.process(record_batch(events, topic="t", keys=None))

    pieces = ProfileUpdater(untrained(SMALL), torch.device(DEVICE), max_event_bytes=65536, emit_embedding=True)
    pieces.process(record_batch(events[:250], topic="t", keys=None))
    snap = pieces.state.snapshot()
    resumed = ProfileUpdater(untrained(SMALL), torch.device(DEVICE), max_event_bytes=65536, emit_embedding=True)
    resumed.state.restore(snap)  # a restart from a snapshot
    for start in range(250, 600, 33):
        resumed.process(record_batch(events[start:start + 33], topic="t", keys=None))

    a, b = whole.state.snapshot(), resumed.state.snapshot()
    order = [a["user_ids"].index(u) for u in b["user_ids"]]
    np.testing.assert_array_equal(b["counts"], a["counts"][order])
    np.testing.assert_array_equal(b["spend_micros"], a["spend_micros"][order])
    np.testing.assert_array_equal(b["last_ts"], a["last_ts"][order])
    np.testing.assert_allclose(b["hidden"], a["hidden"][order], atol=STATE_ATOL)
    assert a["category_names"] == b["category_names"]


def test_a_wide_batchs_states_advanced_in_a_thread_equal_those_advanced_inline():
    """start_advance runs the GRU of a batch of WIDE_BATCH_EVENTS or more in a thread beside the statistics."""
    from models.update_step import WIDE_BATCH_EVENTS

    half = WIDE_BATCH_EVENTS + 100
    events = generate(users=300, events=2 * half, seed=8, span_days=2.0).events  # (no calibration anchor splits it)
    tables = []
    for gru_threads in (1, 0):  # 1: the thread (on the CPU), 0: inline
        updater = ProfileUpdater(untrained(SMALL), torch.device(DEVICE), max_event_bytes=65536, emit_embedding=True,
                                 gru_threads=gru_threads)
        for start in (0, half):  # the second batch starts from the states the first one left
            updater.process(record_batch(events[start:start + half], topic="t", first_offset=start, keys=None))
        assert (updater._gru_thread is not None) == (gru_threads == 1 and DEVICE == "cpu")
        tables.append(updater.state.snapshot())
    threaded, inline = tables
    assert threaded["user_ids"] == inline["user_ids"] and np.abs(inline["hidden"]).sum() > 0
    np.testing.assert_array_equal(threaded["hidden"], inline["hidden"])
    np.testing.assert_array_equal(threaded["counts"], inline["counts"])


def test_idle_users_are_rescored_on_the_event_time_timer_with_rising_churn():
    hour = 3_600_000
    updater = ProfileUpdater(untrained(SMALL), torch.device(DEVICE), max_event_bytes=65536, emit_embedding=False,
                             idle_rescore_ms=24 * hour)

    def click(user: str, ts: int, n: int) -> dict:
        return {"event_id": f"{user}-{n}", "user_id": user, "type": "click", "ts": ts, "item_id": "i1"}

    def published(events: list[dict]) -> dict[str, dict]:
        return {k.decode(): orjson.loads(v) for k, v in updater.process(record_batch(events, topic="t", keys=None)).profiles}

    t0 = 1_700_000_000_000
    assert set(published([click("quiet", t0, 0), click("busy", t0, 0)])) == {"quiet", "busy"}
    # 23 h later only the busy user is touched: nobody is due yet.
    assert set(published([click("busy", t0 + 23 * hour, 1)])) == {"busy"}
    # 25 h after the quiet user's last event the timer fires for them, driven by event time alone.
    first = published([click("busy", t0 + 25 * hour, 2)])
    assert set(first) == {"busy", "quiet"}
    assert first["quiet"]["counts"]["click"] == 1 and first["quiet"]["last_event_ts"] == t0
    # Another day of silence: published again, with a higher churn risk.
    second = published([click("busy", t0 + 50 * hour, 3)])
    assert "quiet" in second
    assert second["quiet"]["churn_risk"] > first["quiet"]["churn_risk"]
    # Not re-published on every batch in between.
    assert "quiet" not in published([click("busy", t0 + 51 * hour, 4)])
    # A user who comes back after the period is due and touched at once: still one profile in the batch.
    result = updater.process(record_batch([click("quiet", t0 + 80 * hour, 5), click("busy", t0 + 80 * hour, 5)], topic="t", keys=None))
    keys = [k.decode() for k, _ in result.profiles]
    assert sorted(keys) == ["busy", "quiet"]


def test_the_warm_up_leaves_no_trace_in_the_state_or_the_profiles(monkeypatch):
    """load_updater runs the batch step once on a scratch table (the first real batch then pays no kernel
    loading): the real table stays empty, and the profiles are those of an updater that skipped it."""
    from models.update_step import load_updater
    from stream.settings import Settings

    settings = Settings(device=DEVICE, model_path="demo", next_items=3)
    warmed = load_updater(settings)
    assert len(warmed.state) == 0 and not warmed.state.category_names and warmed.state.max_event_ts == -1
    monkeypatch.setattr(ProfileUpdater, "warm_up", lambda self: None)
    cold = load_updater(settings)
    events = generate(users=50, events=600, seed=8).events
    batch = record_batch([orjson.dumps(e) for e in events], keys=[str(e["user_id"]).encode() for e in events])

    def profiles(updater):
        out = {k: orjson.loads(v) for k, v in updater.process(batch).profiles}
        return {k: {f: x for f, x in p.items() if f != "updated_at"} for k, p in out.items()}

    assert profiles(warmed) == profiles(cold) and len(warmed.state) == 50
