"""Next-event evaluation: full-ranking item recall/MRR, category accuracy and purchase-propensity AUC.

In the spirit of GRU4Rec's evaluation.py: the metrics come from one pure function,
`evaluate(scorer, train, test)`, and every scorer is judged on the same target rows.

Protocol ("next event", full ranking)
-------------------------------------
Target rows. For every test user u and every position t >= 1 of u's test sequence there is
one row (u, t). Rows are ordered user by user, then position by position; `targets(test)`
enumerates them once, so every scorer is scored on identical rows in an identical order.

Prefix. To predict event t of user u a scorer may use u's training events (only when `train`
is given: state carried over from training, test user i being training user i) followed by
u's test events 0..t-1. Nothing at or after event t, and no other user's test events.

Items. The target is the item of event t. Rows whose item is -1 (unknown to the training
vocabulary, or an event without an item) are skipped and counted ("skipped_item_targets").
    rank      = 1 + number of vocabulary items whose score is STRICTLY greater than the target's
    recall@K  = mean(rank <= K)
    mrr@K     = mean(1 / rank if rank <= K else 0)
Ties never push the target down, so a scorer must break its own ties: a constant scorer
would rank every target first. (The baselines break ties by training popularity; what ties
remain favour them. The GRU's float scores practically never tie, so comparisons against
the baselines err in the baselines' favour.)

Categories. The same rows, the target being the category of event t (rows with -1 skipped);
category_acc@5 = mean(rank <= 5) over the n_categories categories, with the same rank rule.

Purchase propensity. Row (u, t) is also the moment just after u's test event t-1 was observed;
"now" is ts[t-1]. The scorer gives a score for P(u purchases within `horizon_ms` (24 h) of now).
    label = 1 if some test event j >= t of u has type purchase and ts[j] <= ts[t-1] + horizon_ms
Event t itself counts (it is the next event); event t-1 does not (it is already observed).
Each user's last test event is never a "now" (it has no row), and purchases after the end of
the test data are unseen: the labels are censored the same way for every scorer.
ROC AUC is the Mann-Whitney rank statistic with tied scores counted half; nan if all labels agree.

Scorers implement `NextEventScorer`: `fit(train)` then `rank_next(train_or_None, test)` returning
`NextEventPredictions` in the order of `targets(test)`. `evaluate` does not fit: fit first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np

from models.neighbours import latest_items
from stream.events import PURCHASE

HOUR_MS = 3_600_000
PROPENSITY_HORIZON_MS = 24 * HOUR_MS
# Cells of one (targets x candidates) score matrix: 2**23 int64/float64 cells = 64 MiB.
CHUNK_ELEMENTS = 2**23


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Sequences:
    """Users' events in event-time order; list entry u holds user u's events, all arrays of one length.

    items:      item vocabulary index per event, -1 = unknown to the training vocabulary / no item
    categories: category vocabulary index per event, -1 = none / unknown
    types:      0 search, 1 click, 2 add_to_cart, 3 purchase (stream.events order)
    ts:         epoch ms per event, non-decreasing within a user
    A user may have no events (empty arrays), e.g. a test user absent from training.
    """

    items: list[np.ndarray]
    categories: list[np.ndarray]
    types: list[np.ndarray]
    ts: list[np.ndarray]
    n_items: int
    n_categories: int

    def __post_init__(self) -> None:
        n_users = len(self.items)
        if not (len(self.categories) == len(self.types) == len(self.ts) == n_users):
            raise ValueError("items, categories, types and ts must hold the same number of users")
        lengths = self.lengths()
        for name in ("categories", "types", "ts"):
            if not np.array_equal(np.array([len(a) for a in getattr(self, name)], dtype=np.int64), lengths):
                raise ValueError(f"{name} and items differ in length for some user")
        items, cats = flat_concat(self.items), flat_concat(self.categories)
        if len(items) and (items.min() < -1 or items.max() >= self.n_items):
            raise ValueError(f"item indices must lie in [-1, {self.n_items})")
        if len(cats) and (cats.min() < -1 or cats.max() >= self.n_categories):
            raise ValueError(f"category indices must lie in [-1, {self.n_categories})")
        ts, user = flat_concat(self.ts), np.repeat(np.arange(n_users), lengths)
        if np.any((np.diff(ts) < 0) & (user[1:] == user[:-1])):
            raise ValueError("ts must be non-decreasing within each user")

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> np.ndarray:
        """(U,) events per user."""
        return np.array([len(a) for a in self.items], dtype=np.int64)


def flat_concat(arrays: list[np.ndarray]) -> np.ndarray:
    """The users' arrays end to end, as int64 (empty for no users)."""
    if not arrays:
        return np.empty(0, dtype=np.int64)
    return np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays])


