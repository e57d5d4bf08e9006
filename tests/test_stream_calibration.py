"""The shop's own outcomes as a calibration (models/stream_calibration.py, stream/outcomes.py): each user's record
of an anchor is what the heads said at the anchor's clock, the counts are the same whatever the batches, the map
is fitted on them and kept only where it clearly beats the identity, and it moves what is published, never the
state."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import orjson
import pytest
import torch

from models.checkpoint_io import untrained
from models.next_event_evaluation import roc_auc
from models.stream_calibration import (
    GATE_NATS, GATE_NATS_PER_USER, HELD_OUT_GATE_NATS, IDLE_COLUMN, IDLE_QUANTILES, LEVEL_PULL, MAP_GATE_NATS,
    VOLATILE_RATE, WEEK_REACH_QUANTILE,
    LogitMap, StreamCalibration, fit_head, fit_logit_map, describe, logistic_fit, over_window, rate_volatility,
    WEEK_RULE_DIRECTIONS, hazard_share_fit, signed_week_fit, split_gain, split_idle_gain, statistics_design,
    week_share, week_statistics_held_out, with_model_level, with_share_power, with_statistics,
)
from stream import statistics
from stream.anchor_samples import (
    LOGIT_COLUMNS, RULE_STATISTICS, SAMPLE_ID_BYTES, SAMPLE_PER_PARTITION, STATISTIC_COLUMNS, STATISTICS,
    WEEK_LOGIT_COLUMN, WIDTH, AnchorSamples, Sample, encoded, stable_keys,
)
from stream.events import MAX_ID_CHARS
from models.update_step import ProfileUpdater
from stream.generator import ShopParams, generate
from stream.kafka import end_offsets
from stream.outcomes import (
    ANCHOR_COLUMNS, ANCHOR_MS, BINS, HEADS, KEPT, KEPT_ANCHORS, PHASES, RATE_ANCHORS, SERIES, bin_logits, logit_bins,
)
from stream.state import StateTable
from tests.helpers import (
    DEVICE, committed_offsets, create_topics, produce, record_batch, updater_fed, wait_until,
)

HOUR, DAY = 3_600_000, 86_400_000
K0 = 1_700_000_000_000 // ANCHOR_MS + 1  # an anchor
WEEK_SERIES = SERIES.index("churn_risk_week")
A = K0 * ANCHOR_MS  # its clock


def event(user: str, n: int, ts: int, kind: str = "click") -> dict:
    return {"event_id": f"{user}-{n}", "user_id": user, "type": kind, "ts": ts, "item_id": "i1", "category": "c1",
            "price": 5.0, **({"quantity": 1} if kind == "purchase" else {})}


def counts_from(probabilities: np.ndarray, truth: np.ndarray, users_per_bin: int, seed: int = 0) -> np.ndarray:
    """(BINS, 2) users by bin and outcome: users_per_bin in each bin whose logit `probabilities` covers,
    their outcomes drawn at the `truth` probability of the bin."""
    rng = np.random.default_rng(seed)
    n = np.where((probabilities > 0.02) & (probabilities < 0.98), users_per_bin, 0)
    yes = rng.binomial(n, truth)
    return np.stack([n - yes, yes], axis=1)


def test_over_a_window_cut_short_the_map_keeps_the_share_of_the_hazard_the_model_gives_it():
    """An evaluation whose log ends before the horizon asks for a shorter window: the map (fitted for the horizon)
    moves the horizon's probabilities, and the window keeps the model's share of the horizon's hazard. Where both
    the model and the shop have constant hazards (the shop's rate another than the model's), that is the shop's
    probability over the window; the identity map gives the model's own; a window as long as the horizon the
    mapped probability itself."""
    horizon, window = 336.0, 100.0
    model_rate, shop_rate = torch.tensor([0.001, 0.004, 0.006]), torch.tensor([0.002, 0.003, 0.009])  # per hour
    for head in (0, 1):  # purchase: the probability of the event; churn_risk: of its absence (no return)
        def probability(rate: torch.Tensor, hours: float) -> torch.Tensor:
            none = torch.exp(-rate.double() * hours)
            return (none if HEADS[head] == "churn_risk" else 1 - none).float()

        p_h, p_w = probability(model_rate, horizon), probability(model_rate, window)
        mapped = probability(shop_rate, horizon)
        np.testing.assert_allclose(over_window(head, mapped, p_h, p_w), probability(shop_rate, window), rtol=1e-4)
        np.testing.assert_allclose(over_window(head, p_h, p_h, p_w), p_w, rtol=1e-5)
        np.testing.assert_allclose(over_window(head, mapped, p_h, p_h), mapped, rtol=1e-5)
        # Through the map: kept, it is applied over the window; without the horizon's probabilities, or not kept,
        # the model's own stay.
        shop_map = LogitMap(a=(0.7, -0.4), b=(1.1, 0.9), kept=(True, True))
        np.testing.assert_allclose(shop_map.apply(head, p_w, window, None, p_h),
                                   over_window(head, shop_map.apply(head, p_h), p_h, p_w), rtol=1e-6)
        assert torch.equal(shop_map.apply(head, p_w, window), p_w)
        assert torch.equal(LogitMap().apply(head, p_w, window, None, p_h), p_w)


def test_the_map_finds_a_shift_and_keeps_the_identity_where_the_model_is_right():
    p = 1 / (1 + np.exp(-bin_logits()))
    truth = 1 / (1 + np.exp(-(0.8 + 0.6 * bin_logits())))  # the shop buys more, and the model is overconfident
    a, b, gain = fit_head(counts_from(p, truth, 200))
    assert abs(a - 0.8) < 0.1 and abs(b - 0.6) < 0.1 and gain > 100
    shifted = fit_logit_map(np.stack([counts_from(p, truth, 200), counts_from(p, p, 200, seed=1)]))
    assert shifted.kept == (True, False)  # the second head's outcomes follow what it says
    assert shifted.users[0] == int(counts_from(p, truth, 200).sum())
    assert shifted.gain_nats[1] < MAP_GATE_NATS[1]
    # A small shift over many users: churn_risk's map is kept from MAP_GATE_NATS on, purchase_propensity's only where
    # it also gains GATE_NATS_PER_USER a user (in the demo's own shops such maps made purchase_propensity worse).
    slight = 1 / (1 + np.exp(-(0.1 + bin_logits())))
    many = fit_logit_map(np.stack([counts_from(p, slight, 2000, seed=2)] * 2))
    assert GATE_NATS < many.gain_nats[0] < GATE_NATS_PER_USER[0] * many.users[0]
    assert many.kept == (False, True)
    # A model too sure by a little, over 1,920 users: a likelihood-ratio test keeps churn_risk's map (7 nats: p < 0.001
    # for two parameters), which purchase_propensity's gate (15 nats) leaves at the identity.
    flatter = fit_logit_map(np.stack([counts_from(p, 1 / (1 + np.exp(-0.85 * bin_logits())), 60)] * 2))
    assert MAP_GATE_NATS[1] < flatter.gain_nats[1] < GATE_NATS and flatter.kept == (False, True)
    assert 0.75 < flatter.b[1] < 0.9
    published = shifted.apply(0, torch.tensor([0.2, 0.5]))
    expected = 1 / (1 + np.exp(-(shifted.a[0] + shifted.b[0] * np.log([0.25, 1.0]))))
    np.testing.assert_allclose(published.numpy(), expected, rtol=1e-5)
    assert torch.equal(shifted.apply(1, torch.tensor([0.2, 0.5])), torch.tensor([0.2, 0.5]))
    # Where the users ranked higher did it less, the map would turn the ranking over: only the level moves.
    inverted = counts_from(p, 1 / (1 + np.exp(-(-2.0 - 0.5 * bin_logits()))), 200)
    a, b, gain = fit_head(inverted)
    assert b == 1.0 and a < -1 and gain > 0
    # The fit it fell back from found that inverted slope: its steps climb (a plain Newton step from the identity
    # overshot there and went on to a = -1,910, b = 4,305).
    free = logistic_fit(np.stack([np.ones(BINS), bin_logits()], axis=1), inverted[:, 1], inverted[:, 0])
    np.testing.assert_allclose(free, [-2.0, -0.5], atol=0.1)


def test_churn_risk_follows_a_shop_whose_users_go_quiet_more_since_its_map_was_fitted():
    p = 1 / (1 + np.exp(-bin_logits()))
    quieter = 1 / (1 + np.exp(-(bin_logits() + 1.0)))  # a logit more silent than the model says
    calibration = StreamCalibration(StateTable(8, torch.device(DEVICE)), probabilities=None)
    outcomes = calibration.state.outcomes
    # Churn's latest matured anchor: the model was right then; a week's silence since has grown by a logit.
    outcomes.counts = {(1, -1, K0): counts_from(p, p, 200), (WEEK_SERIES, -1, K0): counts_from(p, p, 200, seed=1),
                       (WEEK_SERIES, -1, K0 + 1): counts_from(p, quieter, 200, seed=2)}
    outcomes.version += 1
    shop_map = calibration.shop_map()
    assert shop_map.kept[1] and abs(shop_map.drift[1] - 1.0) < 0.15 and shop_map.a[1] == shop_map.drift[1]
    assert shop_map.b[1] == 1.0 and not shop_map.kept[0]
    # The same silence as then: the map fitted on the older anchor (here the identity) moves by the noise of two
    # draws of the week's silence only (a move is applied whatever its size).
    outcomes.counts[(WEEK_SERIES, -1, K0 + 1)] = counts_from(p, p, 200, seed=2)
    outcomes.version += 1
    fitted, shop_map = fit_logit_map(outcomes.total()), calibration.shop_map()
    assert not fitted.kept[1] and abs(shop_map.drift[1]) < 0.1
    assert (shop_map.a[1], shop_map.b[1]) == (shop_map.drift[1], 1.0) and shop_map.kept[0] == fitted.kept[0]
    # A week series without the anchor the map is fitted on says nothing of how the shop moved since.
    del outcomes.counts[(WEEK_SERIES, -1, K0)]
    outcomes.counts[(WEEK_SERIES, -1, K0 + 1)] = counts_from(p, quieter, 200, seed=2)
    outcomes.version += 1
    assert calibration.shop_map().drift == (0.0, 0.0)


def test_a_young_tables_churn_risk_is_mapped_on_the_weeks_silence_through_the_models_share_of_the_hazard():
    """Before any anchor's two weeks have closed, churn_risk's map is fitted on who stayed away the week after the
    latest anchor whose week has: the mapped probability over the horizon, read over the week with the model's
    share of the hazard, says the week's silence. Users return at constant rates and the model says half of each
    (so it over-reads silence): the map fitted on the week brings the horizon's probabilities to the shop's. Where
    the model is right the identity stays; once an anchor's two weeks have closed its counts make the map."""
    rng = np.random.default_rng(5)
    rate = rng.lognormal(np.log(0.4), 1.0, size=4000)  # returns per week
    x = np.zeros((len(rate), WEEK_LOGIT_COLUMN + 1))
    silent_a_week = rng.random(len(rate)) < np.exp(-rate)
    truth = np.exp(-2 * rate)  # silent two weeks: the horizon
    for told, kept in ((0.5, True), (1.0, False)):
        said_horizon, said_week = np.exp(-2 * told * rate), np.exp(-told * rate)
        x[:, LOGIT_COLUMNS[1]] = np.log(said_horizon) - np.log1p(-said_horizon)
        x[:, WEEK_LOGIT_COLUMN] = np.log(said_week) - np.log1p(-said_week)
        calibration = StreamCalibration(StateTable(8, torch.device(DEVICE)), probabilities=None)
        samples = calibration.state.outcomes.samples
        samples.put(K0, np.zeros(len(rate), dtype=np.int64), np.array([f"u{i}" for i in range(len(rate))]), x)
        samples.samples[(0, K0)].week_silent = silent_a_week
        shop_map = calibration.shop_map()
        assert shop_map.kept == (False, kept) and shop_map.churn_from_week == kept
        if not kept:
            assert shop_map.gain_nats[1] < GATE_NATS
            continue
        assert shop_map.gain_nats[1] >= GATE_NATS and shop_map.users[1] == len(rate)
        assert "stayed away the week" in describe(shop_map)
        published = shop_map.apply(1, torch.from_numpy(said_horizon)).double().numpy()
        assert np.abs(published - truth).mean() < 0.03 < np.abs(said_horizon - truth).mean() - 0.05
        # The week after a table's first anchor (counted for it alone): the level moves, the slope stays 1, and the
        # published probabilities come nearer the truth than the model's own.
        outcomes = calibration.state.outcomes
        outcomes.complete_from, outcomes.purchase_sooner = K0 + 2, True
        outcomes.version += 1
        start = calibration.shop_map()
        assert start.kept[1] and start.churn_from_week and start.b[1] == 1.0 and start.a[1] < 0  # (it over-read)
        level = start.apply(1, torch.from_numpy(said_horizon)).double().numpy()
        assert np.abs(level - truth).mean() < np.abs(said_horizon - truth).mean() - 0.05
        outcomes.complete_from, outcomes.purchase_sooner = None, None
        outcomes.version += 1
        # A restored record keeps who stayed away the week; one of session 61 or before has no such column.
        restored = AnchorSamples.from_plain(orjson.loads(orjson.dumps(samples.to_plain())))
        assert restored.samples[(0, K0)].week_silent.tolist() == silent_a_week.tolist()
        older = [[p, at, *rest[:8]] for p, at, *rest in samples.to_plain()]
        assert AnchorSamples.from_plain(older).samples[(0, K0)].week_silent is None
        # An anchor's two weeks closed: its counts make churn_risk's map, as before.
        p = 1 / (1 + np.exp(-bin_logits()))
        calibration.state.outcomes.counts = {(1, 0, K0 - 1): counts_from(p, p, 200)}
        calibration.state.outcomes.version += 1
        assert calibration.shop_map() == fit_logit_map(calibration.state.outcomes.total())


