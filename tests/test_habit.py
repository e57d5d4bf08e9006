"""Whether a shop's users come back to their latest categories or to their usual ones (stream/habit.py): counted
week by week from the traffic, the same whatever the batches, summed exactly over the users in state, and read by
top_categories in every model (its weight is set, not fitted)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import orjson
import pytest
import torch

from models.checkpoint_io import load_checkpoint, untrained
from models.field_heads import HABIT_COUNT, HABIT_COUNTS_WEIGHT, HABIT_FRESHNESS, HABIT_RECENCY_WEIGHT
from models.profile_model import ModelConfig
from models.update_step import ProfileUpdater
from stream.generator import ShopParams, generate
from stream.habit import (CONTESTS, COUNTS_LEAN_FULL, DAY_MS, LEAN_FULL, PRIOR_WEEKS, RECENT_WEEKS, TWO_DAYS, WEEK_MS,
                          WEEKS, ShopHabit)
from stream.statistics import SLOT_FEATURES
from tests.helpers import DEVICE, updater_fed

ON_DEVICE = torch.device(DEVICE)
HOUR = 3_600_000
DAY = DAY_MS
WEEK0 = (1_700_000_000_000 // WEEK_MS + 1) * WEEK_MS  # the start of a week of event time


def click(user: str, n: int, ts: int, category: str) -> dict:
    return {"event_id": f"{user}-{n}", "user_id": user, "type": "click", "ts": ts, "item_id": f"{category}-item",
            "category": category, "price": 3.0}


def weeks(user: str, plan: list[list[str]], first_week: int = 0) -> list[dict]:
    """A user's clicks, one list of categories per week from `first_week` on (an hour apart within a week)."""
    return [click(user, 100 * (first_week + w) + i, WEEK0 + (first_week + w) * WEEK_MS + i * HOUR, category)
            for w, categories in enumerate(plan) for i, category in enumerate(categories)]


def latest_week(updater: ProfileUpdater, user: str) -> tuple[int, int]:
    """(how the user's latest closed week went: 1 recency's guess alone came again, 2 the counts', 0 neither; its
    week counted from WEEK0)."""
    row = updater.state.row(user)
    week = int(updater.state.columns["habit_last_week"][row])
    return int(updater.state.columns["habit_last"][row]), week - WEEK0 // WEEK_MS if week else -1


def test_a_week_counts_for_the_guess_that_came_again():
    """Week 0: a, a, b (latest b, most engaged a). Week 1 returns to b only: recency's guess won. Another user
    returns to a only: the counts' guess won. A week where both or neither came again, or where the two guesses are
    one category, counts for neither; a week is closed when the user comes back in a later one."""
    events = (weeks("latest", [["a", "a", "b"], ["b", "c"], ["c"]])
              + weeks("usual", [["a", "a", "b"], ["a", "d"], ["d"]])
              + weeks("both", [["a", "a", "b"], ["a", "b"], ["e"]])
              + weeks("same", [["a", "a"], ["f"], ["f"]])
              + weeks("gone", [["a", "a", "b"], ["b"]]))  # week 1 not closed: no later week
    updater = updater_fed(sorted(events, key=lambda e: e["ts"]), [5])
    assert latest_week(updater, "latest") == (1, 1)
    assert latest_week(updater, "usual") == (2, 1)
    assert latest_week(updater, "both") == (0, 1)
    assert latest_week(updater, "same") == (0, 1)
    assert latest_week(updater, "gone") == (0, 0)  # week 0 closed (no guesses: its first week), week 1 still open
    now = WEEK0 + 3 * WEEK_MS
    assert updater.state.habit.wins(now) == (1, 1)
    assert updater.state.habit.evidence(now) == 0.0 and updater.state.habit.recency_lean(now) == 0.0
    # Weeks long past say nothing about the shop now.
    assert updater.state.habit.wins(now + (RECENT_WEEKS + 2) * WEEK_MS) == (0, 0)


