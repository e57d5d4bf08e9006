"""The profile contract: what the output topic carries, one JSON object per user.

  user_id              string (integer ids as their decimal string)
  model_version        the checkpoint's version ("untrained-..." without one)
  updated_at           epoch ms (wall clock) when this profile was computed
  last_event_ts        epoch ms of the user's latest event
  counts               {"search": n, "click": n, "add_to_cart": n, "purchase": n}, exact
  spend                sum of price x quantity over purchases, exact to 1e-6
  top_categories       [{"category": str, "score": float}, ...] best first, up to 3: the categories the
                       user is most likely to engage with in the next CATEGORY_HORIZON (7 days) from
                       the profile's clock; score = P(the user's next categorised event there)
  purchase_propensity  0..1, P(at least one purchase within PURCHASE_HORIZON (7 days) of the clock)
  churn_risk           0..1, P(no event at all within CHURN_HORIZON (14 days) of the clock)
  price_tier           budget | mid | premium | luxury | unknown
  interest_cluster     int, nearest k-means centroid of the user embedding
  next_items           item ids the user most likely engages with next, best first (only with --next-items)
  embedding            list of floats (the user's state: GRU hidden state + memory), unless disabled

The profile's clock is the event time it was computed at: the largest event time the instance
has seen (so an idle re-score moves purchase_propensity and churn_risk with the user's idle time).
The horizons below are the one definition of these fields: training targets (models/field_training.py),
the evaluation against the future (`profiles evaluate-fields`) and docs/contracts.md read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

CATEGORY_HORIZON_HOURS = 7 * 24.0
PURCHASE_HORIZON_HOURS = 7 * 24.0
CHURN_HORIZON_HOURS = 14 * 24.0


@dataclass
class ProfileColumns:
    """Everything needed to write the profiles of U users, as columns."""

    user_ids: list[str]
    last_event_ts: np.ndarray  # (U,) int64
    counts: np.ndarray  # (U, 4) int64
    spend_micros: np.ndarray  # (U,) int64
    top_category_names: list[list[str]]  # per user, best first
    top_category_scores: list[list[float]]  # per user, aligned with the names, rounded
    purchase_propensity: np.ndarray  # (U,) float
    churn_risk: np.ndarray  # (U,) float
    price_tier: list[str]
    interest_cluster: np.ndarray  # (U,) int
    embedding: np.ndarray | None  # (U, S) float32 (GRU hidden state + memory), or None when disabled
    next_items: list[list[str]] | None = None  # per user, most likely next items first; None when disabled


def encode_profiles(cols: ProfileColumns, model_version: str, updated_at_ms: int) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) per user, ready to produce.

    Built column-wise: each nested part (counts, top categories) is made for all users in one
    comprehension, then the profiles in one more; orjson writes numpy embedding rows directly.
    """
    n = len(cols.user_ids)
    counts = [{"search": a, "click": b, "add_to_cart": c, "purchase": d} for a, b, c, d in cols.counts.tolist()]
    # Slot j of every user's top categories, then per user a tuple of its slots (orjson writes a JSON array).
    slots = [[{"category": c, "score": s} for c, s in zip(names, scores)]
             for names, scores in zip(zip(*cols.top_category_names), zip(*cols.top_category_scores))]
    top = list(zip(*slots)) if slots else [()] * n
    profiles = [
        {"user_id": user, "model_version": model_version, "updated_at": updated_at_ms, "last_event_ts": last_ts,
         "counts": count, "spend": spend, "top_categories": top_k, "purchase_propensity": propensity,
         "churn_risk": churn, "price_tier": tier, "interest_cluster": cluster}
        for user, last_ts, count, spend, top_k, propensity, churn, tier, cluster in zip(
            cols.user_ids, cols.last_event_ts.tolist(), counts, (cols.spend_micros / 1e6).tolist(), top,
            np.round(cols.purchase_propensity.astype(np.float64), 6).tolist(),
            np.round(cols.churn_risk.astype(np.float64), 6).tolist(), cols.price_tier,
            cols.interest_cluster.tolist())
    ]
    if cols.next_items is not None:
        for profile, items in zip(profiles, cols.next_items):
            profile["next_items"] = items
    if cols.embedding is not None:
        for profile, row in zip(profiles, cols.embedding):
            profile["embedding"] = row
    dumps, opt = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    return [(user.encode(), dumps(profile, option=opt)) for user, profile in zip(cols.user_ids, profiles)]
