"""The simple scorers `profiles evaluate` sets beside the model, fitted on the training events in the same
run: popularity, sequential rules (last item -> next item transition counts, ties by popularity), and
session kNN (the training sessions most like the latest events vote; models/neighbours.py).
They implement models/next_event_evaluation.NextEventScorer."""

from __future__ import annotations

import numpy as np
import torch

from stream.events import PURCHASE
from stream.statistics import SESSION_GAP_MS

from models.next_event_evaluation import (
    CHUNK_ELEMENTS, EvalTargets, NextEventPredictions, PrefixState, Sequences, flat_concat, chunked_ranks, prefix_state, ranks_in_fixed_scores, targets,
)
from models.neighbours import SessionNeighbours
from models.transitions import successor_counts


class PopularityBaseline:
    """Rank by training counts; propensity from the user's own purchase share so far.

    item score of j     = number of training events (any type) with item j
    category score of c = number of training events with category c
    propensity of a row = (purchases in the prefix + prior_events * g) / (events in the prefix + prior_events),
        g = share of all training events that are purchases. This is the user's purchase share so
        far (training events carried over when `train` is given, plus test events 0..t-1), shrunk
        towards the global share; it is a score, not a calibrated 24 h probability (AUC reads only
        its order). A user with no history scores g.
    """

    name = "popularity"

    def __init__(self, prior_events: float = 10.0) -> None:
        self.prior_events = float(prior_events)
        self.item_counts: np.ndarray | None = None
        self.category_counts: np.ndarray | None = None
        self.purchase_share = 0.0

    def fit(self, train: Sequences) -> None:
        items, cats, types = flat_concat(train.items), flat_concat(train.categories), flat_concat(train.types)
        self.item_counts = np.bincount(items[items >= 0], minlength=train.n_items).astype(np.int64)
        self.category_counts = np.bincount(cats[cats >= 0], minlength=train.n_categories).astype(np.int64)
        self.purchase_share = float(np.mean(types == PURCHASE)) if len(types) else 0.0

    def rank_next(
        self, train: Sequences | None, test: Sequences, k_items: int = 20, k_categories: int = 5
    ) -> NextEventPredictions:
        self._check_fitted(test)
        rows = targets(test)
        state = prefix_state(train, test, rows)
        return NextEventPredictions(
            item_ranks=self._item_ranks(rows, state),
            category_ranks=self._category_ranks(rows, state),
            propensity=self._propensity(state),
            propensity_labels=rows.purchase_label.copy(),
        )

    def _item_ranks(self, rows: EvalTargets, state: PrefixState) -> np.ndarray:
        return ranks_in_fixed_scores(self.item_counts, rows.item[rows.item_rows])

    def _category_ranks(self, rows: EvalTargets, state: PrefixState) -> np.ndarray:
        return ranks_in_fixed_scores(self.category_counts, rows.category[rows.category_rows])

    def _propensity(self, state: PrefixState) -> np.ndarray:
        prior = self.prior_events
        return (state.n_purchases + prior * self.purchase_share) / (state.n_events + prior)

    def _check_fitted(self, test: Sequences) -> None:
        if self.item_counts is None or self.category_counts is None:
            raise RuntimeError(f"{self.name}: call fit() before rank_next()")
        if (len(self.item_counts), len(self.category_counts)) != (test.n_items, test.n_categories):
            raise ValueError(f"{self.name}: fitted on other vocabulary sizes than the test sequences use")


class TransitionCounts:
    """count[a, b]: how often known value b directly follows known value a in a training sequence.

    "Directly" skips -1 entries: in [a, -1, b] the pair is (a, b), as a prefix's last known value
    is a at the time b is predicted. Pairs never span two users. Stored as CSR (numpy only, every
    successor kept: models/transitions.successor_counts): row a's columns are cols[indptr[a]:indptr[a+1]],
    with their counts in counts[...].
    """

    def __init__(self, sequences: list[np.ndarray], n: int) -> None:
        values = flat_concat(sequences)
        user = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        known = values >= 0
        values, user = values[known], user[known]
        same_user = user[1:] == user[:-1]
        self.n = n
        self.indptr, self.cols, self.counts = successor_counts(values[:-1][same_user], values[1:][same_user], n,
                                                               per_row=n)

    def row(self, a: int) -> tuple[np.ndarray, np.ndarray]:
        """(columns, counts) of row a."""
        lo, hi = self.indptr[a], self.indptr[a + 1]
        return self.cols[lo:hi], self.counts[lo:hi]

    def dense(self, a: int) -> np.ndarray:
        """Row a as a dense (n,) int64 vector."""
        out = np.zeros(self.n, dtype=np.int64)
        cols, counts = self.row(a)
        out[cols] = counts
        return out