def test_habit_is_the_same_whatever_the_batches_and_the_sum_over_the_users_in_state():
    events = generate(users=300, events=15000, seed=4, shop=ShopParams.draw(3), span_days=60).events
    one = updater_fed(events, [10_000])
    many = updater_fed(events, [97, 431, 1, 2_000])
    rows = [many.state.row(u) for u in one.state.user_ids]
    for name in (name for contest in CONTESTS for name in contest.columns):  # both clocks: weeks and two days
        np.testing.assert_array_equal(one.state.columns[name][:len(one.state)], many.state.columns[name][rows])
    habit = one.state.habit
    assert [sum(sum(c) for c in spans.values()) > 10 for spans in habit.spans] == [True, True]  # spans were judged
    assert many.state.habit.spans == habit.spans
    fresh = ShopHabit()
    fresh.rebuild(one.state.columns, len(one.state))
    assert fresh.spans == habit.spans
    one.state.forget(one.state.user_ids[::3])  # erased users take their spans with them
    fresh.rebuild(one.state.columns, len(one.state))
    assert one.state.habit.spans == fresh.spans
    restored = ProfileUpdater(untrained(), ON_DEVICE, max_event_bytes=65536, emit_embedding=False)
    restored.state.restore(one.state.snapshot())
    assert restored.state.habit.spans == fresh.spans


def drifting_shop(users: int) -> list[dict]:
    """Users who move on: three weeks on one category each (after a first week of an old staple), each week's
    first click on the category of the week before. The last user's staple is its most clicked category."""
    events = []
    for u in range(users):
        plan = [["staple"] * 4, ["staple", f"x{u}"], [f"x{u}", f"y{u}"], [f"y{u}", f"z{u}"], [f"z{u}"]]
        events += weeks(f"u{u}", plan)
    return sorted(events, key=lambda e: e["ts"])


def test_top_categories_lean_toward_the_latest_category_where_the_shop_moves_on():
    """In a shop whose users come back to their latest category rather than their most clicked one, every model
    weighs how fresh a category is (HABIT_RECENCY_WEIGHT), also one whose fitted weights rank by the counts; in a
    shop without that evidence the same model ranks the staple first."""
    config = ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=256, query_buckets=64)
    loaded = untrained(config)
    assert loaded.model.fields.repeat_score.weight[0, HABIT_FRESHNESS] == HABIT_RECENCY_WEIGHT
    with torch.no_grad():  # fitted weights that rank by the all-time count
        loaded.model.fields.repeat_score.weight[0, :HABIT_FRESHNESS] = 0.0
        loaded.model.fields.repeat_score.weight[0, SLOT_FEATURES.index("log_count")] = 3.0

    def top(events: list[dict], user: str) -> tuple[str, float]:
        updater = updater_fed(events, [50], loaded)
        profile = orjson.loads(updater.profiles_for(np.array([updater.state.row(user)]))[0][1])
        return profile["top_categories"][0]["category"], updater.state.habit.recency_lean(updater.state.max_event_ts)

    shop = drifting_shop(120)
    shop_habit = updater_fed(shop, [500]).state.habit
    recency, counts = shop_habit.wins(WEEK0 + 4 * WEEK_MS)
    assert recency > 2 * PRIOR_WEEKS and counts == 0
    # A user who clicked its staple 5 times last week and z once this week: the latest, z, comes first here.
    heavy = weeks("heavy", [["staple"] * 5, ["z"]], first_week=3)
    assert top(sorted(shop + heavy, key=lambda e: e["ts"]), "heavy") == ("z", 1.0)
    # Alone (no evidence yet), the same user gets its staple.
    assert top(heavy, "heavy") == ("staple", 0.0)
    # Heads fitted in a shop that moves on as much learned its freshness there: the habit adds nothing to them.
    loaded.model.fields.habit_lean_trained.fill_(1.0)
    assert top(sorted(shop + heavy, key=lambda e: e["ts"]), "heavy") == ("staple", 1.0)