def test_a_young_tables_week_map_weighs_the_rules_statistics_where_they_rank_the_week_clearly_better():
    """A model from an unlike shop ranks these users' silence by noise; how long each has been idle says who comes
    back (the return rate falls with it). The week's map then weighs the rules' statistics, and the published churn_risk
    ranks the users as their idle time does. A model that ranks them as well as the statistics keeps its own ranking:
    the statistics would add no rank, only noise (the shipped demo in the classic shops)."""
    rng = np.random.default_rng(11)
    n = 4000
    idle = rng.uniform(2.0, 10.0, size=n)  # log idle minutes
    rate = np.exp(1.5 - 0.45 * idle)  # returns per week
    silent_a_week = rng.random(n) < np.exp(-rate)
    truth = np.exp(-2 * rate)
    idle_column = STATISTIC_COLUMNS[1][STATISTICS[1].index("log_idle_minutes")]
    for said_rate, weighs in ((rate * np.exp(rng.normal(0.0, 1.0, size=n)), True), (rate, False)):
        x = np.zeros((n, WEEK_LOGIT_COLUMN + 1))
        said_horizon, said_week = (np.clip(np.exp(-k * said_rate), 1e-6, 1 - 1e-6) for k in (2, 1))  # as sampled
        x[:, LOGIT_COLUMNS[1]] = np.log(said_horizon) - np.log1p(-said_horizon)
        x[:, WEEK_LOGIT_COLUMN] = np.log(said_week) - np.log1p(-said_week)
        x[:, idle_column] = idle
        calibration = StreamCalibration(StateTable(8, torch.device(DEVICE)), probabilities=None)
        samples = calibration.state.outcomes.samples
        samples.put(K0, np.zeros(n, dtype=np.int64), np.array([f"u{i}" for i in range(n)]), x)
        samples.samples[(0, K0)].week_silent = silent_a_week
        shop_map = calibration.shop_map()
        assert (shop_map.weights[1] is not None) == weighs
        if not weighs:  # (right: no map at all here, the identity gains too little)
            continue
        assert shop_map.churn_from_week and shop_map.kept[1]
        assert len(shop_map.weights[1]) == RULE_STATISTICS[1] and shop_map.weights[1][0] > 0  # idle: more silent
        assert shop_map.weights_held_out_nats[1] >= HELD_OUT_GATE_NATS and "stayed away the week" in describe(shop_map)
        user = np.zeros((n, len(statistics.USER_FEATURES)), dtype=np.float32)
        user[:, statistics.USER_FEATURES.index("log_idle_minutes")] = idle
        published = shop_map.apply(1, torch.from_numpy(said_horizon), None, torch.from_numpy(user)).double().numpy()
        silent = rng.random(n) < truth  # who stays away the two weeks
        assert roc_auc(published, silent) > roc_auc(said_horizon, silent) + 0.05
        # Where that week is the one after a table's first anchor (counted for it alone: its users are those active
        # when the table started), the statistics are not weighed (nor the slope: here the level is right).
        calibration.state.outcomes.complete_from, calibration.state.outcomes.purchase_sooner = K0 + 2, True
        calibration.state.outcomes.version += 1
        start = calibration.shop_map()
        assert start.weights[1] is None and start.b[1] == 1.0
        # A statistic that overflowed its float16 column says nothing, and stops no map.
        x[:7, idle_column] = np.inf
        design = statistics_design(x, 1, every=False)
        assert week_statistics_held_out(design, week_share(x), silent_a_week.astype(np.float64)) == (0.0, 0.0)


def week_sample(said_rate: np.ndarray, **churn_statistics: np.ndarray) -> np.ndarray:
    """A young table's sample columns (x) for users the model says return at `said_rate` a week: churn_risk's logit
    over the horizon (two weeks) and over a week, and the named churn statistics."""
    x = np.zeros((len(said_rate), WEEK_LOGIT_COLUMN + 1))
    said_horizon, said_week = (np.clip(np.exp(-k * said_rate), 1e-6, 1 - 1e-6) for k in (2, 1))
    x[:, LOGIT_COLUMNS[1]] = np.log(said_horizon) - np.log1p(-said_horizon)
    x[:, WEEK_LOGIT_COLUMN] = np.log(said_week) - np.log1p(-said_week)
    for name, values in churn_statistics.items():
        x[:, STATISTIC_COLUMNS[1][STATISTICS[1].index(name)]] = values
    return x


def young_week_map(said_rate: np.ndarray, rate: np.ndarray, idle: np.ndarray, seed: int = 0) -> LogitMap:
    """churn_risk's map of a young table whose users (idle `idle` log minutes at the anchor) return at `rate` a week,
    the model saying `said_rate`: fitted on who stayed away the week after the anchor (with_week)."""
    rng = np.random.default_rng(seed)
    x = week_sample(said_rate, log_idle_minutes=idle)
    calibration = StreamCalibration(StateTable(8, torch.device(DEVICE)), probabilities=None)
    samples = calibration.state.outcomes.samples
    samples.put(K0, np.zeros(len(rate), dtype=np.int64), np.array([f"u{i}" for i in range(len(rate))]), x)
    samples.samples[(0, K0)].week_silent = rng.random(len(rate)) < np.exp(-rate)
    return calibration.shop_map()


def test_a_young_tables_week_map_weighs_each_rule_statistic_only_as_its_rule_reads_churn():
    """Users who come back every one to two weeks: one who has just been is the likeliest to stay away the next week,
    and a fit on the week's silence weighs idle time negative, which read over the two weeks ranks the long idle
    (in a shop whose users also leave for good) as the likeliest to return. The week's map keeps each rule's
    statistic in its rule's direction: one fitted the other way is left out and the others fitted again."""
    rng = np.random.default_rng(21)
    n = 4000
    idle = rng.uniform(4.0, 9.5, size=n)  # log idle minutes: up to ten days
    activity = np.log1p(rng.poisson(4.0, size=n))  # log events of the last 7 days
    # Periodic visitors: due back the longer they have been away (a week's return rate rising with idle time), the
    # busier sooner.
    rate = np.exp(-4.0 + 0.45 * idle + 0.6 * activity)
    said_rate = rate * np.exp(rng.normal(0.0, 1.0, size=n))  # a model from an unlike shop: noise around it
    x = week_sample(said_rate, log_idle_minutes=idle, log_activity_7d=activity)
    silent = (rng.random(n) < np.exp(-rate)).astype(np.float64)
    design, share = statistics_design(x, 1, every=False), week_share(x)
    free = hazard_share_fit(design, share, silent)
    assert free[2] < 0  # left free, the week's fit weighs idle time toward coming back
    kept = signed_week_fit(design, share, silent)
    assert kept[2] == 0.0 and (kept[2:] * WEEK_RULE_DIRECTIONS >= 0).all()
    assert kept[3] < 0  # the week's activity still weighed, as its rule reads it: more activity, less churn