def _starts(lengths: np.ndarray) -> np.ndarray:
    """Index of each user's first event in the flat arrays."""
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def check_aligned(train: Sequences | None, test: Sequences) -> None:
    """Raise ValueError unless `train` is None or holds the test users, by index, in the same vocabularies."""
    if train is None:
        return
    if len(train) != len(test):
        raise ValueError(f"train has {len(train)} users, test {len(test)}: users are aligned by index")
    if (train.n_items, train.n_categories) != (test.n_items, test.n_categories):
        raise ValueError("train and test use different vocabulary sizes")


# ---------------------------------------------------------------------------------------------
# Target rows and what a scorer may know at each of them


@dataclass(frozen=True)
class EvalTargets:
    """One row per (test user u, position t >= 1), user by user then position by position.

    user, position: the row's user and the index t of the event to predict in u's test sequence
    item, category: the item / category of event t (-1: not a target for that metric)
    purchase_label: 1 if u purchases at some test event j >= t with ts[j] <= ts[t-1] + horizon_ms
    now_ts:         ts[t-1], the time of the last observed event
    """

    user: np.ndarray
    position: np.ndarray
    item: np.ndarray
    category: np.ndarray
    purchase_label: np.ndarray
    now_ts: np.ndarray
    horizon_ms: int

    def __len__(self) -> int:
        return len(self.user)

    @property
    def item_rows(self) -> np.ndarray:
        """Indices of the rows that are item targets, in row order (the order of item_ranks)."""
        return np.flatnonzero(self.item >= 0)

    @property
    def category_rows(self) -> np.ndarray:
        """Indices of the rows that are category targets, in row order (the order of category_ranks)."""
        return np.flatnonzero(self.category >= 0)


def targets(test: Sequences, horizon_ms: int = PROPENSITY_HORIZON_MS) -> EvalTargets:
    """All target rows of `test`, with item / category targets and purchase labels (see the module doc)."""
    lengths = test.lengths()
    start = _starts(lengths)
    user_of_event = np.repeat(np.arange(len(test), dtype=np.int64), lengths)
    position = np.arange(int(lengths.sum()), dtype=np.int64) - start[user_of_event]
    items, cats, types, ts = (flat_concat(a) for a in (test.items, test.categories, test.types, test.ts))

    rows = np.flatnonzero(position >= 1)  # flat index of each predicted event t; t-1 is rows - 1
    now_ts = ts[rows - 1]
    # The first purchase at or after event t is the earliest one (ts is sorted): it decides the label.
    purchases = np.flatnonzero(types == PURCHASE)
    label = np.zeros(len(rows), dtype=bool)
    if len(purchases):
        k = np.searchsorted(purchases, rows, side="left")
        first = purchases[np.minimum(k, len(purchases) - 1)]
        same_user = user_of_event[first] == user_of_event[rows]
        label = (k < len(purchases)) & same_user & (ts[first] <= now_ts + horizon_ms)
    return EvalTargets(
        user=user_of_event[rows],
        position=position[rows],
        item=items[rows],
        category=cats[rows],
        purchase_label=label.astype(np.int8),
        now_ts=now_ts,
        horizon_ms=int(horizon_ms),
    )


