"""The profile contract: what the output topic carries, one JSON object per user, encoded column-wise.

The fields are defined once, in docs/contracts.md ("Profile"). The profile's clock is the event
time it was computed at: the largest event time the instance has seen. The horizons below are the
one definition of the learned fields' horizons: training targets (models/field_training.py), the
evaluation against the future (`profiles evaluate-fields`) and docs/contracts.md read them from here.
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
    expired: bool = False  # the users' last profiles before their state expires (--state-ttl)


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
    if cols.expired:
        for profile in profiles:
            profile["expired"] = True
    dumps, opt = orjson.dumps, orjson.OPT_SERIALIZE_NUMPY
    return [(user.encode(), dumps(profile, option=opt)) for user, profile in zip(cols.user_ids, profiles)]