def test_past_the_idle_time_of_its_users_a_week_map_lowers_no_users_churn_risk_below_the_models():
    """A young table's week map is fitted on users none of whom has been idle longer than the table is old. Where
    it lowers churn_risk (the model over-reads silence), users idle well past its sample are published at the
    model's own; within the sample, mapped. Where it raises churn_risk, the users past it are raised too."""
    rng = np.random.default_rng(3)
    n = 4000
    idle = rng.uniform(3.0, 8.0, size=n)  # log idle minutes at the anchor: up to two days
    rate = rng.lognormal(np.log(0.4), 1.0, size=n)
    user = np.zeros((3, len(statistics.USER_FEATURES)), dtype=np.float32)
    user[:, statistics.USER_FEATURES.index("log_idle_minutes")] = [5.0, 8.0 + np.log(2.0) + 0.1, 12.0]
    said = torch.tensor([0.5, 0.6, 0.7])
    for told, lowers in ((0.5, True), (2.0, False)):  # the model says half / twice each user's return rate
        shop_map = young_week_map(told * rate, rate, idle)
        assert shop_map.kept[1] and shop_map.churn_from_week and (shop_map.a[1] < 0) == lowers
        assert 7.9 < shop_map.idle_reach[1] < 8.0
        published = shop_map.apply(1, said, None, torch.from_numpy(user))
        mapped = replace(shop_map, idle_reach=(None, None)).apply(1, said, None, torch.from_numpy(user))
        assert published[0] == mapped[0] and (mapped[0] < said[0]) == lowers  # within the sample: the map's
        if lowers:
            torch.testing.assert_close(published[1:], said[1:])  # past it: the model's own
        else:
            torch.testing.assert_close(published[1:], mapped[1:])  # raised, as the map says
            assert (published[1:] > said[1:]).all()
    # A map of a table's later anchors (two weeks closed) has no reach: it was fitted on users of every idle time.
    p = 1 / (1 + np.exp(-bin_logits()))
    assert fit_logit_map(np.stack([counts_from(p, p, 200), counts_from(p, p, 200)])).idle_reach == (None, None)


def first_purchases_calibration(said_rate: np.ndarray, rate: np.ndarray, idle: np.ndarray) -> StreamCalibration:
    """A young table whose users (idle `idle` log minutes at its first anchor) buy at `rate` a week, the model saying
    `said_rate`: who bought in the week after that anchor, noted outside purchase_propensity's series."""
    rng = np.random.default_rng(7)
    said = 1 - np.exp(-said_rate)
    x = np.zeros((len(rate), WEEK_LOGIT_COLUMN + 1))
    x[:, LOGIT_COLUMNS[0]] = np.log(said) - np.log1p(-said)
    x[:, STATISTIC_COLUMNS[1][STATISTICS[1].index("log_idle_minutes")]] = idle
    calibration = StreamCalibration(StateTable(8, torch.device(DEVICE)), probabilities=None)
    samples = calibration.state.outcomes.samples
    samples.put(K0, np.zeros(len(rate), dtype=np.int64), np.array([f"u{i}" for i in range(len(rate))]), x)
    samples.samples[(0, K0)].week_bought = rng.random(len(rate)) < 1 - np.exp(-rate)
    return calibration


def test_before_its_own_anchor_matures_purchase_propensity_is_mapped_on_the_purchases_after_the_first_anchor():
    """purchase_propensity's series counts a table's anchors from its second: until one matures (15-21 days in) the
    model's own was published, whatever the shop. The week's purchases of the users sampled at the table's first
    anchor make its map meanwhile: it brings their probabilities to the shop's, and past the idle time of those
    users it raises no one above the model's own (they were not in the sample); a map that lowers lowers them too.
    Where the model is right the identity stays; once the series' own anchor matured its counts make the map."""
    rng = np.random.default_rng(11)
    n = 4000
    idle = rng.uniform(3.0, 8.0, size=n)  # log idle minutes at the anchor: up to two days
    rate = rng.lognormal(np.log(0.3), 1.0, size=n)  # purchases a week
    user = np.zeros((3, len(statistics.USER_FEATURES)), dtype=np.float32)
    user[:, statistics.USER_FEATURES.index("log_idle_minutes")] = [5.0, 8.0 + np.log(2.0) + 0.1, 12.0]
    said = torch.tensor([0.3, 0.2, 0.1])
    truth = torch.from_numpy(1 - np.exp(-rate))
    for told, kept in ((0.25, True), (4.0, True), (1.0, False)):
        calibration = first_purchases_calibration(told * rate, rate, idle)
        shop_map = calibration.shop_map()
        assert shop_map.kept == (kept, False) and shop_map.purchase_from_table_start == kept
        if not kept:
            continue
        raises = told < 1
        assert (shop_map.a[0] > 0) == raises and 7.9 < shop_map.idle_reach[0] < 8.0 and shop_map.idle_reach[1] is None
        assert "bought the week after the table's first anchor" in describe(shop_map)
        said_rates = torch.from_numpy(1 - np.exp(-told * rate))
        published = shop_map.apply(0, said_rates).double()
        assert (published - truth).abs().mean() < 0.035 < (said_rates - truth).abs().mean() - 0.05
        reached = shop_map.apply(0, said, None, torch.from_numpy(user))
        mapped = replace(shop_map, idle_reach=(None, None)).apply(0, said, None, torch.from_numpy(user))
        assert reached[0] == mapped[0] and (mapped[0] > said[0]) == raises  # within the sample: the map's
        if raises:
            torch.testing.assert_close(reached[1:], said[1:])  # past it: the model's own
        else:
            torch.testing.assert_close(reached[1:], mapped[1:])  # lowered, as the map says
            assert (reached[1:] < said[1:]).all()
        # A restored record keeps who bought; one of session 76 or before has no such column.
        samples = calibration.state.outcomes.samples
        restored = AnchorSamples.from_plain(orjson.loads(orjson.dumps(samples.to_plain())))
        assert restored.samples[(0, K0)].week_bought.tolist() == samples.samples[(0, K0)].week_bought.tolist()
        older = [[p, at, *rest[:11]] for p, at, *rest in samples.to_plain()]
        assert AnchorSamples.from_plain(older).samples[(0, K0)].week_bought is None
        # The series' own anchor matured: its counts make purchase_propensity's map, as before.
        p = 1 / (1 + np.exp(-bin_logits()))
        calibration.state.outcomes.counts = {(0, 0, K0 + 1): counts_from(p, p, 200)}
        calibration.state.outcomes.version += 1
        assert calibration.shop_map() == fit_logit_map(calibration.state.outcomes.total())


def test_over_a_window_cut_short_churn_risk_splits_the_hazard_as_the_shop_did_the_week_after_the_maps_anchor():
    """The model splits the two weeks' hazard evenly (constant rates); in this shop a user away a week is likelier to
    stay away the next (the second week's rate half the first's): the users sampled at the map's anchor who stayed
    away the week after it give the power of the model's share that reads the week as the shop does. Where the shop
    splits it as the model does, the power stays near 1; without the map kept, the model's own stand."""
    rng = np.random.default_rng(9)
    rate = rng.lognormal(np.log(0.4), 1.0, size=4000)  # the first week's
    horizon = np.exp(-1.5 * rate)  # the model is right over the horizon (the map: the identity, kept)
    x = np.zeros((len(rate), WEEK_LOGIT_COLUMN + 1))
    x[:, LOGIT_COLUMNS[1]] = np.log(horizon) - np.log1p(-horizon)
    said_week = np.exp(-0.75 * rate)  # half the horizon's hazard, as the model splits it
    x[:, WEEK_LOGIT_COLUMN] = np.log(said_week) - np.log1p(-said_week)
    kept = LogitMap(kept=(False, True))
    for second_week, expected in ((0.5, np.log(2 / 3) / np.log(0.5)), (1.0, 1.0)):
        truth = np.exp(-rate) if second_week == 0.5 else said_week  # silent the week after the anchor
        stayed_away = rng.random(len(rate)) < truth
        fitted = with_share_power(kept, x, stayed_away)
        assert abs(fitted.churn_share_power - expected) < 0.1
        week = fitted.apply(1, torch.from_numpy(said_week).float(), 168.0, None, torch.from_numpy(horizon).float())
        assert np.abs(week.double().numpy() - truth).mean() < 0.02
        if second_week == 0.5:
            assert np.abs(said_week - truth).mean() > 0.05  # the model's own split
            assert f"to the power {fitted.churn_share_power:.2f}" in describe(fitted)  # the log line says it
    assert with_share_power(LogitMap(), x, stayed_away) == LogitMap()


def test_the_fit_on_the_statistics_finds_their_weight_and_is_kept_only_where_they_add_to_the_logit():
    rng = np.random.default_rng(3)
    x = np.zeros((4000, WIDTH))
    x[:, :2] = rng.normal(-1, 1.5, size=(4000, 2))  # both heads' logits
    x[:, 2:] = rng.normal(0, 1, size=(4000, WIDTH - 2))  # the statistics
    due = STATISTIC_COLUMNS[0][STATISTICS[0].index("order_due")]
    buys = rng.random(4000) < 1 / (1 + np.exp(-(x[:, 0] + 1.0 * x[:, due])))  # being due counts beyond the logit
    moved = with_statistics(LogitMap(), 0, x, buys)
    assert moved.kept[0] and moved.weights[1] is None and not moved.kept[1]
    weights = dict(zip(STATISTICS[0], moved.weights[0]))
    assert abs(weights["order_due"] - 1.0) < 0.15 and all(abs(w) < 0.15 for s, w in weights.items() if s != "order_due")
    assert abs(moved.a[0]) < 0.15 and abs(moved.b[0] - 1.0) < 0.1 and moved.sampled[0] == 4000
    p = torch.tensor(1 / (1 + np.exp(-x[:5, 0])))
    user = torch.zeros(5, len(statistics.USER_FEATURES), dtype=torch.float64)
    user[:, statistics.USER_FEATURES.index("order_due")] = torch.from_numpy(x[:5, due])
    expected = 1 / (1 + np.exp(-(moved.a[0] + moved.b[0] * x[:5, 0] + weights["order_due"] * x[:5, due])))
    np.testing.assert_allclose(moved.apply(0, p, None, user).numpy(), expected, rtol=2e-3)
    # Outcomes the logit alone says: the statistics' four weights more are noise, and the affine map stays.
    plain = rng.random(4000) < 1 / (1 + np.exp(-x[:, 0]))
    kept = with_statistics(LogitMap(), 0, x, plain)
    assert kept.weights == (None, None) and not kept.kept[0] and 0 <= kept.weights_gain_nats[0] < 15