@dataclass(frozen=True)
class PrefixState:
    """Per target row, simple statistics of the row's prefix (training events, then test events 0..t-1).

    last_item / last_category: the last value >= 0 in the prefix, -1 if the prefix has none
    n_events / n_purchases:    events and purchase events in the prefix
    recent_items:              (rows, RECENT_ITEMS) the items of the prefix's latest events, latest first
                               (-1: none): what the daemon's state keeps for the next-item bonuses
    """

    last_item: np.ndarray
    last_category: np.ndarray
    n_events: np.ndarray
    n_purchases: np.ndarray
    recent_items: np.ndarray


def prefix_state(train: Sequences | None, test: Sequences, rows: EvalTargets) -> PrefixState:
    """The prefix statistics of every row of `rows` (= targets(test)); train=None means no carried state."""
    check_aligned(train, test)
    n_train = train.lengths() if train is not None else np.zeros(len(test), dtype=np.int64)

    def joined(name: str) -> np.ndarray:  # per user: training events then test events, flat
        tests = getattr(test, name)
        if train is None:
            return flat_concat(tests)
        return flat_concat([np.concatenate([np.asarray(a), np.asarray(b)]) for a, b in zip(getattr(train, name), tests)])

    lengths = n_train + test.lengths()
    start = _starts(lengths)
    user = np.repeat(np.arange(len(test), dtype=np.int64), lengths)
    # Flat index of event t-1 of each row, the last event of its prefix.
    last = start[rows.user] + n_train[rows.user] + rows.position - 1

    purchases = np.concatenate([[0], np.cumsum(joined("types") == PURCHASE)])
    items = joined("items")
    return PrefixState(
        last_item=_last_known(items, user)[last],
        last_category=_last_known(joined("categories"), user)[last],
        n_events=last - start[rows.user] + 1,
        n_purchases=purchases[last + 1] - purchases[start[rows.user]],
        recent_items=latest_items(items, last, start[rows.user]),
    )


def _last_known(values: np.ndarray, user: np.ndarray) -> np.ndarray:
    """For each flat event: the last value >= 0 at or before it within the same user, else -1."""
    index = np.maximum.accumulate(np.where(values >= 0, np.arange(len(values)), -1))
    own = (index >= 0) & (user[np.maximum(index, 0)] == user)
    return np.where(own, values[np.maximum(index, 0)], -1)


# ---------------------------------------------------------------------------------------------
# Ranks and metrics


