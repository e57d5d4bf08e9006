"""top_categories re-ranked by the shop's own outcomes (models/category_calibration.py): the fit finds the weights a
shop ranks by, the sampled users' candidates and what they engaged with are read from the state, the re-ranking is
published only where the previous week's weights beat the published ranking, and it keeps the candidates' mass."""

from __future__ import annotations

import numpy as np
import orjson
import torch

from models.category_calibration import (
    CARRIED, CATEGORY_STATISTICS, CATEGORY_TERMS, STEADY_WEEKS, category_terms, fit_weights, full_weights, judged,
    over_weeks, passes, steady_gain)
from models.profile_model import reranked
from models.stream_calibration import describe
from stream.anchor_samples import AnchorSamples, CategorySample, Sample, WIDTH
from stream.outcomes import ANCHOR_MS
from stream.statistics import SLOT_FEATURES
from tests.helpers import updater_fed

HOUR, DAY = 3_600_000, 86_400_000
K0 = 1_700_000_000_000 // ANCHOR_MS + 1  # an anchor
A = K0 * ANCHOR_MS
FRESH = CATEGORY_STATISTICS.index("freshness")


def choices(n: int, weights: np.ndarray, seed: int, follows_model: float = 1.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n users' 10 candidates (the last two none), log P(c) and statistics drawn at random, and the one each
    engaged with, drawn from softmax(follows_model * log P + statistics . weights)."""
    rng = np.random.default_rng(seed)
    log_p = np.log(rng.dirichlet(np.ones(10), size=n))
    log_p[:, 8:] = -np.inf
    stats = rng.normal(size=(n, 10, len(CATEGORY_STATISTICS)))
    stats[:, 8:] = 0.0
    finite = np.isfinite(log_p)
    z = np.where(finite, follows_model * np.where(finite, log_p, 0.0), -np.inf) + stats @ weights
    q = np.exp(z - z.max(axis=1, keepdims=True))
    q /= q.sum(axis=1, keepdims=True)
    picked = (q.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    engaged = np.zeros((n, 10), dtype=bool)
    engaged[np.arange(n), picked] = True
    engaged[: n // 10] = False  # users who engaged with none of their candidates say nothing
    return log_p, stats, engaged


def test_the_fit_finds_the_weight_a_shop_ranks_by_and_none_where_the_model_is_right():
    truth = np.zeros(len(CATEGORY_STATISTICS))
    truth[FRESH] = 1.5
    log_p, stats, engaged = choices(4000, truth, seed=1)
    weights = fit_weights(log_p, stats, engaged)
    np.testing.assert_allclose(weights, truth, atol=0.12)
    gain, standard_error = judged(log_p, stats, engaged, weights)
    assert gain > 0.02 and passes(gain, standard_error)
    log_p, stats, engaged = choices(4000, np.zeros(len(CATEGORY_STATISTICS)), seed=2)
    assert np.abs(fit_weights(log_p, stats, engaged)).max() < 0.12
    assert np.abs(fit_weights(log_p, category_terms(log_p, stats), engaged)).max() < 0.12


def test_the_fit_finds_how_far_a_shops_users_follow_the_models_own_probability():
    # Users who reorder by their counts whatever the model says (B2B supplies): log P's weight near -1, and the
    # statistic found under it; without log P among the terms the fit cannot turn away from the model's ranking.
    truth = np.zeros(len(CATEGORY_STATISTICS))
    truth[CATEGORY_STATISTICS.index("log_count")] = 1.5
    log_p, stats, engaged = choices(4000, truth, seed=3, follows_model=0.0)
    terms = category_terms(log_p, stats)
    weights = fit_weights(log_p, terms, engaged)
    np.testing.assert_allclose(weights, [*truth, -1.0], atol=0.12)
    with_log_p = judged(log_p, terms, engaged, weights)[0]
    assert with_log_p > judged(log_p, stats, engaged, fit_weights(log_p, stats, engaged))[0] + 0.01
    np.testing.assert_array_equal(full_weights(tuple(truth)), [*truth, 0.0])  # an older record's weights: log P as is
    assert len(CATEGORY_TERMS) == len(CATEGORY_STATISTICS) + 1 and CATEGORY_TERMS[-1] == "log_p"


def test_the_reranking_keeps_the_candidates_mass_and_follows_the_weights():
    p = torch.tensor([[0.5, 0.2, -1.0, 0.1], [0.3, 0.3, 0.2, 0.05]])
    slot = torch.zeros(2, 3, len(SLOT_FEATURES))
    slot[:, 1, SLOT_FEATURES.index("freshness")] = 1.0  # the second slot is fresh; the last candidate is explore's
    weights = torch.zeros(len(SLOT_FEATURES) + 1, dtype=torch.float64)  # the slots' statistics, then log P
    torch.testing.assert_close(reranked(p, slot, weights), p)
    weights[SLOT_FEATURES.index("freshness")] = 3.0
    out = reranked(p, slot, weights)
    assert out[0, 2] == -1.0  # an empty slot stays empty
    torch.testing.assert_close(out.clamp(min=0).sum(dim=1), p.clamp(min=0).sum(dim=1))
    assert out[0].argmax() == 1 and out[1].argmax() == 1
    assert abs(out[0, 0] / out[0, 3] - 5.0) < 1e-5  # the others keep their ratios
    weights[-1] = -0.5  # P(c) to the power 0.5, explore's candidate too
    out = reranked(p, slot, weights)
    assert abs(out[0, 0] / out[0, 3] - 5.0 ** 0.5) < 1e-5 and out[0, 2] == -1.0
    torch.testing.assert_close(out.clamp(min=0).sum(dim=1), p.clamp(min=0).sum(dim=1))


def test_weights_that_gained_one_week_and_lost_the_one_before_do_not_re_rank():
    # replenishment-3's weeks: what is due turns with each user's cycle.
    assert not passes(*over_weeks([(0.107, 0.027), (-0.104, 0.033)]))
    assert passes(*over_weeks([(0.107, 0.027), (0.03, 0.02)])) and passes(*over_weeks([(0.5, 0.03), (-0.01, 0.02)]))
    assert over_weeks([]) == (None, None) and not passes(None, None)


# loyal-or-once-3's weeks: the loyal minority's weights gain a little every week, each short of two errors.
STEADY = ((0.040, 0.011), (0.017, 0.010), (0.014, 0.010), (0.017, 0.0125))


def test_weights_that_gained_in_each_of_four_weeks_re_rank_where_two_weeks_say_not_enough():
    assert not passes(*over_weeks(list(STEADY[-2:])))
    assert passes(*steady_gain(STEADY)) and passes(*steady_gain(((-0.2, 0.01),) + STEADY))
    assert steady_gain(STEADY) == over_weeks(list(STEADY))
    # One week that lost, or was not judged, or fewer weeks than STEADY_WEEKS: no verdict of its own.
    for weeks in (STEADY[:2] + ((-0.001, 0.01),) + STEADY[3:], (None,) + STEADY[1:], STEADY[1:]):
        assert steady_gain(weeks) == (None, None)
    assert len(STEADY) == STEADY_WEEKS


def category_event(user: str, n: int, ts: int, category: str) -> dict:
    return {"event_id": f"{user}-{n}", "user_id": user, "type": "click", "ts": ts, "item_id": f"i-{category}",
            "category": category, "price": 5.0}


def test_the_sampled_users_candidates_and_what_they_engaged_with_are_read_from_the_state():
    # (the founder: the table held events a churn horizon before the anchor, which is then counted)
    events = [category_event("founder", 0, A - 3 * ANCHOR_MS, "socks")]
    events += [category_event("u", i, A - 3 * DAY + i * HOUR, "shoes" if i < 3 else "hats") for i in range(4)]
    events += [category_event("v", 0, A - 2 * DAY, "socks"), category_event("clock", 0, A - DAY, "shoes")]
    after = [category_event("u", 10, A + DAY, "hats"), category_event("u", 11, A + 2 * DAY, "coats"),
             category_event("clock", 1, A + 2 * DAY, "shoes")]
    closed = [category_event("clock", 2, A + ANCHOR_MS + HOUR, "shoes")]
    before = updater_fed(events, [100])
    held = ["u", "v", "clock", "founder"]
    rows = before.state.rows_for(held)
    keys, x = before.category_candidates(rows, A)
    updater = updater_fed(events + after, [2])
    sample = updater.state.outcomes.samples.samples[(-1, K0)]
    candidates = sample.categories
    order = [held.index(user) for user in sample.users]
    np.testing.assert_array_equal(candidates.keys, keys[order])
    np.testing.assert_allclose(candidates.x.astype(np.float64), x[order].astype(np.float64), atol=1e-3)
    key = {name: int(k) for name, k in zip(updater.state.seen_category_names(),
                                           updater.state.seen_categories().cpu().numpy())}
    engaged = updater.calibration.engaged_since(sample.users, candidates.keys, candidates.counts)
    said = {user: {name for name, k in key.items() if k in candidates.keys[i][engaged[i]]}
            for i, user in enumerate(sample.users)}
    # u came back to hats, not to shoes (coats was no candidate of u's at the anchor); the clock to shoes.
    assert said == {"u": {"hats"}, "v": set(), "clock": {"shoes"}, "founder": set()}
    # The week closes: the weights are fitted on the two users who engaged, and the candidates are dropped.
    for batch in (closed, [category_event("clock", 3, A + ANCHOR_MS + 2 * HOUR, "shoes")]):
        updater = updater_fed(events + after + batch, [100])
        candidates = updater.state.outcomes.samples.samples[(-1, K0)].categories
        assert candidates.weights is not None and candidates.users == 2 and len(candidates.keys) == 0


def week_closed(updater, anchor: int, ranks_by: np.ndarray, seed: int, n: int = 1500) -> None:
    """n users sampled at the anchor engaged with candidates as `choices` draws them; their week closes."""
    log_p, stats, engaged = choices(n, ranks_by, seed)
    # Users the state does not hold: what they engaged with is what they left with.
    users = np.array([f"gone-{anchor}-{i}" for i in range(n)], dtype=object)
    keys = np.arange(1, 10 * n + 1, dtype=np.uint32).reshape(n, 10)
    x = np.concatenate([log_p[:, :, None], stats], axis=2).astype(np.float16)
    categories = CategorySample(keys, x, np.zeros((n, 7), dtype=np.uint16), left=engaged)
    updater.state.outcomes.samples.samples[(0, anchor)] = Sample(users, np.zeros((n, WIDTH), np.float16),
                                                                 categories=categories)
    updater.calibration.fit_categories(anchor)
    updater.state.outcomes.version += 1


def test_the_reranking_is_published_only_where_last_weeks_weights_beat_the_published_ranking():
    truth = np.zeros(len(CATEGORY_STATISTICS))
    truth[FRESH] = 2.0
    for ranks_by, reranks in ((truth, True), (np.zeros_like(truth), False)):
        updater = updater_fed([category_event("someone", 0, A, "shoes")], [1])
        samples = updater.state.outcomes.samples
        for anchor, seed in ((K0 - 3, 3), (K0 - 2, 4), (K0 - 1, 5)):
            week_closed(updater, anchor, ranks_by, seed)
        shop_map = updater.calibration.shop_map()
        assert shop_map.category_users == 1350 and shop_map.reranks() == reranks
        assert passes(shop_map.category_gain, shop_map.category_gain_se) == reranks
        weeks = [samples.category_fit(anchor)[1].gain for anchor in (K0 - 2, K0 - 1)]  # each judged on its week
        assert shop_map.category_gain == np.mean(weeks) and samples.category_fit(K0 - 3)[1].gain is None
        # Each fit carries the weeks judged up to it, the first (no previous weights) not judged.
        fits = [samples.category_fit(anchor)[1] for anchor in (K0 - 2, K0 - 1)]
        assert samples.category_fit(K0 - 1)[1].judged == (None, *((fit.gain, fit.gain_se) for fit in fits))
        assert shop_map.category_steady_gain is None  # three weeks, the first not judged
        if reranks:  # CARRIED of what the week's users said, log P weighed as they follow it
            np.testing.assert_allclose(shop_map.category_weights, [*(CARRIED * truth), 0.0], atol=0.25 * CARRIED)
        # A restart reads the same fit.
        restored = AnchorSamples.from_plain(orjson.loads(orjson.dumps(samples.to_plain())))
        assert restored.category_fit()[1].weights == samples.category_fit()[1].weights
        assert restored.category_fit()[1].judged == samples.category_fit()[1].judged
        # A meta record written before the weeks were kept restores with none.
        old = [[p, at, *rest[:5], rest[5][:9]] for p, at, *rest in samples.to_plain()]
        assert AnchorSamples.from_plain(old).category_fit()[1].judged == ()


def test_a_young_tables_first_week_re_ranks_where_its_own_users_cross_validated_say_so():
    # One week closed: no earlier weights to judge on its users, so each is ranked by weights fitted on the others.
    truth = np.zeros(len(CATEGORY_STATISTICS))
    truth[FRESH] = 2.0
    for ranks_by, reranks in ((truth, True), (np.zeros_like(truth), False)):
        updater = updater_fed([category_event("someone", 0, A, "shoes")], [1])
        week_closed(updater, K0 - 2, ranks_by, seed=6)
        shop_map = updater.calibration.shop_map()
        assert shop_map.category_gain is None and shop_map.reranks() == reranks
        assert passes(shop_map.category_cross_gain, shop_map.category_cross_gain_se) == reranks
        assert (shop_map.category_cross_gain > 0.02) == reranks
        said = describe(shop_map)  # the log line names the verdict and whether it re-ranks
        assert "cross-validated" in said and ("top_categories re-ranked" in said) == reranks
        samples = updater.state.outcomes.samples
        restored = AnchorSamples.from_plain(orjson.loads(orjson.dumps(samples.to_plain())))
        assert restored.category_fit()[1].cross_gain == samples.category_fit()[1].cross_gain is not None
        old = [[p, at, *rest[:5], rest[5][:10]] for p, at, *rest in samples.to_plain()]  # session 63's record
        assert AnchorSamples.from_plain(old).category_fit()[1].cross_gain is None
    # A second week judges the first week's weights on its own users: that verdict alone decides from then on.
    updater = updater_fed([category_event("someone", 0, A, "shoes")], [1])
    week_closed(updater, K0 - 2, truth, seed=6)
    week_closed(updater, K0 - 1, np.zeros_like(truth), seed=7)
    shop_map = updater.calibration.shop_map()
    assert shop_map.category_gain is not None and shop_map.category_cross_gain is None and not shop_map.reranks()


def test_four_weeks_ahead_in_a_row_re_rank_what_the_latest_two_weeks_alone_do_not():
    weights = np.zeros(len(CATEGORY_STATISTICS))
    weights[FRESH] = 1.0
    for weeks, reranks in ((STEADY, True), (STEADY[:2] + ((-0.004, 0.01),) + STEADY[3:], False), (STEADY[1:], False)):
        updater = updater_fed([category_event("someone", 0, A, "shoes")], [1])
        samples = updater.state.outcomes.samples
        for anchor, judged_then in ((K0 - 2, weeks[:-1]), (K0 - 1, weeks)):
            categories = CategorySample(np.zeros((0, 10), np.uint32), np.zeros((0, 10, 8), np.float16),
                                        np.zeros((0, 6), np.uint16))
            categories.matured(tuple(weights.tolist()), judged_then[-1], 150, judged_then)
            samples.samples[(0, anchor)] = Sample(np.array([], dtype=object), np.zeros((0, WIDTH), np.float16),
                                                  categories=categories)
        updater.state.outcomes.version += 1
        shop_map = updater.calibration.shop_map()
        assert not passes(shop_map.category_gain, shop_map.category_gain_se)  # the latest two weeks alone
        assert shop_map.reranks() == reranks
        assert (shop_map.category_steady_gain is not None) == reranks


def test_a_week_judged_on_too_few_users_restores_with_its_infinite_error_and_does_not_re_rank():
    """A gain judged on fewer than two users, or cross-validated on too few, has an infinite standard error; JSON
    has none, and a meta record wrote it as null. Restored, it is infinite again (a restart had read no error at all,
    and the gate's arithmetic on it stopped the daemon), and nothing is re-ranked on it."""
    weights = np.zeros(len(CATEGORY_STATISTICS))
    weights[FRESH] = 1.0
    no_evidence = (0.0, float("inf"))
    for anchor, gain, cross in ((K0 - 2, None, no_evidence), (K0 - 1, no_evidence, None)):
        updater = updater_fed([category_event("someone", 0, A, "shoes")], [1])
        categories = CategorySample(np.zeros((0, 10), np.uint32), np.zeros((0, 10, 8), np.float16),
                                    np.zeros((0, 6), np.uint16))
        categories.matured(tuple(weights.tolist()), gain, 1, (gain,), cross)
        samples = updater.state.outcomes.samples
        samples.samples[(0, anchor)] = Sample(np.array([], dtype=object), np.zeros((0, WIDTH), np.float16),
                                              categories=categories)
        written = orjson.loads(orjson.dumps(samples.to_plain()))
        written_categories = written[0][2 + 5]  # (partition, anchor, then the sample's fields: its candidates 6th)
        assert (written_categories[7] if gain else written_categories[10][1]) is None  # the infinity went out as null
        updater.state.outcomes.samples = AnchorSamples.from_plain(written)
        restored = updater.state.outcomes.samples.category_fit()[1]
        assert (restored.gain, restored.gain_se, restored.cross_gain) == (*(gain or (None, None)), cross)
        assert restored.judged == (gain,)
        updater.state.outcomes.version += 1
        shop_map = updater.calibration.shop_map()
        assert not shop_map.reranks() and "top_categories as the model ranks" in describe(shop_map)


def test_a_published_profile_ranks_its_categories_as_the_shops_weights_say():
    # Many old events in "boots", one fresh in "sandals": where the shop's weeks say freshness counts, sandals lead.
    events = [category_event("u", i, A - 20 * DAY + i * HOUR, "boots") for i in range(8)]
    events += [category_event("u", 8, A - HOUR, "sandals"), category_event("w", 0, A - 2 * HOUR, "scarves")]
    # (weights of a record before log P was a term, then with its weight: the model's probability flattened)
    for reranks, log_p_weight in ((False, None), (True, None), (True, -0.6)):
        weights = np.zeros(len(CATEGORY_STATISTICS))
        weights[FRESH] = 8.0
        written = tuple(weights.tolist()) + (() if log_p_weight is None else (log_p_weight,))
        updater = updater_fed(events, [100])
        samples = updater.state.outcomes.samples
        for anchor, gain in ((K0 - 2, None), (K0 - 1, (0.05 if reranks else 0.0, 0.01))):
            categories = CategorySample(np.zeros((0, 10), np.uint32), np.zeros((0, 10, 8), np.float16),
                                        np.zeros((0, 6), np.uint16))
            categories.matured(written, gain, 100)
            samples.samples[(0, anchor)] = Sample(np.array([], dtype=object), np.zeros((0, WIDTH), np.float16),
                                                  categories=categories)
        updater.state.outcomes.version += 1
        assert updater.calibration.shop_map().reranks() == reranks
        rows = updater.state.rows_for(["u"])
        keys, x = updater.category_candidates(rows, updater.state.max_event_ts)
        said = (1 + (log_p_weight or 0.0)) * x[0, :, 0].astype(np.float64)
        said += x[0, :, 1:].astype(np.float64) @ weights if reranks else 0.0
        names = dict(zip(updater.state.seen_categories().cpu().numpy().tolist(), updater.state.seen_category_names()))
        order = [i for i in np.argsort(-said, kind="stable") if keys[0][i]][:3]
        profile = orjson.loads(updater.profiles_for(rows)[0][1])
        assert [c["category"] for c in profile["top_categories"]] == [names[int(keys[0][i])] for i in order]
        assert (names[int(keys[0][order[0]])] == "sandals") == reranks
        candidates_mass = np.exp(x[0, :, 0].astype(np.float64))[keys[0] > 0].sum()
        assert sum(c["score"] for c in profile["top_categories"]) <= candidates_mass + 1e-4
        # The published scores keep the ratios the weights say (log P's weight included).
        scores = [c["score"] for c in profile["top_categories"]]
        np.testing.assert_allclose(np.log(scores[1] / scores[2]), said[order[1]] - said[order[2]], atol=0.02)


def test_the_evaluation_report_says_which_verdict_re_ranked_top_categories():
    from consumers.field_report import stream_calibration_line

    kept = {"users": 900, "applied": False, "gain_nats": 1.0}
    weights = dict.fromkeys(CATEGORY_STATISTICS, 0.0)
    first_week = {"users": 160, "weights": weights, "gain": None, "gain_standard_error": None,
                  "cross_validated_gain": 0.067, "cross_validated_gain_standard_error": 0.021}
    for categories, says in (
            ({**first_week, "applied": True}, "top_categories re-ranked by"),
            ({**first_week, "cross_validated_gain": 0.028, "applied": False}, "top_categories as the model ranks them"),
            ({**first_week, "gain": 0.03, "gain_standard_error": 0.01, "applied": True}, "over the latest two weeks")):
        line = stream_calibration_line({"purchase_propensity": kept, "churn_risk": kept, "top_categories": categories})
        assert says in line
        cross = f"{categories['cross_validated_gain']:+.3f} +- 0.021" in line
        assert cross == (categories["gain"] is None)  # the first week's verdict only while it is the one there is
