"""What follows a purchase (stream/follow.py): counted exactly over the users in state, whatever the
batches, erasures and restores, and read by top_categories in a shop no model was trained in."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import torch

from models.checkpoint_io import load_checkpoint, save_checkpoint, untrained
from models.profile_model import ModelConfig
from models.update_step import ProfileUpdater
from stream.follow import FollowCounts
from stream.generator import ShopParams, generate
from stream.popularity import HolderCounts
from stream.statistics import SLOT_FEATURES
from tests.helpers import DEVICE, as_older_checkpoint, record_batch, updater_fed

ON_DEVICE = torch.device(DEVICE)
T0 = 1_700_000_000_000
HOUR = 3_600_000


def rebuilt(updater: ProfileUpdater) -> dict:
    fresh = FollowCounts()
    fresh.rebuild(updater.state.columns, len(updater.state))
    return fresh.counts


def holders_rebuilt(updater: ProfileUpdater) -> dict:
    fresh = HolderCounts()
    fresh.rebuild(updater.state.columns, len(updater.state))
    return fresh.counts


def test_follow_counts_stay_the_sum_over_the_users_in_state():
    events = generate(users=120, events=6000, seed=3, shop=ShopParams.draw(2)).events
    one = updater_fed(events, [10_000])
    many = updater_fed(events, [97, 431, 1])
    assert one.state.follow.counts == rebuilt(one)
    assert sum(sum(f.values()) for f in one.state.follow.counts.values()) > 30  # follow-ups were found
    assert many.state.follow.counts == one.state.follow.counts  # whatever the batches
    # The category holders too (each run its own: which categories a user with more than K keeps in its
    # slots can depend on the batches).
    for run in (one, many):
        assert run.state.holders.counts == holders_rebuilt(run) and sum(run.state.holders.counts.values()) > 120
    gone = one.state.user_ids[::3]
    one.state.forget(gone)
    assert one.state.follow.counts == rebuilt(one) and one.state.holders.counts == holders_rebuilt(one)
    restored = ProfileUpdater(untrained(), ON_DEVICE, max_event_bytes=65536, emit_embedding=False)
    restored.state.restore(one.state.snapshot())
    assert restored.state.follow.counts == one.state.follow.counts
    assert restored.state.holders.counts == one.state.holders.counts


def test_a_user_who_starts_afresh_after_the_ttl_takes_their_follow_up_with_them():
    """A user whose next event comes after --state-ttl restarts in its row (stream/expiry.py): its old
    purchase and follow-up leave the counts, in the same batch as anywhere else."""
    day = 24 * HOUR
    events = purchase_then("u", "tents", "sleeping bags", T0) + purchase_then("v", "tents", "stoves", T0)
    events += [{"user_id": "u", "type": "click", "ts": T0 + 30 * day, "item_id": "i9", "category": "books",
                "price": 5.0}]
    events = [{"event_id": f"e{n}", **e} for n, e in enumerate(events)]
    for sizes in ([100], [1]):
        updater = updater_fed(events, sizes, state_ttl_ms=10 * day)
        assert updater.state.follow.counts == rebuilt(updater)
        assert list(updater.state.follow.counts.values()) == [{int(updater.state.columns["follow_category"][
            updater.state.row("v")]): 1}]  # only v's tent -> stoves is left
        names = updater.state.category_names
        assert updater.state.holders.counts == holders_rebuilt(updater)
        assert {names[k]: n for k, n in updater.state.holders.counts.items()} == {"tents": 1, "stoves": 1, "books": 1}


def purchase_then(user: str, bought: str, then: str | None, t: int) -> list[dict]:
    """A user who clicks and buys in `bought`, then (after a day) browses `then`."""
    out = [{"user_id": user, "type": "click", "ts": t, "item_id": "i1", "category": bought, "price": 5.0},
           {"user_id": user, "type": "purchase", "ts": t + 60_000, "item_id": "i1", "category": bought,
            "price": 5.0}]
    if then:
        out.append({"user_id": user, "type": "click", "ts": t + 24 * HOUR, "item_id": "i2", "category": then,
                    "price": 5.0})
    return out


def tent_buyers_then_a_new_one() -> list[dict]:
    """Ten tent buyers who went on to sleeping bags (8) or stoves (2), then "new", who has just bought one."""
    events = []
    for i in range(10):
        events += purchase_then(f"u{i}", "tents", "sleeping bags" if i < 8 else "stoves", T0 + i * HOUR)
    events += purchase_then("new", "tents", None, T0 + 40 * HOUR)
    return [{"event_id": f"e{n}", **e} for n, e in enumerate(events)]


def test_a_user_who_just_bought_gets_the_shops_follow_up_among_top_categories():
    """In this log, buying a tent is followed by sleeping bags (8 users of 10); a user who has just
    bought a tent and done nothing since gets sleeping bags, a category of the shop's follow-ups that
    the user has never engaged with, as the top category once the heads weigh the pending follow-up."""
    events = tent_buyers_then_a_new_one()
    loaded = untrained(ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=64,
                                   query_buckets=64))
    with torch.no_grad():
        loaded.model.fields.repeat_score.weight[0, SLOT_FEATURES.index("follow_pending")] = 10.0
    updater = updater_fed(events, [7])
    assert updater.state.follow.counts  # learned from the log
    rows = np.array([updater.state.row("new")])
    keys, feats = updater.slots(rows, T0 + 41 * HOUR)
    names = updater.state.category_names
    assert names[int(keys[0, -1])] == "sleeping bags"  # the extra slot: the purchase's usual follow-up
    assert feats[0, -1, SLOT_FEATURES.index("follow_share")] == 0.8
    assert feats[0, -1, SLOT_FEATURES.index("follow_pending")] == 0.8  # still to come: its share again
    updater = updater_fed(events, [7], loaded)
    profile = orjson.loads(updater.profiles_for(np.array([updater.state.row("new")]))[0][1])
    assert profile["top_categories"][0]["category"] == "sleeping bags"
    # Once the user has gone on to another category, the follow-up is no longer pending.
    updater.process(record_batch([{"event_id": "x", "user_id": "new", "type": "click", "ts": T0 + 42 * HOUR,
                                   "item_id": "i3", "category": "stoves", "price": 5.0}],
                                 topic="t", first_offset=1000, keys=None))
    keys, feats = updater.slots(np.array([updater.state.row("new")]), T0 + 43 * HOUR)
    assert feats[0, :, SLOT_FEATURES.index("follow_pending")].max() == 0.0


def test_a_user_reads_the_other_users_follow_ups_not_its_own():
    """Leave one out: u0 went from tents to sleeping bags, as 7 of the 9 other tent buyers did (7/9, not
    8/10); the one user who bought a kayak reads nothing of paddles, which only it followed it with."""
    events = []
    for i in range(10):
        events += purchase_then(f"u{i}", "tents", "sleeping bags" if i < 8 else "stoves", T0 + i * HOUR)
    events += purchase_then("solo", "kayaks", "paddles", T0)
    events = [{"event_id": f"e{n}", **e} for n, e in enumerate(events)]
    updater = updater_fed(events, [7])
    share = SLOT_FEATURES.index("follow_share")
    names = updater.state.category_names

    def shares(user: str, feature: int = share) -> dict[str, float]:
        keys, feats = updater.slots(np.array([updater.state.row(user)]), T0 + 41 * HOUR)
        return {names[int(key)]: float(f) for key, f in zip(keys[0], feats[0, :, feature]) if key}

    assert shares("u0") == pytest.approx({"tents": 0.0, "sleeping bags": 7 / 9})
    assert shares("u9") == pytest.approx({"tents": 0.0, "stoves": 1 / 9, "sleeping bags": 8 / 9})  # the extra slot
    assert shares("solo") == {"kayaks": 0.0, "paddles": 0.0}
    assert updater.state.follow.counts  # the counts themselves keep every pair
    # The same for the shop's popularity: the other users holding each category, relative to the most held
    # (tents: 10 users; sleeping bags 8, stoves 2, kayaks and paddles 1).
    popularity = SLOT_FEATURES.index("shop_popularity")
    assert shares("u0", popularity) == pytest.approx({"tents": 0.9, "sleeping bags": 0.7})
    assert shares("u9", popularity) == pytest.approx({"tents": 0.9, "stoves": 0.1, "sleeping bags": 0.8})
    assert shares("solo", popularity) == {"kayaks": 0.0, "paddles": 0.0}


def test_heads_before_format_12_read_the_pending_follow_up_relative_to_the_top_one(tmp_path):
    """Heads fitted before checkpoint format 12 read follow_pending as the share relative to the top
    follow-up's (1 for it); newer ones read the share itself, which says how sure the shop's follow-up is.
    Each checkpoint is served the numbers its heads were fitted on, and keeps that when saved again."""
    events = tent_buyers_then_a_new_one()
    model = untrained(ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=64,
                                  query_buckets=64)).model
    save_checkpoint(tmp_path / "now.pt", model, "v12")
    as_older_checkpoint(tmp_path / "now.pt", tmp_path / "old.pt", 11, drop=("fields.relative_pending",))
    save_checkpoint(tmp_path / "again.pt", load_checkpoint(tmp_path / "old.pt").model, "v11-again")
    pending = SLOT_FEATURES.index("follow_pending")
    for name, expected in (("old.pt", 1.0), ("again.pt", 1.0), ("now.pt", 0.8)):
        updater = updater_fed(events, [7], load_checkpoint(tmp_path / name))
        keys, feats = updater.slots(np.array([updater.state.row("new")]), T0 + 41 * HOUR)
        assert updater.state.category_names[int(keys[0, -1])] == "sleeping bags"
        assert feats[0, -1, pending] == pytest.approx(expected), name