def sampled_at_two_anchors(head: int, rng: np.random.Generator, log_odds) -> ProfileUpdater:
    """An updater holding samples of 2,000 users at anchors K0 - 3 and K0 - 2, the head's window closed at both:
    x drawn at random (both heads' logits about -1), the head's outcome at sigmoid(log_odds(x))."""
    updater = updater_fed([event("someone", 0, A)], [1])
    for anchor in (K0 - 3, K0 - 2):
        x = rng.normal(0, 1, size=(WIDTH, 2000)).T  # column by column: the first columns do not hang on how many follow
        x[:, :2] = rng.normal(-1, 1.5, size=(2000, 2))  # both heads' logits
        happened = rng.random(2000) < 1 / (1 + np.exp(-log_odds(x)))
        # Users the state does not hold: whether they bought or came back is what they left with.
        left = np.zeros((2000, 2), dtype=bool)
        left[:, head] = happened if head == 0 else ~happened
        users = np.array([f"gone-{anchor}-{i}" for i in range(2000)], dtype=object)
        updater.state.outcomes.samples.samples[(0, anchor)] = Sample(users, x.astype(np.float16), left=left)
        updater.calibration.note_sampled(anchor, head)
    return updater


def test_past_the_idle_time_of_its_samples_users_no_purchase_map_raises_a_user_above_the_models_own():
    """Every purchase_propensity map has seen, in its latest matured anchor's sample, no user idle longer than
    those: past them (its reach) it raises no one above the model's own. churn_risk's two weeks' map has none."""
    updater = sampled_at_two_anchors(0, np.random.default_rng(9), lambda x: x[:, 0] + 1.5)  # the model under-reads
    p = 1 / (1 + np.exp(-bin_logits()))
    updater.state.outcomes.counts = {(0, 0, K0 - 2): counts_from(p, 1 / (1 + np.exp(-bin_logits() - 1.5)), 200)}
    updater.state.outcomes.version += 1
    shop_map = updater.calibration.shop_map()
    sampled = updater.state.outcomes.samples.latest_matured(0)[0]
    reach = float(np.quantile(sampled[:, IDLE_COLUMN], WEEK_REACH_QUANTILE))
    assert shop_map.kept[0] and shop_map.a[0] > 0.5 and shop_map.idle_reach == (reach, None)
    user = torch.zeros(2, len(statistics.USER_FEATURES), dtype=torch.float64)
    user[:, statistics.USER_FEATURES.index("log_idle_minutes")] = torch.tensor([reach - 1.0, reach + 1.0])
    said = torch.tensor([0.2, 0.2])
    published = shop_map.apply(0, said, None, user)
    assert published[0] > said[0] + 0.05  # within the sample: raised
    torch.testing.assert_close(published[1], said[1])  # past it: the model's own


@pytest.mark.parametrize("head, which", [(0, 0), (1, 0), (1, -1)])
def test_the_rhythm_beyond_the_rules_is_weighed_only_where_the_previous_anchors_weights_held_on_the_next(head, which):
    """A head's statistics beyond the rules' join its fit only where the weights fitted on the previous matured
    anchor's sample said the latest one's outcomes better than the rules' statistics alone (weights fitted on a
    young table's first weeks can rank worse two weeks on, however well they fit their own anchor). The first of
    them, and churn_risk's last: the searches' share of the latest visit, which the heads do not read."""
    rule = STATISTIC_COLUMNS[head][0]  # the sample's column of the head's first statistic (a rule's)
    position = RULE_STATISTICS[head] if which == 0 else len(STATISTICS[head]) - 1  # of one beyond the rules'
    beyond = STATISTIC_COLUMNS[head][position]
    assert which == 0 or STATISTICS[head][position] == "visit_search_share"
    # (Where the statistics beyond the rules' add nothing, their fit still holds out by HELD_OUT_GATE_NATS in about
    # one draw in twenty-five: this test's draw is not one.)
    for weight, judged in ((1.5, True), (0.0, False)):
        rng = np.random.default_rng(7)
        updater = sampled_at_two_anchors(head, rng, lambda x: x[:, head] + x[:, rule] + weight * x[:, beyond])
        samples = updater.state.outcomes.samples
        assert samples.samples[(0, K0 - 3)].held_out == [None, None]  # no matured anchor before it
        held_out = samples.samples[(0, K0 - 2)].held_out
        assert (held_out[head] >= HELD_OUT_GATE_NATS) == judged and held_out[1 - head] is None
        updater.state.outcomes.version += 1
        weights = updater.calibration.shop_map().weights[head]
        assert len(weights) == (len(STATISTICS[head]) if judged else RULE_STATISTICS[head])
        if judged:
            assert abs(weights[position] - weight) < 0.25
        # A restart reads the same verdict and fit.
        restored = AnchorSamples.from_plain(orjson.loads(orjson.dumps(samples.to_plain())))
        assert restored.samples[(0, K0 - 2)].held_out == held_out
        # A meta record of session 58 (the rules' statistics alone, no verdict) restores with its columns, and its
        # fit weighs the rules' statistics only.
        narrow = 2 + sum(RULE_STATISTICS)
        old = [[p, at, rest[0], encoded(Sample.from_plain(rest).x[:, :narrow], "<f2"), *rest[2:6]]
               for p, at, *rest in samples.to_plain()]
        updater.state.outcomes.samples = AnchorSamples.from_plain(old)
        assert updater.state.outcomes.samples.samples[(0, K0 - 2)].x.shape == (2000, narrow)
        updater.state.outcomes.version += 1
        assert len(updater.calibration.shop_map().weights[head]) == RULE_STATISTICS[head]
        updater.calibration.note_sampled(K0 - 2, head)  # judged again: the older record lacks the statistics
        assert updater.state.outcomes.samples.samples[(0, K0 - 2)].held_out[head] is None


def test_churn_risks_fit_bends_in_idle_time_where_the_bend_held_out_of_time():
    """Where the odds of staying away climb with idle time along no straight line of its log (here: flat, then
    steep past the middle of the sampled users' idle times), churn_risk's fit on its statistics bends there: the bend
    fitted on the previous matured anchor's sample says the latest one's outcomes better than the straight fit, and
    the map weighs log idle minutes past the sampled users' quartiles of it, at serving too. Where the odds climb
    along a straight line, the bend holds out by less than HELD_OUT_GATE_NATS and the fit stays straight. The verdict
    survives a restart; a record of session 66 or before holds none."""
    idle = STATISTIC_COLUMNS[1][STATISTICS[1].index("log_idle_minutes")]
    for log_odds, bends in ((lambda x: x[:, 1] + 2.5 * np.maximum(x[:, idle], 0.0), True),
                            (lambda x: x[:, 1] + 1.2 * x[:, idle], False)):
        updater = sampled_at_two_anchors(1, np.random.default_rng(5), log_odds)
        samples = updater.state.outcomes.samples
        assert samples.samples[(0, K0 - 3)].idle_held_out is None  # no matured anchor before it
        judged = samples.samples[(0, K0 - 2)].idle_held_out
        assert (judged >= HELD_OUT_GATE_NATS) == bends
        assert samples.samples[(0, K0 - 2)].held_out[0] is None  # (purchase_propensity's window is not judged here)
        updater.state.outcomes.version += 1
        fitted = updater.calibration.shop_map()
        assert fitted.weights[1] is not None and fitted.idle_held_out_nats == judged
        assert (fitted.idle_weights is not None) == bends
        if not bends:
            assert abs(fitted.weights[1][0] - 1.2) < 0.2  # the straight weight on log idle minutes
            continue
        x, _, *_ = samples.latest_matured(1)
        knots = np.quantile(x[:, idle], IDLE_QUANTILES)
        np.testing.assert_allclose(fitted.idle_knots, knots)
        # flat below the middle knot, about 2.5 past it: the weights past the knots add up along the line
        slopes = fitted.weights[1][0] + np.cumsum(fitted.idle_weights)
        assert abs(fitted.weights[1][0]) < 0.4 and abs(slopes[0]) < 0.6 and abs(slopes[-1] - 2.5) < 0.5
        assert "log_idle_minutes past" in describe(fitted)
        # Published: the bend read from the user's statistics at the clock.
        p = torch.tensor(1 / (1 + np.exp(-x[:5, 1])))
        user = torch.zeros(5, len(statistics.USER_FEATURES), dtype=torch.float64)
        for name, column in zip(STATISTICS[1], STATISTIC_COLUMNS[1]):
            user[:, statistics.USER_FEATURES.index(name)] = torch.from_numpy(x[:5, column])
        z = (fitted.a[1] + fitted.b[1] * x[:5, 1] + x[:5, list(STATISTIC_COLUMNS[1][:len(fitted.weights[1])])]
             @ np.array(fitted.weights[1]) + np.maximum(x[:5, idle, None] - knots, 0) @ np.array(fitted.idle_weights))
        np.testing.assert_allclose(fitted.apply(1, p, None, user).numpy(), 1 / (1 + np.exp(-z)), rtol=2e-3)
        straight = replace(fitted, idle_knots=None, idle_weights=None)
        assert np.abs(straight.apply(1, p, None, user).numpy() - 1 / (1 + np.exp(-z))).max() > 0.01
        restored = AnchorSamples.from_plain(orjson.loads(orjson.dumps(samples.to_plain())))
        assert restored.samples[(0, K0 - 2)].idle_held_out == judged
        older = [[p, at, *rest[:10]] for p, at, *rest in samples.to_plain()]  # a record of session 66
        assert AnchorSamples.from_plain(older).samples[(0, K0 - 2)].idle_held_out is None
        # Without an earlier anchor's verdict, each half of the sample judges the bend fitted on the other.
        yes = samples.latest_matured(1)[1].astype(np.float64)
        first = with_statistics(LogitMap(), 1, x, yes > 0.5, None, None, None)
        # (no verdict held on the statistics beyond the rules': the fit weighs the rules' alone)
        assert first.idle_held_out_nats == pytest.approx(split_idle_gain(x, yes, False))
        assert first.idle_weights is not None