def ranks_from_scores(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(B,) rank of target[b] in row b of scores (B, n): 1 + candidates scoring strictly higher."""
    scores = np.asarray(scores)
    target_scores = scores[np.arange(len(target)), target]
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(target_scores).any():
        raise ValueError("a target's score is nan")
    return 1 + np.count_nonzero(scores > target_scores[:, None], axis=1).astype(np.int64)


def ranks_in_fixed_scores(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Ranks of `target` when every row shares the score vector `scores` (n,): no (B, n) matrix."""
    ordered = np.sort(scores)
    return 1 + len(scores) - np.searchsorted(ordered, scores[target], side="right").astype(np.int64)


def chunked_ranks(
    score_rows: Callable[[np.ndarray], np.ndarray],
    context: np.ndarray,
    target: np.ndarray,
    n_candidates: int,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> np.ndarray:
    """Ranks of target[i] among the scores score_rows(context[lo:hi])[i - lo].

    B = hi - lo rows at a time, with B * n_candidates <= chunk_elements (at least one row).
    """
    ranks = np.empty(len(target), dtype=np.int64)
    step = max(1, chunk_elements // max(n_candidates, 1))
    for lo in range(0, len(target), step):
        hi = lo + step
        ranks[lo:hi] = ranks_from_scores(score_rows(context[lo:hi]), target[lo:hi])
    return ranks


def recall_at(ranks: np.ndarray, k: int) -> float:
    """mean(rank <= k); nan for no ranks."""
    return float(np.mean(ranks <= k)) if len(ranks) else float("nan")


def mrr_at(ranks: np.ndarray, k: int) -> float:
    """mean(1/rank if rank <= k else 0); nan for no ranks."""
    if not len(ranks):
        return float("nan")
    return float(np.mean(np.where(ranks <= k, 1.0 / np.asarray(ranks, dtype=np.float64), 0.0)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > score of a random negative), ties counted half.

    Computed as the Mann-Whitney statistic: (sum of the positives' mid-ranks - P(P+1)/2) / (P N).
    nan when there are no positives or no negatives.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError("scores and labels differ in shape")
    if np.isnan(scores).any():
        raise ValueError("scores contain nan")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, group, size = np.unique(scores, return_inverse=True, return_counts=True)
    mid_rank = np.cumsum(size) - (size - 1) / 2.0  # 1-based average rank of each group of equal scores
    rank_sum = mid_rank[group][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ---------------------------------------------------------------------------------------------
# The scorer interface and the evaluation


@dataclass
class NextEventPredictions:
    """A scorer's answer on the rows of `targets(test)`, in row order.

    item_ranks:        (number of item target rows,) one rank per row with item >= 0
    category_ranks:    (number of category target rows,) one rank per row with category >= 0
    propensity:        (rows,) purchase-within-horizon score per row (only its order matters to AUC)
    propensity_labels: (rows,) 0/1, `targets(test).purchase_label`, returned as a check on the row order
    Ranks follow the module's rule; a scorer may report any value > k for a target outside its top k.
    """

    item_ranks: np.ndarray
    category_ranks: np.ndarray
    propensity: np.ndarray
    propensity_labels: np.ndarray


@runtime_checkable
class NextEventScorer(Protocol):
    name: str

    def fit(self, train: Sequences) -> None: ...

    def rank_next(
        self, train: Sequences | None, test: Sequences, k_items: int = 20, k_categories: int = 5
    ) -> NextEventPredictions: ...


def evaluate(
    scorer: NextEventScorer, train: Sequences | None, test: Sequences, k: int = 20, *, k_categories: int = 5
) -> dict:
    """Metrics of an already fitted scorer on `test` (see the module doc for the protocol).

    train: the state carried over into each test user's prefix (aligned by index), or None when the
    test users are new (session datasets such as YOOCHOOSE). The scorer is not fitted here.
    Returns {"recall@k", "mrr@k", "category_acc@k_categories", "propensity_auc",
    "item_targets" (rows with a known item), "skipped_item_targets" (rows whose item is -1),
    "category_targets", "propensity_positions"}. Raises ValueError if the scorer's answer does
    not match the rows of targets(test).
    """
    check_aligned(train, test)
    rows = targets(test)
    pred = scorer.rank_next(train, test, k_items=k, k_categories=k_categories)
    item_ranks, category_ranks = np.asarray(pred.item_ranks), np.asarray(pred.category_ranks)
    n_items, n_categories = len(rows.item_rows), len(rows.category_rows)

    if item_ranks.shape != (n_items,) or category_ranks.shape != (n_categories,):
        raise ValueError(
            f"{scorer.name}: {item_ranks.shape} item / {category_ranks.shape} category ranks "
            f"for {n_items} / {n_categories} targets"
        )
    if np.asarray(pred.propensity).shape != (len(rows),):
        raise ValueError(f"{scorer.name}: {np.shape(pred.propensity)} propensity scores for {len(rows)} rows")
    if not np.array_equal(np.asarray(pred.propensity_labels), rows.purchase_label):
        raise ValueError(f"{scorer.name}: propensity labels differ from targets(test): rows out of order?")
    if (item_ranks < 1).any() or (category_ranks < 1).any():
        raise ValueError(f"{scorer.name}: ranks start at 1")

    return {
        f"recall@{k}": recall_at(item_ranks, k),
        f"mrr@{k}": mrr_at(item_ranks, k),
        f"category_acc@{k_categories}": recall_at(category_ranks, k_categories),
        "propensity_auc": roc_auc(pred.propensity, rows.purchase_label),
        "item_targets": n_items,
        "skipped_item_targets": len(rows) - n_items,
        "category_targets": n_categories,
        "propensity_positions": len(rows),
    }
