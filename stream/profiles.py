"""The profile contract: what the output topic carries, one JSON object per user.

  user_id              string (integer ids as their decimal string)
  model_version        the checkpoint's version ("untrained-..." without one)
  updated_at           epoch ms (wall clock) when this profile was computed
  last_event_ts        epoch ms of the user's latest event
  counts               {"search": n, "click": n, "add_to_cart": n, "purchase": n}, exact
  spend                sum of price x quantity over purchases, exact to 1e-6
  top_categories       [{"category": str, "score": float}, ...] best first, up to 3
  purchase_propensity  0..1, P(purchase within the model's horizon)
  churn_risk           0..1, P(no activity within the model's horizon)
  price_tier           budget | mid | premium | luxury | unknown
  interest_cluster     int, nearest k-means centroid of the user embedding
  next_items           item ids the user most likely engages with next, best first (only with --next-items)
  embedding            list of floats (the user's hidden state), unless disabled
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from stream.events import EVENT_TYPES


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
    embedding: np.ndarray | None  # (U, H) float32, or None when disabled
    next_items: list[list[str]] | None = None  # per user, most likely next items first; None when disabled


def encode_profiles(cols: ProfileColumns, model_version: str, updated_at_ms: int) -> list[tuple[bytes, bytes]]:
    """(key, JSON value) per user, ready to produce."""
    counts = cols.counts.tolist()
    spend = (cols.spend_micros / 1e6).tolist()
    last_ts = cols.last_event_ts.tolist()
    propensity = np.round(cols.purchase_propensity.astype(np.float64), 6).tolist()
    churn = np.round(cols.churn_risk.astype(np.float64), 6).tolist()
    cluster = cols.interest_cluster.tolist()
    dumps = orjson.dumps
    opt = orjson.OPT_SERIALIZE_NUMPY
    out = []
    for i, user in enumerate(cols.user_ids):
        profile = {
            "user_id": user,
            "model_version": model_version,
            "updated_at": updated_at_ms,
            "last_event_ts": last_ts[i],
            "counts": dict(zip(EVENT_TYPES, counts[i])),
            "spend": spend[i],
            "top_categories": [{"category": c, "score": s}
                               for c, s in zip(cols.top_category_names[i], cols.top_category_scores[i])],
            "purchase_propensity": propensity[i],
            "churn_risk": churn[i],
            "price_tier": cols.price_tier[i],
            "interest_cluster": cluster[i],
        }
        if cols.next_items is not None:
            profile["next_items"] = cols.next_items[i]
        if cols.embedding is not None:
            profile["embedding"] = cols.embedding[i]
        out.append((user.encode(), dumps(profile, option=opt)))
    return out