def turning_shop(users: int, turn: int) -> list[dict]:
    """Users who keep a staple for three weeks (each day two clicks on it and one on a category met once), then all
    turn at `turn` to categories of their own, each day coming back to the one met the day before."""
    events = []
    for u in range(users):
        for day in range(21):
            at = WEEK0 + day * DAY + u * 1000
            events += [click(f"u{u}", 10 * day + i, at + i * HOUR, c)
                       for i, c in enumerate(["staple", "staple", f"d{u}-{day}"])]
        for day in range(5):
            at = turn + day * DAY + u * 1000
            events += [click(f"u{u}", 1000 + 10 * day + i, at + i * HOUR, c)
                       for i, c in enumerate([f"n{u}-{day}", f"n{u}-{day + 1}"])]
    return sorted(events, key=lambda e: e["ts"])


def test_a_shop_that_turns_is_leaned_toward_within_days_not_at_the_next_week():
    """Days after a shop's users all turned to new categories, no week has closed since: the weeks still say they
    keep their staples, but the spans of two days already say they come back to their latest categories, and
    top_categories leans toward those (the lean toward the counts fades as that one rises)."""
    turn = WEEK0 + 3 * WEEK_MS + 2 * HOUR  # just after a week began
    now = turn + 4 * DAY + 12 * HOUR  # the same week
    updater = updater_fed(turning_shop(150, turn), [700])
    habit = updater.state.habit
    assert habit.evidence(now, WEEKS) < COUNTS_LEAN_FULL  # the weeks' latest closed one is before the turn
    assert habit.evidence(now, TWO_DAYS) > LEAN_FULL
    assert habit.leans(now) == (1.0, 0.0) and updater.habit_leans(now) == (1.0, 0.0)
    # Before the turn the same shop leaned toward the counts alone.
    before = updater_fed([e for e in turning_shop(150, turn) if e["ts"] < turn], [700])
    assert before.state.habit.evidence(turn - HOUR, TWO_DAYS) < 0
    assert before.state.habit.leans(turn - HOUR) == (0.0, 1.0)


def detour_shop(users: int) -> list[dict]:
    """Users who keep their staple: each week three clicks on it, then one on a category met once and never again."""
    events = []
    for u in range(users):
        events += weeks(f"u{u}", [["staple"] * 3 + [f"d{u}-{w}"] for w in range(5)])
    return sorted(events, key=lambda e: e["ts"])


def test_top_categories_lean_toward_the_counts_where_what_was_met_last_does_not_come_again():
    """The mirror: in a shop whose users come back to their most clicked category and not to their latest one, every
    model weighs the log count (HABIT_COUNTS_WEIGHT), also one whose fitted weights rank the latest category first;
    heads fitted in such a shop learned that there, and get nothing more."""
    loaded = untrained(ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=256,
                                   query_buckets=64))
    assert loaded.model.fields.repeat_score.weight[0, HABIT_COUNT] == HABIT_COUNTS_WEIGHT
    with torch.no_grad():  # fitted weights that rank by being the latest category
        loaded.model.fields.repeat_score.weight[0, :HABIT_FRESHNESS] = 0.0
        loaded.model.fields.repeat_score.weight[0, SLOT_FEATURES.index("is_last")] = 1.0

    def top(events: list[dict], **options) -> tuple[str, float]:
        updater = updater_fed(events, [50], loaded, **options)
        profile = orjson.loads(updater.profiles_for(np.array([updater.state.row("heavy")]))[0][1])
        return profile["top_categories"][0]["category"], updater.state.habit.counts_lean(updater.state.max_event_ts)

    shop = detour_shop(120)
    in_shop = updater_fed(shop, [500], loaded)
    recency, counts = in_shop.state.habit.wins(WEEK0 + 5 * WEEK_MS)
    assert recency == 0 and counts > 2 * PRIOR_WEEKS
    assert in_shop.habit_leans(in_shop.state.max_event_ts) == (0.0, 1.0)  # what the daemon's gauges show
    # A user who clicked its staple 10 times and then z once: the staple comes first here ...
    heavy = weeks("heavy", [["staple"] * 10 + ["z"]], first_week=4)
    assert top(sorted(shop + heavy, key=lambda e: e["ts"])) == ("staple", 1.0)
    # ... z, the latest, where the shop has said nothing yet, and in the shop where users move on.
    assert top(heavy) == ("z", 0.0)
    assert top(sorted(drifting_shop(120) + heavy, key=lambda e: e["ts"]))[0] == "z"
    loaded.model.fields.habit_counts_lean_trained.fill_(1.0)
    assert top(sorted(shop + heavy, key=lambda e: e["ts"]), stream_calibration=False) == ("z", 1.0)
    # (The stream's own re-ranking sees it from the shop's first closed week: its users come back to their staple.)
    assert top(sorted(shop + heavy, key=lambda e: e["ts"])) == ("staple", 1.0)


