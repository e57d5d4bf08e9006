"""Next-event evaluation: hand-computed ranks, metrics, labels and baselines."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest

from models.next_event_evaluation import (
    HOUR_MS, NextEventPredictions, Sequences, evaluate, mrr_at, prefix_state, ranks_from_scores, ranks_in_fixed_scores, recall_at, roc_auc, targets,
)
from models.next_event_baselines import (
    PopularityBaseline, SequentialRulesBaseline, SessionKNNBaseline, TransitionCounts,
)

SEARCH, CLICK, ADD_TO_CART, PURCHASE = range(4)


def seqs(items, n_items=4, n_categories=3, categories=None, types=None, ts=None) -> Sequences:
    """Sequences from lists of lists; defaults: category = item // 2 (-1 for -1), all clicks, one event a minute."""
    if categories is None:
        categories = [[i // 2 if i >= 0 else -1 for i in u] for u in items]
    if types is None:
        types = [[CLICK] * len(u) for u in items]
    if ts is None:
        ts = [[60_000 * k for k in range(len(u))] for u in items]
    arr = lambda lists: [np.array(u, dtype=np.int64) for u in lists]  # noqa: E731
    return Sequences(arr(items), arr(categories), arr(types), arr(ts), n_items, n_categories)


TRAIN_ONE = seqs([[0, 1, 2, 0, 1, 3]])  # popularity [2, 2, 1, 1]; transitions 0->1 x2, 1->2, 1->3, 2->0


def fitted(cls, train=TRAIN_ONE, **kw):
    scorer = cls(**kw)
    scorer.fit(train)
    return scorer


# --- ranks ----------------------------------------------------------------------------------


def test_rank_counts_only_strictly_greater_scores():
    scores = np.array([[1.0, 3.0, 3.0, 0.0]] * 3)
    assert ranks_from_scores(scores, np.array([1, 0, 3])).tolist() == [1, 3, 4]
    assert ranks_in_fixed_scores(np.array([1, 3, 3, 0]), np.array([1, 2, 0, 3])).tolist() == [1, 1, 3, 4]


def test_rank_of_a_nan_target_score_is_an_error():
    with pytest.raises(ValueError):
        ranks_from_scores(np.array([[np.nan, 1.0]]), np.array([0]))


def test_recall_and_mrr():
    ranks = np.array([1, 2, 5, 30])
    assert recall_at(ranks, 2) == 0.5
    assert mrr_at(ranks, 2) == pytest.approx((1 + 0.5) / 4)
    assert mrr_at(ranks, 20) == pytest.approx((1 + 0.5 + 0.2) / 4)
    assert math.isnan(recall_at(np.array([], dtype=np.int64), 20))


# --- transition counts ----------------------------------------------------------------------


def test_transition_counts_by_hand():
    t = TransitionCounts(TRAIN_ONE.items, 4)
    assert [t.dense(a).tolist() for a in range(4)] == [[0, 2, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_transitions_skip_unknown_values_and_never_span_users():
    t = TransitionCounts([np.array([0, -1, 1]), np.array([2]), np.array([3, -1])], 4)
    assert t.dense(0).tolist() == [0, 1, 0, 0]  # 0, -1, 1 is the pair (0, 1)
    assert t.dense(1).sum() == 0  # user 0 ends at 1; user 1 starts at 2: no (1, 2)
    assert t.dense(2).sum() == 0 and t.counts.sum() == 1


# --- the brief's example: 4 items, train [0,1,2,0,1,3] ---------------------------------------


def test_hand_example_recall_and_mrr():
    # Test sessions as new users (train=None in rank_next). Rows: after 0 predict 1, after 2 predict 3,
    # after 1 predict 2. Popularity [2,2,1,1]: ranks 1 (tie with 0), 3, 3.
    # Rules: row 0 = {1: 2} -> 1 first; row 2 = {0: 1}: 0 and then 1 (tie-break pop 2) beat 3 -> 3;
    # row 1 = {2: 1, 3: 1} -> 2 ties with 3 at the top -> 1.
    test = seqs([[0, 1], [2, 3], [1, 2]])
    pop, rules = fitted(PopularityBaseline), fitted(SequentialRulesBaseline)
    assert pop.rank_next(None, test).item_ranks.tolist() == [1, 3, 3]
    assert rules.rank_next(None, test).item_ranks.tolist() == [1, 3, 1]

    for k, pop_recall, rules_recall in [(1, 1 / 3, 2 / 3), (2, 1 / 3, 2 / 3), (3, 1.0, 1.0)]:
        assert evaluate(pop, None, test, k=k)[f"recall@{k}"] == pytest.approx(pop_recall)
        assert evaluate(rules, None, test, k=k)[f"recall@{k}"] == pytest.approx(rules_recall)
    assert evaluate(pop, None, test)["mrr@20"] == pytest.approx((1 + 1 / 3 + 1 / 3) / 3)
    assert evaluate(rules, None, test)["mrr@20"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert evaluate(rules, None, test, k=2)["mrr@2"] == pytest.approx((1 + 0 + 1) / 3)


def test_skipped_item_targets_are_counted_not_ranked():
    # Rows: t=1 predicts item -1 (skipped); t=2 predicts 3 after prefix [1, -1], whose last known item is 1.
    # Rules row 1 = {2: 1, 3: 1}: 3 ranks 1. Popularity would rank 3 third.
    test = seqs([[1, -1, 3]])
    for scorer, recall1 in [(fitted(SequentialRulesBaseline), 1.0), (fitted(PopularityBaseline), 0.0)]:
        result = evaluate(scorer, None, test, k=1)
        assert result["item_targets"] == 1
        assert result["skipped_item_targets"] == 1
        assert result["propensity_positions"] == 2
        assert result["category_targets"] == 1
        assert result["recall@1"] == recall1


def test_training_events_carry_over_into_the_prefix():
    # User 0: train [0,1,2,0,1,3], test [-1, 0]: last known item is 3 (from train), row 3 empty -> popularity.
    # User 1: train [1],           test [-1, 3]: last known item is 1 -> rule row {2: 1, 3: 1} -> rank 1.
    # Popularity with user 1's training event: [2, 3, 1, 1]; 0 ranks 2, 3 ranks 3.
    train = seqs([[0, 1, 2, 0, 1, 3], [1]])
    test = seqs([[-1, 0], [-1, 3]])
    rules = fitted(SequentialRulesBaseline, train)

    carried = prefix_state(train, test, targets(test))
    assert carried.last_item.tolist() == [3, 1]
    assert carried.n_events.tolist() == [7, 2]
    assert carried.recent_items[:, :4].tolist() == [[-1, 3, 1, 0], [-1, 1, -1, -1]]  # latest first, then train
    fresh = prefix_state(None, test, targets(test))
    assert fresh.last_item.tolist() == [-1, -1]
    assert fresh.n_events.tolist() == [1, 1]
    assert (fresh.recent_items == -1).all()

    assert rules.rank_next(train, test).item_ranks.tolist() == [2, 1]
    assert rules.rank_next(None, test).item_ranks.tolist() == [2, 3]


def test_train_must_align_with_test_users():
    scorer = fitted(PopularityBaseline)
    with pytest.raises(ValueError):
        scorer.rank_next(TRAIN_ONE, seqs([[0, 1], [2, 3]]))


# --- categories -----------------------------------------------------------------------------


def test_category_accuracy_at_5():
    # Category counts 6,5,4,3,2,1,0 for categories 0..6: category 4 ranks 5 (hit), category 5 ranks 6 (miss).
    train_cats = [c for c in range(6) for _ in range(6 - c)]
    train = seqs([[-1] * len(train_cats)], n_categories=7, categories=[train_cats])
    test = seqs([[-1, -1], [-1, -1], [-1, -1]], n_categories=7, categories=[[0, 4], [0, 5], [0, -1]])
    result = evaluate(fitted(PopularityBaseline, train), None, test)
    assert result["category_acc@5"] == 0.5
    assert result["category_targets"] == 2
    assert result["item_targets"] == 0 and result["skipped_item_targets"] == 3
    assert math.isnan(result["recall@20"])


def test_category_transition_rule():
    # Category transitions 0->0 x2, 0->1, 1->2, 2->1; counts [3, 2, 2].
    # After category 2, the rule puts 1 first; popularity puts 0 first (and 1 ties with 2: rank 2).
    train = seqs([[-1] * 5, [-1] * 2], categories=[[0, 0, 0, 1, 2], [2, 1]])
    test = seqs([[-1, -1]], categories=[[2, 1]])
    assert evaluate(fitted(SequentialRulesBaseline, train), None, test, k_categories=1)["category_acc@1"] == 1.0
    assert fitted(PopularityBaseline, train).rank_next(None, test).category_ranks.tolist() == [2]


# --- ROC AUC --------------------------------------------------------------------------------


def test_roc_auc_by_hand():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # Positives 0.5 and 0.9 against negatives 0.2 and 0.5: 1 + 0.5 (tie) + 1 + 1 of 4 pairs.
    assert roc_auc(np.array([0.2, 0.5, 0.5, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(0.875)
    assert roc_auc(np.full(4, 0.3), np.array([0, 1, 0, 1])) == 0.5
    assert roc_auc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0


def test_roc_auc_is_nan_with_one_class_and_rejects_bad_input():
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([0, 0])))
    with pytest.raises(ValueError):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError):
        roc_auc(np.array([np.nan, 0.2]), np.array([0, 1]))


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 5, 60) / 4.0  # many ties
    labels = rng.integers(0, 2, 60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in product(pos, neg)]
    assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))


# --- propensity labels ----------------------------------------------------------------------


def test_purchase_labels_respect_the_24h_horizon():
    h = HOUR_MS
    test = seqs(
        [[0, 1, 2], [0, 1, 2], [0, 1], [0, 1]],
        types=[[CLICK, CLICK, PURCHASE], [CLICK, CLICK, PURCHASE], [CLICK, PURCHASE], [PURCHASE, CLICK]],
        ts=[[0, 1 * h, 26 * h], [0, 1 * h, 24 * h], [0, 5 * h], [0, 1 * h]],
    )
    rows = targets(test)
    assert list(zip(rows.user.tolist(), rows.position.tolist())) == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (3, 1)]
    assert rows.purchase_label.tolist() == [
        0,  # user 0 after event 0 (t=0): purchase 26 h later is outside the horizon
        0,  # user 0 after event 1 (t=1 h): purchase 25 h later, still outside
        1,  # user 1: purchase exactly 24 h later counts
        1,
        1,  # user 2: the predicted event itself is the purchase
        0,  # user 3: the purchase was already observed; nothing follows it
    ]


def test_purchase_labels_do_not_leak_across_users():
    test = seqs([[0, 1], [2, 3]], types=[[CLICK, CLICK], [PURCHASE, PURCHASE]], ts=[[0, 1], [2, 3]])
    assert targets(test).purchase_label.tolist() == [0, 1]


def test_popularity_propensity_uses_the_users_purchase_history():
    # User 0 bought in training, user 1 did not; same test clicks. Carried over, user 0 scores higher;
    # without training state both prefixes are one click and score alike.
    train = seqs([[0, 1], [2, 3]], types=[[CLICK, PURCHASE], [CLICK, CLICK]])
    test = seqs([[0, 1], [0, 1]])
    scorer = fitted(PopularityBaseline, train)
    carried = scorer.rank_next(train, test).propensity
    assert carried[0] > carried[1]
    fresh = scorer.rank_next(None, test).propensity
    assert fresh[0] == fresh[1] and 0 < fresh[0] < 0.25  # shrunk towards the training share 1/4


# --- evaluate() on both baselines: exact values ---------------------------------------------


def evaluation_data():
    h = HOUR_MS
    # Popularity [2, 3, 1, 1] (user 1's training click on 1); categories (item // 2) counts [5, 2, 0].
    train = seqs([[0, 1, 2, 0, 1, 3], [1]], types=[[CLICK] * 5 + [PURCHASE], [CLICK]])
    test = seqs(
        [[-1, 0, 1], [1, -1, 3]],
        categories=[[-1, 0, 0], [0, -1, 1]],
        types=[[SEARCH, CLICK, PURCHASE], [CLICK, SEARCH, CLICK]],
        ts=[[0, 1 * h, 2 * h], [0, 10 * h, 40 * h]],
    )
    return train, test


def test_evaluate_popularity_exact():
    # Item rows: 0 (rank 2), 1 (rank 1), [user 1, t=1: item -1, skipped], 3 (rank 3).
    # Category rows: 0, 0, [-1 skipped], 1 -> ranks 1, 1, 2.
    # Labels: user 0 buys at 2 h -> 1, 1; user 1 never buys -> 0, 0. Training purchase share 1/7:
    # user 0's prefixes (7 and 8 events, 1 purchase) score above user 1's (2 and 3 events, none) -> AUC 1.
    train, test = evaluation_data()
    result = evaluate(fitted(PopularityBaseline, train), train, test, k=2, k_categories=1)
    assert result == pytest.approx({
        "recall@2": 2 / 3,
        "mrr@2": (1 / 2 + 1 + 0) / 3,
        "category_acc@1": 2 / 3,
        "propensity_auc": 1.0,
        "item_targets": 3,
        "skipped_item_targets": 1,
        "category_targets": 3,
        "propensity_positions": 4,
    })


def test_evaluate_sequential_rules_exact():
    # Item rows: after 3 (carried from train; no rule) -> popularity rank 2; after 0 -> 1 first;
    # after 1 -> {2: 1, 3: 1}: 3 ties with 2 at the top -> rank 1.
    train, test = evaluation_data()
    result = evaluate(fitted(SequentialRulesBaseline, train), train, test, k=2, k_categories=1)
    assert result == pytest.approx({
        "recall@2": 1.0,
        "mrr@2": (1 / 2 + 1 + 1) / 3,
        "category_acc@1": 2 / 3,
        "propensity_auc": 1.0,
        "item_targets": 3,
        "skipped_item_targets": 1,
        "category_targets": 3,
        "propensity_positions": 4,
    })
    default_keys = set(evaluate(fitted(SequentialRulesBaseline, train), train, test))
    assert default_keys >= {"recall@20", "mrr@20", "category_acc@5"}


def test_session_knn_ranks_by_the_sessions_that_share_the_latest_items():
    # Training sessions (one per user): {0, 1, 2} twice, {1, 3}, {4}; popularity [2, 3, 2, 1, 1, 0].
    train = seqs([[0, 1, 2], [0, 1, 2], [1, 3], [4]], n_items=6)
    test = seqs([[0, 1, 2], [5, 3], [0, 1, 3]], n_items=6)
    # After [0]: the two {0, 1, 2} vote 1/sqrt(3) each for 0, 1 and 2, tied; popularity puts 1 first.
    # After [0, 1] (weights 1/2 and 1): each {0, 1, 2} votes 1.5/sqrt(6) for 0, 1 and 2, {1, 3} 1/sqrt(4) for
    # 1 and 3: 1 first, then 0 and 2 (tied in votes and popularity: 2 ranks second), then 3 (fourth).
    # After [5]: no session holds 5, so popularity: 3 ranks behind 1, 0 and 2.
    # Rows: (user 0, t = 1, 2), (user 1, t = 1), (user 2, t = 1, 2).
    assert fitted(SessionKNNBaseline, train).rank_next(None, test).item_ranks.tolist() == [1, 2, 4, 1, 4]


class _Replay:
    """A scorer that returns fixed predictions."""

    name = "replay"

    def __init__(self, predictions: NextEventPredictions) -> None:
        self.predictions = predictions

    def fit(self, train: Sequences) -> None:
        pass

    def rank_next(self, train, test, k_items=20, k_categories=5) -> NextEventPredictions:
        return self.predictions


def test_evaluate_checks_the_scorers_rows():
    train, test = evaluation_data()
    rows = targets(test)
    ones = lambda n: np.ones(n, dtype=np.int64)  # noqa: E731
    good = NextEventPredictions(ones(3), ones(3), rows.purchase_label.astype(float), rows.purchase_label)
    result = evaluate(_Replay(good), train, test)
    assert (result["recall@20"], result["mrr@20"], result["propensity_auc"]) == (1.0, 1.0, 1.0)

    for bad in [
        NextEventPredictions(ones(4), ones(3), np.zeros(4), rows.purchase_label),  # ranked the skipped target
        NextEventPredictions(ones(3), ones(3), np.zeros(4), rows.purchase_label[::-1]),  # rows out of order
        NextEventPredictions(ones(3), ones(3), np.zeros(3), rows.purchase_label),
        NextEventPredictions(ones(3) - 1, ones(3), np.zeros(4), rows.purchase_label),  # rank 0
    ]:
        with pytest.raises(ValueError):
            evaluate(_Replay(bad), train, test)


# --- the rule, chunked, against a direct reference --------------------------------------------


def reference_rule_ranks(
    train_items: list[list[int]], prefixes: list[list[int]], target: list[int], n: int
) -> list[int]:
    """Rank by (transition count from the last known item, popularity), lexicographically; strict."""
    pop = [0] * n
    count: dict[tuple[int, int], int] = {}
    for seq in train_items:
        known = [i for i in seq if i >= 0]
        for i in known:
            pop[i] += 1
        for a, b in zip(known, known[1:]):
            count[a, b] = count.get((a, b), 0) + 1
    ranks = []
    for prefix, y in zip(prefixes, target):
        known = [i for i in prefix if i >= 0]
        last = known[-1] if known else None
        key = [(count.get((last, j), 0), pop[j]) for j in range(n)]
        ranks.append(1 + sum(key[j] > key[y] for j in range(n)))
    return ranks


@pytest.mark.parametrize("chunk_elements", [1, 100, 10**6])
def test_sequential_rules_match_reference(chunk_elements):
    rng = np.random.default_rng(3)
    n = 23
    draw = lambda m: [int(v) for v in rng.choice(np.arange(-1, n), m, p=[0.1] + [0.9 / n] * n)]  # noqa: E731
    train_items = [draw(int(rng.integers(0, 30))) for _ in range(12)]
    test_items = [draw(int(rng.integers(0, 12))) for _ in range(12)]
    train, test = seqs(train_items, n_items=n, n_categories=12), seqs(test_items, n_items=n, n_categories=12)

    scorer = fitted(SequentialRulesBaseline, train, chunk_elements=chunk_elements)
    rows = targets(test)
    r = rows.item_rows
    prefixes = [train_items[u] + test_items[u][:t] for u, t in zip(rows.user[r], rows.position[r])]
    expected = reference_rule_ranks(train_items, prefixes, rows.item[r].tolist(), n)
    assert len(expected) > 30
    assert scorer.rank_next(train, test).item_ranks.tolist() == expected


# --- input checks ---------------------------------------------------------------------------


def test_sequences_reject_inconsistent_input():
    with pytest.raises(ValueError):
        seqs([[0, 1]], types=[[CLICK]])
    with pytest.raises(ValueError):
        seqs([[0, 4]])  # item 4 outside a vocabulary of 4
    with pytest.raises(ValueError):
        seqs([[0, 1]], ts=[[5, 4]])


def test_rank_next_needs_fit():
    with pytest.raises(RuntimeError):
        SequentialRulesBaseline().rank_next(None, seqs([[0, 1]]))