@pytest.mark.parametrize("head", range(len(HEADS)))
def test_the_rules_statistics_that_held_out_of_time_join_the_fit_below_the_in_sample_gate(head):
    """A rule's statistic that adds a little to the logit gains less than GATE_NATS on its own anchor's users, but
    the fit on it from the previous matured anchor says the latest one's outcomes better than the affine map fitted
    there: it joins the map. A statistic that adds nothing does not. A record of session 60 or before holds no
    such verdict: it restores without one."""
    rule = STATISTIC_COLUMNS[head][0]
    for weight, joins in (((0.35, 0.25)[head], True), (0.0, False)):
        updater = sampled_at_two_anchors(head, np.random.default_rng(11), lambda x: x[:, head] + weight * x[:, rule])
        samples = updater.state.outcomes.samples
        assert samples.samples[(0, K0 - 3)].rules_held_out == [None, None]  # no matured anchor before it
        judged = samples.samples[(0, K0 - 2)].rules_held_out
        assert (judged[head] >= HELD_OUT_GATE_NATS) == joins and judged[1 - head] is None
        updater.state.outcomes.version += 1
        fitted = updater.calibration.shop_map()
        assert fitted.weights_gain_nats[head] < GATE_NATS  # the in-sample gate alone would keep the affine map
        assert (fitted.weights[head] is not None) == joins
        assert fitted.weights_held_out_nats[head] == judged[head]  # and says so: the log line, the evaluation
        if joins:
            assert len(fitted.weights[head]) == RULE_STATISTICS[head] and fitted.weights[head][0] > 0.15
            assert f"the rules' {judged[head]:.0f} more held out" in describe(fitted)
        restored = AnchorSamples.from_plain(orjson.loads(orjson.dumps(samples.to_plain())))
        assert restored.samples[(0, K0 - 2)].rules_held_out == judged
        older = [[p, at, *rest[:7]] for p, at, *rest in samples.to_plain()]  # a record of session 60
        assert AnchorSamples.from_plain(older).samples[(0, K0 - 2)].rules_held_out == [None, None]


@pytest.mark.parametrize("head", range(len(HEADS)))
def test_without_an_earlier_anchor_each_half_of_the_sample_judges_the_rules_fit_on_the_other(head):
    """The first matured anchor has no previous fit to judge: the rules' statistics join the map where the fit on
    each half of its sampled users says the other half better than the affine map fitted there (split_gain), below
    the in-sample gate as above; a statistic that adds nothing does not."""
    rule, users = STATISTIC_COLUMNS[head][0], (3000, 2000)[head]
    for weight, joins in ((0.2, True), (0.0, False)):
        rng = np.random.default_rng(11)
        x = rng.normal(0, 1, size=(users, WIDTH))
        x[:, :2] = rng.normal(-1, 1.5, size=(users, 2))
        happened = rng.random(users) < 1 / (1 + np.exp(-(x[:, head] + weight * x[:, rule])))
        yes = happened.astype(np.float64)
        assert (split_gain(x, yes, head) >= HELD_OUT_GATE_NATS) == joins
        fitted = with_statistics(LogitMap(), head, x, happened)  # no verdict held: the sample's halves judge
        assert fitted.weights_gain_nats[head] < GATE_NATS and (fitted.weights[head] is not None) == joins
        assert fitted.weights_held_out_nats[head] == pytest.approx(split_gain(x, yes, head))
        # (a verdict held, from an earlier anchor, decides instead)
        assert with_statistics(LogitMap(), head, x, happened, None, -1.0).weights[head] is None


def test_the_users_sampled_at_an_anchor_and_what_followed_are_read_from_the_state():
    week, two_weeks = A + ANCHOR_MS + HOUR, A + PHASES * ANCHOR_MS + HOUR
    events = [event("founder", 0, A - 3 * ANCHOR_MS),
              event("back", 0, A - HOUR), event("back", 1, A + 2 * DAY), event("back", 2, A + 3 * DAY, "purchase"),
              event("late buyer", 0, A - 2 * HOUR), event("late buyer", 1, A + 10 * DAY, "purchase"),
              event("silent", 0, A - 3 * HOUR), event("new", 0, A + DAY),
              event("clock", 0, A - 5 * HOUR), event("clock", 1, week), event("clock", 2, two_weeks)]
    events.sort(key=lambda e: e["ts"])
    held = ["back", "late buyer", "silent", "clock", "founder"]
    before = updater_fed([e for e in events if e["ts"] < A], [100])
    rows = before.state.rows_for(held)
    p = before.head_probabilities(rows, A).astype(np.float64)
    a_week = before.head_probabilities(rows, A, (ANCHOR_MS / HOUR,) * 2)[:, 1].astype(np.float64)
    user = statistics.user_features(before.state.columns, before.state.counts, before.state.last_ts, rows, A)
    for sizes in ([100], [1], [2, 3]):
        updater = updater_fed(events, sizes)
        sample = updater.state.outcomes.samples.samples[(-1, K0)]
        order = [held.index(u) for u in sample.users]  # by stable key; "new" came after the anchor
        assert sorted(sample.users.tolist()) == sorted(held)
        assert np.all(np.diff(stable_keys(sample.users).astype(np.int64)) >= 0)
        logits = np.log(p[order]) - np.log1p(-p[order])
        np.testing.assert_allclose(sample.x[:, :2].astype(np.float64), logits, atol=0.01)
        np.testing.assert_allclose(sample.x[:, WEEK_LOGIT_COLUMN].astype(np.float64),
                                   np.log(a_week[order]) - np.log1p(-a_week[order]), atol=0.01)
        due = STATISTIC_COLUMNS[0][STATISTICS[0].index("order_due")]
        idle = STATISTIC_COLUMNS[1][STATISTICS[1].index("log_idle_minutes")]
        np.testing.assert_allclose(sample.x[:, due], user[order, statistics.USER_FEATURES.index("order_due")],
                                   atol=0.01)
        np.testing.assert_allclose(sample.x[:, idle], user[order, statistics.USER_FEATURES.index("log_idle_minutes")],
                                   rtol=0.01)
        # Bought within the week: back only (the late buyer's purchase came after it); stayed away two weeks:
        # silent and the founder (the clock came back a week on).
        bought = dict(zip(sample.users, sample.happened[0].tolist()))
        silent = dict(zip(sample.users, sample.happened[1].tolist()))
        assert bought == {"back": True, "late buyer": False, "silent": False, "clock": False, "founder": False}
        assert silent == {"back": False, "late buyer": False, "silent": True, "clock": False, "founder": True}
        # Stayed away the week after it: the late buyer too (back on its tenth day), and the clock (back after it).
        assert dict(zip(sample.users, sample.week_silent.tolist())) == {
            "back": False, "late buyer": True, "silent": True, "clock": True, "founder": True}