def test_checkpoints_before_format_18_read_the_set_weight():
    """The shipped model is a format-17 file: it reads the habit with the weights every model has, as heads fitted
    in a shop whose users keep their staples but not as firmly as explorers do (its shop 0: both leans 0)."""
    demo = load_checkpoint("demo", ON_DEVICE)
    assert demo.model.fields.repeat_score.weight.shape[1] == len(SLOT_FEATURES)
    assert demo.model.fields.repeat_score.weight[0, HABIT_FRESHNESS] == HABIT_RECENCY_WEIGHT
    assert demo.model.fields.repeat_score.weight[0, HABIT_COUNT] == HABIT_COUNTS_WEIGHT
    assert float(demo.model.fields.habit_lean_trained) == float(demo.model.fields.habit_counts_lean_trained) == 0.0
    from click.testing import CliRunner

    from consumers.cli import main

    info = orjson.loads(CliRunner().invoke(main, ["model", "info", "demo", "--json"]).output)
    assert info["habit"] == {"weight": HABIT_RECENCY_WEIGHT, "lean_trained": 0.0,
                             "counts_weight": HABIT_COUNTS_WEIGHT, "counts_lean_trained": 0.0}


def test_checkpoints_of_format_18_and_19_serve_as_they_did(tmp_path):
    """Heads whose field stage counted the training shop's habit get no lean toward the counts (as if fitted at a
    full one); a format-19 file without that count, as the older formats, is read as fitted at none."""
    saved = untrained(ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=256,
                                  query_buckets=64))
    for habit, lean in (({"recency_weeks": 300, "counts_weeks": 400, "lean": 0.0}, 1.0), (None, 0.0),
                        ({"recency_weeks": 600, "counts_weeks": 90, "lean": 1.0}, 1.0)):
        payload = {"format": 19, "model_version": "old", "config": asdict(saved.model.config),
                   "state_dict": {k: v for k, v in saved.model.state_dict().items()
                                  if k != "fields.habit_counts_lean_trained"},
                   "metadata": {"fields": {"habit": habit}} if habit else {}}
        payload["state_dict"]["fields.repeat_score.weight"] = payload["state_dict"]["fields.repeat_score.weight"][
            :, :HABIT_COUNT]
        torch.save(payload, tmp_path / "old.pt")
        old = load_checkpoint(tmp_path / "old.pt", ON_DEVICE)
        assert old.model.fields.repeat_score.weight[0, HABIT_COUNT] == HABIT_COUNTS_WEIGHT
        assert float(old.model.fields.habit_counts_lean_trained) == lean
        # ... and the lean toward the latest categories their field stage noted (its fit had reset it to 0)
        assert float(old.model.fields.habit_lean_trained) == (habit or {}).get("lean", 0.0)