class SequentialRulesBaseline(PopularityBaseline):
    """Last item -> next item transition counts, ties broken by popularity.

    After a prefix whose last known item is a, candidate j scores
        count[a, j] + pop(j) / (max_pop + 1)
    (count from TransitionCounts over the training item sequences, pop = training item counts,
    so the tie-breaker lies in [0, 1) and only orders items with equal counts). It is computed as
    the equivalent integer count[a, j] * (max_pop + 1) + pop(j), so the order is exact. A prefix
    without a known item has count 0 everywhere: plain popularity. Categories: the same rule over
    category sequences. Propensity: as PopularityBaseline.
    """

    name = "sequential_rules"

    def __init__(self, prior_events: float = 10.0, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__(prior_events)
        self.chunk_elements = chunk_elements
        self.item_transitions: TransitionCounts | None = None
        self.category_transitions: TransitionCounts | None = None

    def fit(self, train: Sequences) -> None:
        super().fit(train)
        self.item_transitions = TransitionCounts(train.items, train.n_items)
        self.category_transitions = TransitionCounts(train.categories, train.n_categories)

    def _item_ranks(self, rows: EvalTargets, state: PrefixState) -> np.ndarray:
        r = rows.item_rows
        return self._rule_ranks(self.item_transitions, self.item_counts, state.last_item[r], rows.item[r])

    def _category_ranks(self, rows: EvalTargets, state: PrefixState) -> np.ndarray:
        r = rows.category_rows
        return self._rule_ranks(
            self.category_transitions, self.category_counts, state.last_category[r], rows.category[r]
        )

    def _rule_ranks(
        self, rules: TransitionCounts, popularity: np.ndarray, last: np.ndarray, target: np.ndarray
    ) -> np.ndarray:
        scale = int(popularity.max(initial=0)) + 1

        def score_rows(last_values: np.ndarray) -> np.ndarray:
            scores = np.repeat(popularity[None, :], len(last_values), axis=0)
            for b, a in enumerate(last_values):
                if a >= 0:
                    cols, counts = rules.row(a)
                    scores[b, cols] += counts * scale
            return scores

        return chunked_ranks(score_rows, last, target, len(popularity), self.chunk_elements)


class SessionKNNBaseline(SequentialRulesBaseline):
    """Session kNN (V-SKNN): the training sessions that share items with the prefix's latest events vote for
    their items, each with its cosine similarity to them (models/neighbours.py, the model's own index and
    query, at weight 1 and without the GRU). Ties, as where no session shares an item, by popularity.
    Categories and propensity: as SequentialRulesBaseline."""

    name = "session_knn"

    def __init__(self, prior_events: float = 10.0, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        super().__init__(prior_events, chunk_elements)
        self.neighbours: SessionNeighbours | None = None

    def fit(self, train: Sequences) -> None:
        super().fit(train)
        user = np.repeat(np.arange(len(train.items)), [len(s) for s in train.items])
        self.neighbours = SessionNeighbours.from_events(user, flat_concat(train.ts), flat_concat(train.items),
                                                        train.n_items, SESSION_GAP_MS)

    def _item_ranks(self, rows: EvalTargets, state: PrefixState) -> np.ndarray:
        # The popularity tie-breaker lies below the spacing of the votes' float32 values (~5e-7 at the largest).
        ties = 1e-7 * self.item_counts / (self.item_counts.max(initial=0) + 1)

        def score_rows(recent: np.ndarray) -> np.ndarray:
            votes = self.neighbours.scores(torch.from_numpy(recent), None, len(self.item_counts))
            return votes.double().numpy() + ties

        r = rows.item_rows
        return chunked_ranks(score_rows, state.recent_items[r], rows.item[r], len(self.item_counts),
                             self.chunk_elements)