def test_a_sample_is_at_most_its_share_per_partition_and_the_smallest_keys():
    from stream.anchor_samples import sample_rows
    users = np.array([f"user-{i}" for i in range(3 * SAMPLE_PER_PARTITION)], dtype=object)
    partitions = np.repeat([0, 1, 2], SAMPLE_PER_PARTITION)
    partitions[:10] = 3  # a partition of ten users keeps them all
    rows = sample_rows(np.arange(len(users)), users, partitions)
    taken = partitions[rows]
    assert [int((taken == p).sum()) for p in range(4)] == [SAMPLE_PER_PARTITION - 10, SAMPLE_PER_PARTITION,
                                                           SAMPLE_PER_PARTITION, 10]
    rows = sample_rows(np.arange(len(users)), users, np.zeros(len(users), dtype=np.int64))
    keys = stable_keys(users)
    assert len(rows) == SAMPLE_PER_PARTITION and keys[rows].max() < np.delete(keys, rows).min()
    # Ids of the longest kind allowed: fewer are sampled, within the meta record's share, still the smallest keys.
    long_ids = np.array([f"{i:06d}" + "x" * (MAX_ID_CHARS - 6) for i in range(3 * SAMPLE_PER_PARTITION)], dtype=object)
    rows = sample_rows(np.arange(len(long_ids)), long_ids, np.repeat([0, 1, 2], SAMPLE_PER_PARTITION))
    assert len(rows) == 3 * (SAMPLE_ID_BYTES // (MAX_ID_CHARS + 3))
    assert len(orjson.dumps(long_ids[rows[:len(rows) // 3]].tolist())) <= SAMPLE_ID_BYTES


@pytest.mark.parametrize("id_chars", [8, SAMPLE_ID_BYTES // SAMPLE_PER_PARTITION - 3, MAX_ID_CHARS])
def test_a_partitions_samples_fit_in_a_kafka_record_whatever_its_ids(id_chars):
    """Three anchors' samples, the open one with its top_categories candidates (the matured ones keep only their
    weights): under librdkafka's default message.max.bytes (1,000,000) with room for the rest of the meta record
    (the counts, the names' parts named; the names themselves are records of their own). The longest ids of which
    every one of 2,048 users is sampled make the largest."""
    from models.category_calibration import CATEGORY_STATISTICS
    from stream.anchor_samples import CATEGORY_SAMPLE_PER_PARTITION, sample_rows
    users = np.array([f"{i:08d}".ljust(id_chars, "x") for i in range(2 * SAMPLE_PER_PARTITION)], dtype=object)
    rows = sample_rows(np.arange(len(users)), users, np.zeros(len(users), dtype=np.int64))
    n, m = len(rows), min(len(rows), CATEGORY_SAMPLE_PER_PARTITION)
    width = statistics.CATEGORY_SLOTS + 1 + 3  # the slots, the follow-up, explore's best three
    samples = AnchorSamples()
    for anchor in range(3):
        samples.put(anchor, np.zeros(n, dtype=np.int64), users[rows], np.ones((n, WEEK_LOGIT_COLUMN + 1)),
                    (np.ones((m, width), np.uint32), np.ones((m, width, 1 + len(CATEGORY_STATISTICS)), np.float16),
                     np.ones((m, statistics.CATEGORY_SLOTS), np.uint16)))
        if anchor < 2:
            samples.samples[(0, anchor)].categories.matured((1.0,) * len(CATEGORY_STATISTICS), (0.1, 0.01), m)
    for sample in samples.samples.values():
        sample.held_out = [123.456789012345, -98.7654321098765]
        sample.week_silent = np.ones(n, dtype=bool)
    # 0.54 MB with 8-character ids, 0.77 MB with 45, 0.46 MB with 256 (fewer sampled)
    assert len(orjson.dumps(samples.of_partition(0))) < 800_000


def feed(updater: ProfileUpdater, events: list[dict], sizes: list[int], first_offset: int = 0) -> ProfileUpdater:
    """More events through an updater, in batches of `sizes` taken in turn."""
    a, i = 0, 0
    while a < len(events):
        b = a + sizes[i % len(sizes)]
        updater.process(record_batch(events[a:b], topic="t", first_offset=first_offset + a, keys=None))
        a, i = b, i + 1
    return updater


def expected_counts(said: np.ndarray, happened: list[int]) -> np.ndarray:
    """(BINS, 2) users by bin and outcome: said (N,) bins, happened (N,) outcomes."""
    grid = np.zeros((BINS, 2), dtype=np.int64)
    np.add.at(grid, (said.astype(np.int64), np.asarray(happened)), 1)
    return grid


def test_an_anchor_counts_who_came_back_and_bought_from_what_the_heads_said_at_its_clock():
    # The founder's event makes the table three weeks old at the anchor: an anchor within two weeks of a table's
    # first events holds only new users, and is not counted. A newcomer a week after the anchor moves the clock
    # past its purchase window; the clock's event two weeks after it past its return window.
    week_on = A + ANCHOR_MS + HOUR
    events = [event("founder", 0, A - 3 * ANCHOR_MS),
              event("back", 0, A - HOUR), event("back", 1, A + 2 * DAY), event("back", 2, A + 3 * DAY, "purchase"),
              event("late buyer", 0, A - 2 * HOUR), event("late buyer", 1, A + 10 * DAY, "purchase"),
              event("silent", 0, A - 3 * HOUR),
              event("new", 0, A + DAY), event("newcomer", 0, week_on),
              event("clock", 0, A - 5 * HOUR), event("clock", 1, A + PHASES * ANCHOR_MS + HOUR)]
    events.sort(key=lambda e: e["ts"])
    before = updater_fed([e for e in events if e["ts"] < A], [100])
    rows = before.state.rows_for(["back", "late buyer", "silent", "clock", "founder"])
    said = logit_bins(before.head_probabilities(rows, A))  # what the heads say of them at the anchor's clock
    first_week = [e for e in events if e["ts"] <= week_on]

    for sizes in ([100], [1], [3, 2]):
        updater = updater_fed(first_week, sizes)
        # A week on: the purchase window has closed (back bought within it, the late buyer after it).
        # And a week of silence is known (the week series, churn_risk's bins): back came back within it. (The
        # series keeps its latest two anchors: the one before, the founder's alone, counted from a week.)
        week = updater.state.outcomes.counts
        assert set(week) == {(0, -1, K0), (WEEK_SERIES, -1, K0 - 1), (WEEK_SERIES, -1, K0)}
        np.testing.assert_array_equal(week[(0, -1, K0)], expected_counts(said[:, 0], [1, 0, 0, 0, 0]))
        np.testing.assert_array_equal(week[(WEEK_SERIES, -1, K0)], expected_counts(said[:, 1], [0, 1, 1, 1, 1]))

        feed(updater, events[len(first_week):], sizes, len(first_week))
        state, slot = updater.state, K0 % PHASES
        back = state.rows_for(["back", "late buyer"])
        assert state.columns["anchor"][back, slot].tolist() == [K0, K0]
        np.testing.assert_array_equal(state.columns["anchor_bins"][back, slot], said[:2])
        assert state.columns["back_minutes"][back, slot].tolist() == [2 * 24 * 60, 10 * 24 * 60]
        assert state.columns["bought_minutes"][back, slot].tolist() == [3 * 24 * 60, 10 * 24 * 60]
        assert state.columns["anchor"][state.row("new")].tolist() == [-1, -1]  # not there at the anchor
        # Two weeks on: the return window has closed (silent, clock and founder stayed away); the next anchor's
        # purchase window too, and its counts replace this one's (the week series keeps both anchors).
        assert set(state.outcomes.counts) == {(1, -1, K0), (0, -1, K0 + 1), (WEEK_SERIES, -1, K0),
                                              (WEEK_SERIES, -1, K0 + 1)}
        np.testing.assert_array_equal(state.outcomes.counts[(1, -1, K0)], expected_counts(said[:, 1], [0, 0, 1, 1, 1]))

    # Without the founder the table's first event came 5 hours before the anchor: the week's silence is counted from
    # the table's first anchor (a young table's churn_risk map, with_week), purchase_propensity's from the next, a
    # week after its first events, churn_risk's two weeks from two weeks; top_categories' candidates are sampled
    # from there, and the shop's purchase rate noted from the second.
    young = updater_fed(events[1:], [100])
    outcomes = young.state.outcomes
    assert outcomes.complete_from == K0 + 2 and outcomes.purchase_sooner
    assert set(outcomes.counts) == {(0, -1, K0 + 1), (WEEK_SERIES, -1, K0), (WEEK_SERIES, -1, K0 + 1)}
    assert set(outcomes.samples.samples) == {(-1, K0), (-1, K0 + 1), (-1, K0 + 2)}  # (the clock reached the last)
    assert sorted(anchor for _, anchor in outcomes.rates) == [K0 + 1, K0 + 2]
    first, second = outcomes.samples.samples[(-1, K0)], outcomes.samples.samples[(-1, K0 + 1)]
    # The users held at the first anchor (5 hours of the table): only "back" came back in the week after it.
    assert sorted(first.users.tolist()) == ["back", "clock", "late buyer", "silent"]
    assert first.week_silent.tolist() == [user != "back" for user in first.users.tolist()]
    # ... and only "back" bought in it (the late buyer ten days on): noted for purchase_propensity's young map,
    # whose series does not count this anchor.
    assert first.week_bought.tolist() == [user == "back" for user in first.users.tolist()]
    assert first.happened[0] is None and first.happened[1] is None
    # At the second, five users; only the late buyer came back in its week; their purchase window closed too.
    assert sorted(second.users.tolist()) == ["back", "clock", "late buyer", "new", "silent"]
    assert second.week_silent.tolist() == [user != "late buyer" for user in second.users.tolist()]
    assert second.happened[0] is not None and second.happened[1] is None and second.week_bought is None
    assert first.categories is None and second.categories is None
    assert outcomes.samples.samples[(-1, K0 + 2)].categories is not None


def test_the_counts_and_records_are_the_same_whatever_the_batches():
    events = generate(users=300, events=15000, seed=4, shop=ShopParams.draw(3), span_days=60).events
    one = updater_fed(events, [15_000])  # one batch over every anchor of the log
    many = updater_fed(events, [97, 431, 1, 2_000])
    assert len(one.state.outcomes.counts) == sum(KEPT)
    assert one.state.outcomes.total().sum() > KEPT_ANCHORS * 200  # most of the 300 users, at each anchor
    for key, counts in one.state.outcomes.counts.items():
        np.testing.assert_array_equal(many.state.outcomes.counts[key], counts)
    samples = one.state.outcomes.samples.samples  # the users sampled at the latest anchors, with their outcomes
    # All the users held at the anchor, in this table: those whose first event came before it (two thirds of a
    # structured shop's users arrive along the span).
    first = {}
    for e in events:
        first[e["user_id"]] = min(e["ts"], first.get(e["user_id"], e["ts"]))
    assert len(samples) == PHASES + 1 and all(
        len(s.users) == sum(ts < anchor * ANCHOR_MS for ts in first.values()) for (_, anchor), s in samples.items())
    assert samples.keys() == many.state.outcomes.samples.samples.keys()
    for key, sample in samples.items():
        theirs = many.state.outcomes.samples.samples[key]
        assert sample.users.tolist() == theirs.users.tolist()
        # (x is stored as float16: a statistic whose float32 masses round apart by batching may land one float16
        # step apart)
        np.testing.assert_allclose(sample.x.astype(np.float32), theirs.x.astype(np.float32), rtol=2.0 ** -10)
        for mine, other in zip(sample.happened, theirs.happened):
            assert (mine is None and other is None) or np.array_equal(mine, other)
    rates = one.state.outcomes.rate_sums()  # the shop's faded events and purchases at the latest anchors
    assert len(rates) == RATE_ANCHORS and min(min(e, p) for _, e, p in rates) > 0
    np.testing.assert_allclose(many.state.outcomes.rate_sums(), rates, rtol=1e-5)
    assert one.calibration.shop_map().rate_volatility == pytest.approx(many.calibration.shop_map().rate_volatility,
                                                                      abs=1e-4)
    rows = many.state.rows_for(one.state.user_ids)
    for name in ANCHOR_COLUMNS:
        np.testing.assert_array_equal(one.state.columns[name][:len(one.state)], many.state.columns[name][rows])


def test_the_map_moves_what_is_published_and_never_the_state():
    events = generate(users=200, events=8000, seed=5, shop=ShopParams.draw(2), span_days=40).events
    calibrated = updater_fed(events, [1000])
    plain = updater_fed(events, [1000], stream_calibration=False)
    assert not plain.state.outcomes.counts  # nothing counted without it
    # Outcomes of a shop whose users stay away more and buy less than the model says, at every logit.
    p = 1 / (1 + np.exp(-bin_logits()))
    fewer, more = (counts_from(p, 1 / (1 + np.exp(-(bin_logits() + shift))), 300) for shift in (-2, 2))
    calibrated.state.outcomes.counts = {(0, -1, K0): fewer, (1, -1, K0): more}
    calibrated.state.outcomes.samples = AnchorSamples()  # (the sampled users' outcomes would fit their own map)
    calibrated.state.outcomes.version += 1
    assert calibrated.calibration.shop_map().kept == (True, True)
    assert calibrated.calibration.shop_map().weights == (None, None)
    rows = np.arange(len(plain.state))
    moved = [orjson.loads(v) for _, v in calibrated.profiles_for(rows)]
    kept = [orjson.loads(v) for _, v in plain.profiles_for(rows)]
    churn = np.array([[m["churn_risk"], k["churn_risk"]] for m, k in zip(moved, kept)])
    purchase = np.array([[m["purchase_propensity"], k["purchase_propensity"]] for m, k in zip(moved, kept)])
    assert (churn[:, 0] >= churn[:, 1]).all() and churn[:, 0].mean() > churn[:, 1].mean() + 0.05
    assert (purchase[:, 0] <= purchase[:, 1]).all() and purchase[:, 0].mean() < purchase[:, 1].mean() - 0.05
    # Over windows cut short (an evaluation whose log ends sooner) the map is carried over by the model's hazards.
    short = (60.0, 100.0)
    over = [orjson.loads(v) for _, v in calibrated.profiles_for(rows, short)]
    own = [orjson.loads(v) for _, v in plain.profiles_for(rows, short)]
    for head, name in enumerate(("purchase_propensity", "churn_risk")):
        at_horizon, mapped = torch.tensor([k[name] for k in kept]), torch.tensor([m[name] for m in moved])
        expected = over_window(head, mapped, at_horizon, torch.tensor([o[name] for o in own]))
        # (`expected` is computed from probabilities published to 6 decimals, whose rounding the hazards' share
        # log(1 - p_window) / log(1 - p_horizon) magnifies where both are small: an atol, and only the users whose
        # published probabilities hold three digits or more; a user very active at the log's end has a churn_risk
        # published as 0.0)
        held = ((at_horizon >= 1e-3) & (mapped >= 1e-3)).numpy()
        assert held.mean() > 0.9
        np.testing.assert_allclose(np.array([m[name] for m in over])[held], expected.numpy()[held], rtol=1e-4,
                                   atol=1e-4)
        assert not np.allclose([m[name] for m in over], [o[name] for o in own], atol=0.01)
    # The rest is the plain updater's (within float rounding: the calibrated one applied the batches in two parts
    # at the anchors, as another batching would).
    assert [[c["category"] for c in m["top_categories"]] for m in moved] == [
        [c["category"] for c in k["top_categories"]] for k in kept]
    np.testing.assert_allclose(calibrated.state.states[:len(rows)].float().numpy(),
                               plain.state.states[:len(rows)].float().numpy(), atol=2e-3)
    for name, column in plain.state.columns.items():
        if name not in ANCHOR_COLUMNS:
            np.testing.assert_allclose(calibrated.state.columns[name][:len(rows)], column[:len(rows)], rtol=1e-5)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_the_shops_purchase_rate_is_volatile_only_where_it_moves_week_to_week_beyond_its_noise():
    def weeks(events: float, purchases: float, swing: float) -> list[tuple[int, float, float]]:
        return [(K0 + k, events, purchases * (swing if k % 2 else 1.0)) for k in range(RATE_ANCHORS)]

    assert rate_volatility(weeks(50_000.0, 2_500.0, 1.0)) == 0.0
    assert rate_volatility(weeks(50_000.0, 2_500.0, 1.5)) > 2 * VOLATILE_RATE  # 1.5 times the rate every other week
    assert rate_volatility(weeks(200.0, 10.0, 1.5)) < VOLATILE_RATE  # the same swing on 10 purchases a week: noise
    assert rate_volatility(weeks(50_000.0, 2_500.0, 1.5)[1:]) is None  # too few anchors
    gap = weeks(50_000.0, 2_500.0, 1.5)
    assert rate_volatility([gap[0], *[(anchor + 1, e, p) for anchor, e, p in gap[1:]]]) is None  # a week not noted


def test_where_the_shops_rate_is_volatile_a_maps_level_moves_toward_the_models_and_its_ranking_stays():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2_000, WIDTH))
    x[:, list(LOGIT_COLUMNS)] = rng.normal(-1.5, 1.0, size=(2_000, len(LOGIT_COLUMNS)))
    shop_map = LogitMap(a=(1.0, -0.5), b=(0.8, 1.2), kept=(True, False))
    calm = with_model_level(shop_map, VOLATILE_RATE / 2, x)
    assert calm.level_shift == (0.0, 0.0) and calm.rate_volatility == VOLATILE_RATE / 2
    moved = with_model_level(shop_map, 2 * VOLATILE_RATE, x)
    assert moved.level_shift[1] == 0.0  # churn_risk's map is not kept: the model's own, unmoved
    said, own = 1.0 + 0.8 * x[:, LOGIT_COLUMNS[0]], sigmoid(x[:, LOGIT_COLUMNS[0]]).mean()
    assert sigmoid(said).mean() > own + 0.1  # the map said more purchases than the model
    assert moved.level_shift[0] < 0
    assert sigmoid(said + moved.level_shift[0] / LEVEL_PULL).mean() == pytest.approx(own, abs=1e-6)
    p = torch.tensor(sigmoid(x[:, LOGIT_COLUMNS[0]]), dtype=torch.float32)
    served, before = moved.apply(0, p).numpy(), shop_map.apply(0, p).numpy()
    q = p.double().numpy()
    np.testing.assert_allclose(served, sigmoid(1.0 + 0.8 * np.log(q / (1 - q)) + moved.level_shift[0]), rtol=1e-4)
    assert (np.diff(served[np.argsort(before, kind="stable")]) >= 0).all()  # the same order
    assert "toward the model's" in describe(moved) and "toward the model's" not in describe(calm)
    narrow = with_model_level(shop_map, 2 * VOLATILE_RATE, x[:, :WIDTH - 1])  # a record of fewer statistics: unmoved
    assert narrow.level_shift == (0.0, 0.0) and narrow.rate_volatility == 2 * VOLATILE_RATE


def test_a_volatile_shops_maps_are_published_at_a_level_toward_the_models():
    events = generate(users=200, events=8000, seed=5, shop=ShopParams.draw(2), span_days=40).events
    updater = updater_fed(events, [1000])
    outcomes = updater.state.outcomes
    p = 1 / (1 + np.exp(-bin_logits()))
    outcomes.counts = {(0, -1, K0): counts_from(p, sigmoid(bin_logits() - 2), 300)}  # fewer purchases than it says
    rows = np.arange(len(updater.state))
    x = np.zeros((len(rows), WIDTH))  # the latest anchor's sample (open): the users' logits now
    said = np.clip(updater.calibration.probabilities(rows, updater.state.max_event_ts).astype(np.float64), 1e-6,
                   1 - 1e-6)
    x[:, list(LOGIT_COLUMNS)] = np.log(said) - np.log1p(-said)
    outcomes.samples = AnchorSamples()
    outcomes.samples.put(K0 + 1, np.full(len(rows), -1), updater.state.ids_at(rows), x)

    def published(swing: float) -> np.ndarray:
        outcomes.rates = {(-1, K0 - 2 + k): np.array([1e5, 5e3 * (swing if k % 2 else 1.0)])
                          for k in range(RATE_ANCHORS)}
        outcomes.version += 1
        return np.array([orjson.loads(v)["purchase_propensity"] for _, v in updater.profiles_for(rows)])

    calm, volatile = published(1.0), published(1.5)
    shop_map = updater.calibration.shop_map()
    assert shop_map.kept[0] and shop_map.rate_volatility > VOLATILE_RATE and shop_map.level_shift[0] > 0.5
    assert (volatile > calm).all() and volatile.mean() > calm.mean() + 0.05
    assert (np.diff(volatile[np.argsort(calm, kind="stable")]) >= -1e-6).all()


def test_the_shops_purchase_rate_survives_a_snapshot_a_changelog_record_and_a_release():
    state = StateTable(8, torch.device(DEVICE))
    for k in range(RATE_ANCHORS + 1):
        state.outcomes.note_rate(K0 + k, np.array([0, 1, 1]), np.array([10.0, 20.0, 30.0 + k]), np.array([1.0, 2, 3]))
    sums = state.outcomes.rate_sums()
    assert [anchor for anchor, _, _ in sums] == [K0 + k for k in range(1, RATE_ANCHORS + 1)]  # the latest only
    assert sums[-1][1:] == (60.0 + RATE_ANCHORS, 6.0)
    restored = StateTable(8, torch.device(DEVICE))
    restored.restore(state.snapshot())
    assert restored.outcomes.rate_sums() == sums
    member = StateTable(8, torch.device(DEVICE))  # each partition's changelog meta record, read back
    for partition in (1, 0):
        member.outcomes.merge_partition(partition, state.outcomes.of_partition(partition))
    assert member.outcomes.rate_sums() == sums
    older = StateTable(8, torch.device(DEVICE))  # a record of session 67 or before: none noted
    older.outcomes.merge_partition(0, {k: v for k, v in state.outcomes.of_partition(0).items() if k != "rates"})
    assert older.outcomes.rate_sums() == []
    restored.drop_partitions([1])
    assert restored.outcomes.rate_sums()[-1][1:] == (10.0, 1.0)


def test_counts_survive_a_snapshot_and_a_release_of_their_partitions():
    state = StateTable(8, torch.device(DEVICE))
    bins, happened = np.array([3, 3, 60], dtype=np.uint8), np.array([1, 0, 1])
    for head in range(len(HEADS)):
        state.outcomes.add(head, K0, np.array([0, 0, 1]), bins, happened)
        state.outcomes.add(head, K0 + 1, np.array([1, 1, 1]), bins, happened)
    state.outcomes.add(1, K0 + 2, np.array([1, 0, 1]), bins, happened, pending=True)  # users who left before it matured
    x = np.arange(3 * WIDTH, dtype=np.float64).reshape(3, WIDTH) / 7
    state.outcomes.samples.put(K0, np.array([0, 1, 1]), np.array(["a", "b", "c"], dtype=object), x)
    state.outcomes.samples.samples[(1, K0)].happened[0] = np.array([True, False])
    state.outcomes.samples.samples[(1, K0)].left[1] = True, False  # the second left after buying
    state.outcomes.samples.samples[(1, K0)].week_bought = np.array([False, True])  # (a table's first anchor)
    state.outcomes.purchase_sooner = True
    kept = [K0, K0 + 1][-KEPT_ANCHORS:]  # each head's latest matured anchors only
    assert set(state.outcomes.counts) == {(h, p, a) for h in (0, 1) for p in (0, 1) for a in kept} - (
        {(h, 0, K0 + 1) for h in (0, 1)})
    restored = StateTable(8, torch.device(DEVICE))
    restored.restore(state.snapshot())
    under = StateTable(8, torch.device(DEVICE))  # a daemon started --restore-from the snapshot
    under.attach_base(state.snapshot(), None, [])
    for table in (restored, under):
        for name in ("counts", "pending"):
            mine, theirs = getattr(table.outcomes, name), getattr(state.outcomes, name)
            assert mine.keys() == theirs.keys()
            for key, counts in theirs.items():
                np.testing.assert_array_equal(mine[key], counts)
        assert_same_samples(table.outcomes.samples, state.outcomes.samples)
    assert restored.outcomes.total()[1, 3, 1] == len(kept) and restored.outcomes.total()[0, 60, 1] == len(kept)
    restored.drop_partitions([1])
    assert all(p == 0 for _, p, _ in restored.outcomes.counts) and set(restored.outcomes.pending) == {(1, 0, K0 + 2)}
    # A partition's counts as its changelog meta record carries them, read back by another member.
    assert restored.outcomes.purchase_sooner and under.outcomes.purchase_sooner
    member = StateTable(8, torch.device(DEVICE))
    member.outcomes.merge_partition(1, state.outcomes.of_partition(1))
    assert member.outcomes.purchase_sooner
    other = StateTable(8, torch.device(DEVICE))  # ... with a partition's record of session 61 or before too
    other.outcomes.merge_partition(1, state.outcomes.of_partition(1))
    older = {key: value for key, value in state.outcomes.of_partition(0).items() if key != "purchase_sooner"}
    other.outcomes.merge_partition(0, older)
    assert other.outcomes.purchase_sooner is False  # its anchors counted from two weeks, as that release did
    assert set(member.outcomes.counts) == {key for key in state.outcomes.counts if key[1] == 1}
    assert set(member.outcomes.pending) == {(1, 1, K0 + 2)}
    assert set(member.outcomes.samples.samples) == {(1, K0)}
    assert_same_samples(member.outcomes.samples, AnchorSamples({(1, K0): state.outcomes.samples.samples[(1, K0)]}))
    restored.drop_partitions([0])
    assert not restored.outcomes.samples.samples


def assert_same_samples(mine: AnchorSamples, theirs: AnchorSamples) -> None:
    assert mine.samples.keys() == theirs.samples.keys()
    for key, sample in theirs.samples.items():
        assert mine.samples[key].users.tolist() == sample.users.tolist()
        assert mine.samples[key].x.dtype == np.float16
        np.testing.assert_array_equal(mine.samples[key].x, sample.x)
        for a, b in zip(mine.samples[key].happened, sample.happened):
            assert (a is None and b is None) or a.tolist() == b.tolist()
        assert mine.samples[key].left.tolist() == sample.left.tolist()
        assert mine.samples[key].held_out == sample.held_out
        for a, b in ((mine.samples[key].week_silent, sample.week_silent),
                     (mine.samples[key].week_bought, sample.week_bought)):
            assert (a is None and b is None) or a.tolist() == b.tolist()


def test_a_snapshot_without_records_is_not_counted_before_the_next_anchor():
    """State from a release that kept no records: users who came back since the anchor would look silent."""
    events = generate(users=100, events=3000, seed=6, shop=ShopParams.draw(1), span_days=30).events
    updater = updater_fed(events, [3000])
    snapshot = updater.state.snapshot()
    del snapshot["outcomes"]
    for name in ANCHOR_COLUMNS:
        del snapshot[name]
    restored = StateTable(updater.state.state_size, torch.device(DEVICE))
    restored.restore(snapshot)
    assert restored.outcomes.complete_from == updater.state.max_event_ts // ANCHOR_MS + 1
    assert not restored.outcomes.counts and (restored.columns["anchor"][:len(restored)] == -1).all()


@pytest.mark.parametrize("command", ["run", "replay"])
def test_the_calibration_can_be_turned_off(command):
    from click.testing import CliRunner

    from consumers.cli import main
    result = CliRunner().invoke(main, [command, "--help"])
    assert "--no-stream-calibration" in result.output


def test_an_updater_without_events_past_an_anchor_counts_nothing():
    updater = ProfileUpdater(untrained(), torch.device(DEVICE), max_event_bytes=65536, emit_embedding=False)
    updater.process(record_batch([event("u", 0, A + HOUR), event("u", 1, A + 2 * HOUR)], keys=None))
    assert not updater.state.outcomes.counts


def running_daemon(settings):
    """A daemon of `settings` in a thread, with its health (ready once its partitions are assigned and restored)
    and the event that stops it."""
    import threading

    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.metrics import Health, Metrics

    stop, health = threading.Event(), Health(settings.stall_after_s)
    daemon = ProfileDaemon(settings, load_updater(settings), Metrics(), stop, health)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    return daemon, health, stop, thread


def test_a_daemon_restarted_on_its_changelog_keeps_the_counts(kafka, settings_factory):
    """Two weeks of outcomes cannot be read back from the users once they moved on: a member that restores the
    partitions gets each one's counts from its meta record, and publishes with the same map."""
    settings = settings_factory()
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    events = generate(users=120, events=5000, seed=7, shop=ShopParams.draw(1), span_days=50).events

    daemon, health, stop, thread = running_daemon(settings)
    try:
        # Five days at a time, each consumed before the next is produced: a batch holding one partition's fifty days
        # before the other's would find the other's events late, behind every anchor the first crossed.
        start, end = min(e["ts"] for e in events), max(e["ts"] for e in events)
        for days in range(0, (end - start) // DAY + 1, 5):
            chunk = [e for e in events if days * DAY <= e["ts"] - start < (days + 5) * DAY]
            produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in chunk])
            ends = end_offsets(kafka, topic)
            wait_until(lambda: committed_offsets(kafka, settings.group_id, topic) == ends, 120, "the days consumed")
        outcomes = daemon.updater.state.outcomes
        counted = ({key: grid.copy() for key, grid in outcomes.counts.items()}, outcomes.complete_from)
        samples = AnchorSamples(dict(outcomes.samples.samples))
        shop_map = daemon.updater.calibration.shop_map()
    finally:
        stop.set()
        thread.join(timeout=60)
    assert counted[0] and {p for _, p, _ in counted[0]} == {0, 1}  # an anchor matured, counted per input partition

    daemon, health, stop, thread = running_daemon(settings)  # the group's next member: a restore
    try:
        wait_until(lambda: health.ready, 120, "the partitions' restore")
        outcomes = daemon.updater.state.outcomes
        assert outcomes.counts.keys() == counted[0].keys() and outcomes.complete_from == counted[1]
        for key, grid in counted[0].items():
            np.testing.assert_array_equal(outcomes.counts[key], grid)
        assert {p for p, _ in samples.samples} == {0, 1}
        assert_same_samples(outcomes.samples, samples)
        assert daemon.updater.calibration.shop_map() == shop_map
    finally:
        stop.set()
        thread.join(timeout=60)


def test_users_whose_state_expires_before_the_anchor_matures_are_counted_as_they_leave():
    """With --state-ttl shorter than an anchor's windows, the users who stayed away are gone from the table when
    it matures: they are counted as they expire (as silent, or by their record if they had come back)."""
    ttl = 3 * DAY
    events = [event("founder", 0, A - 3 * ANCHOR_MS),
              event("quiet", 0, A - HOUR),  # stays away: expires three days later
              event("back", 0, A - 2 * HOUR), event("back", 1, A + DAY, "purchase"),  # came back, then expires
              event("stays", 0, A - 3 * HOUR), *[event("stays", i, A + i * DAY) for i in range(1, 15)]]
    events += [event("clock", i, A + PHASES * ANCHOR_MS + i * HOUR) for i in range(3)]
    events.sort(key=lambda e: e["ts"])
    before = updater_fed([e for e in events if e["ts"] < A], [100])
    said = logit_bins(before.head_probabilities(before.state.rows_for(["quiet", "back", "stays"]), A))

    week = [e for e in events if e["ts"] <= A + ANCHOR_MS]  # to the first event past the purchase window
    updater = updater_fed(week, [1], state_ttl_ms=ttl)
    assert updater.state.row("quiet") is None and updater.state.row("back") is None  # expired before the anchor matured
    np.testing.assert_array_equal(updater.state.outcomes.counts[(0, -1, K0)], expected_counts(said[:, 0], [0, 1, 0]))
    feed(updater, events[len(week):], [1], len(week))
    np.testing.assert_array_equal(updater.state.outcomes.counts[(1, -1, K0)], expected_counts(said[:, 1], [1, 0, 0]))
    assert not updater.state.outcomes.pending  # added to the anchors' counts when they matured
    # So are the users sampled at the anchor: back bought and came back before it expired.
    sample = updater.state.outcomes.samples.samples[(-1, K0)]
    bought, silent = (dict(zip(sample.users, happened.tolist())) for happened in sample.happened)
    assert {u: bought[u] for u in ("quiet", "back", "stays")} == {"quiet": False, "back": True, "stays": False}
    assert {u: silent[u] for u in ("quiet", "back", "stays")} == {"quiet": True, "back": False, "stays": False}


def test_a_sample_of_session_65_restores_with_the_latest_visits_searches_as_0_before_its_week_logit():
    """A meta record of session 62 to 65 holds the week logit after fewer statistics and does not say how many: the
    statistics added since restore as 0 (a fit weighs them 0), its week logit where this release reads it."""
    from stream.anchor_samples import ADDED_STATISTICS, SAMPLED_STATISTICS
    x = np.arange(3 * (WIDTH + 1), dtype=np.float64).reshape(3, WIDTH + 1) / 8
    sample = Sample(np.array(["a", "b", "c"], dtype=object), x.astype(np.float16))
    plain = sample.to_plain()
    assert np.array_equal(Sample.from_plain(plain).x, sample.x)  # this release's record: as written
    added = [2 + SAMPLED_STATISTICS.index(name) for name in ADDED_STATISTICS]
    older = [plain[0], encoded(np.delete(sample.x, added, axis=1), "<f2"), *plain[2:9]]
    restored = Sample.from_plain(older).x
    assert restored.shape == sample.x.shape and (restored[:, added] == 0).all()
    np.testing.assert_array_equal(np.delete(restored, added, axis=1), np.delete(sample.x, added, axis=1))
    assert np.array_equal(restored[:, WEEK_LOGIT_COLUMN], sample.x[:, WEEK_LOGIT_COLUMN])
    narrow = [plain[0], encoded(sample.x[:, :WIDTH - len(ADDED_STATISTICS)], "<f2"), *plain[2:9]]  # session 59-61
    assert Sample.from_plain(narrow).x.shape == (3, WIDTH - len(ADDED_STATISTICS))  # no week logit: as it was