def test_the_field_stage_leaves_the_set_weight_where_it_is(tmp_path):
    """The fit moves the repeat score's fitted weights but not the habit's: one shop cannot say what it should be."""
    from models.dataset import load_events
    from models.field_training import train_fields
    from stream.generator import write_jsonl

    events = generate(users=200, events=8000, seed=1, shop=ShopParams.draw(1), span_days=40).events
    write_jsonl(events, tmp_path / "shop.jsonl")
    loaded = untrained(ModelConfig(hidden_size=8, memory_size=4, item_buckets=256, category_buckets=256,
                                   query_buckets=64))
    before = loaded.model.fields.repeat_score.weight.detach().clone()
    report = train_fields(loaded, load_events([tmp_path / "shop.jsonl"]), ON_DEVICE)
    after = loaded.model.fields.repeat_score.weight.detach()
    assert after[0, HABIT_FRESHNESS] == HABIT_RECENCY_WEIGHT
    assert not torch.equal(after[0, :HABIT_FRESHNESS], before[0, :HABIT_FRESHNESS])  # the others were fitted
    # The shop the heads learned in: its lean is kept (0 here, a generated shop whose users keep their staples).
    assert report["habit"]["recency_weeks"] + report["habit"]["counts_weeks"] > 0
    assert float(loaded.model.fields.habit_lean_trained) == report["habit"]["lean"] == 0.0
    assert after[0, HABIT_COUNT] == HABIT_COUNTS_WEIGHT
    assert float(loaded.model.fields.habit_counts_lean_trained) == report["habit"]["counts_lean"] == 0.0


def test_heads_keep_the_lean_toward_the_counts_their_shop_had_on_average_over_the_cuts(tmp_path):
    """A shop whose users keep their staples for five weeks, then move on every week: the heads are fitted on the
    early cuts, where it leans toward the counts, and the later ones, where it leans toward the latest categories,
    at once; they keep the counts lean on average over the cuts (neither the last cut's 0 nor the early cuts' 1)."""
    from models.dataset import load_events
    from models.field_training import train_fields
    from stream.generator import write_jsonl

    events = []
    for u in range(150):
        plan = [["staple"] * 3 + [f"d{u}-{w}"] for w in range(5)] + [[f"m{u}-{w}"] * 2 + [f"m{u}-{w + 1}"]
                                                                      for w in range(5, 12)]
        events += weeks(f"u{u}", plan)
    write_jsonl(sorted(events, key=lambda e: e["ts"]), tmp_path / "shop.jsonl")
    loaded = untrained(ModelConfig(hidden_size=4, memory_size=4, item_buckets=64, category_buckets=256,
                                   query_buckets=64))
    report = train_fields(loaded, load_events([tmp_path / "shop.jsonl"]), ON_DEVICE)
    assert report["habit"]["recency_weeks"] > 2 * PRIOR_WEEKS
    assert float(loaded.model.fields.habit_lean_trained) == report["habit"]["lean"] == 1.0
    assert float(loaded.model.fields.habit_counts_lean_trained) == pytest.approx(report["habit"]["counts_lean"])
    assert 0.1 < report["habit"]["counts_lean"] < 0.9


def test_an_event_arriving_late_in_a_batch_of_its_own_moves_neither_the_latest_category_nor_the_guesses():
    """A week-0 click that arrives after week 1's, alone in its batch: the latest category stays week 1's (as in one
    batch, where events are taken in time order), so week 2's guesses and the weeks won are the same whatever the
    batches (found by an independent review: recency's guess was the late category, and the week was not judged)."""
    late = click("u", 4, WEEK0 + 4 * HOUR, "a")
    events = weeks("u", [["a", "a", "b"], ["b"]]) + [late] + weeks("u", [["b"], ["c"]], first_week=2)
    runs = [updater_fed(events, sizes) for sizes in ([100], [5, 100], [4, 100], [1])]
    for updater in runs:
        names = updater.state.category_names
        row = updater.state.row("u")
        assert latest_week(updater, "u") == (1, 2)  # week 2: recency's guess b came again, the counts' a did not
        assert names[int(updater.state.columns["last_category"][row])] == "c"
    alone = updater_fed(events[:5], [1])  # the late click last, alone in its batch
    assert alone.state.category_names[int(alone.state.columns["last_category"][alone.state.row("u")])] == "b"
