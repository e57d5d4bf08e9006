"""encode_profiles writes, byte for byte, what orjson writes for each profile's dict (the encoder before it
was made column-wise, kept here as the reference), whatever the ids, names and numbers hold."""

from __future__ import annotations

import numpy as np
import orjson
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream.generator import generate
from stream.profiles import ProfileColumns, encode_profiles
from tests.helpers import DEVICE, record_batch

FUZZ = {"deadline": None, "derandomize": True, "database": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


def reference_encoding(cols: ProfileColumns, model_version: str, updated_at_ms: int) -> list[tuple[bytes, bytes]]:
    """One dict and one orjson call per profile: the definition the column-wise encoder must match."""
    n = len(cols.user_ids)
    counts = [{"search": a, "click": b, "add_to_cart": c, "purchase": d} for a, b, c, d in cols.counts.tolist()]
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
    return [(user.encode(), orjson.dumps(profile, option=orjson.OPT_SERIALIZE_NUMPY))
            for user, profile in zip(cols.user_ids, profiles)]


# Text that would cut a naive split: quotes, backslashes, the separators the encoder splits at, newlines.
tricky = st.sampled_from(['","', '\\', '"', '],[', ',{"user_id":', '\n', '\\"', '\u2028', '"}', 'é€😀', ''])
text = st.one_of(st.text(max_size=12), st.lists(tricky, max_size=4).map("".join))
floats32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-7, 5e-06, 1e16]))


@st.composite
def profile_columns(draw) -> ProfileColumns:
    n = draw(st.integers(1, 12))
    k = draw(st.integers(0, 4))
    dim = draw(st.integers(0, 6))
    names = draw(st.lists(text, min_size=1, max_size=5))  # categories: a few distinct names, repeated
    return ProfileColumns(
        user_ids=draw(st.lists(text, min_size=n, max_size=n, unique=True)),
        last_event_ts=np.array(draw(st.lists(st.integers(-1, 2**62), min_size=n, max_size=n)), dtype=np.int64),
        counts=np.array(draw(st.lists(st.integers(0, 2**62), min_size=4 * n, max_size=4 * n)),
                        dtype=np.int64).reshape(n, 4),
        spend_micros=np.array(draw(st.lists(st.integers(0, 9 * 10**18), min_size=n, max_size=n)), dtype=np.int64),
        top_category_names=[[draw(st.sampled_from(names)) for _ in range(k)] for _ in range(n)],
        top_category_scores=[draw(st.lists(floats, min_size=k, max_size=k)) for _ in range(n)],
        purchase_propensity=np.array(draw(st.lists(floats32, min_size=n, max_size=n)), dtype=np.float32),
        churn_risk=np.array(draw(st.lists(floats32, min_size=n, max_size=n)), dtype=np.float32),
        price_tier=draw(st.lists(st.sampled_from(["budget", "mid", "premium", "luxury", "unknown"]),
                                 min_size=n, max_size=n)),
        interest_cluster=np.array(draw(st.lists(st.integers(0, 63), min_size=n, max_size=n)), dtype=np.int64),
        embedding=draw(st.none() | st.lists(floats32, min_size=n * dim, max_size=n * dim).map(
            lambda v: np.array(v, dtype=np.float32).reshape(n, dim))),
        next_items=draw(st.none() | st.lists(st.lists(text, max_size=3), min_size=n, max_size=n)),
        expired=draw(st.booleans()),
    )


@settings(max_examples=400, **FUZZ)
@given(cols=profile_columns(), model_version=text, updated_at_ms=st.integers(0, 2**62))
@example(cols=ProfileColumns(user_ids=['a","b', "c\\"], last_event_ts=np.array([1, 2]), counts=np.ones((2, 4), int),
                             spend_micros=np.array([1, 10**12]), top_category_names=[['x"],["y'], ["\n"]],
                             top_category_scores=[[0.5], [float("nan")]],
                             purchase_propensity=np.array([0.1, 1e-7], np.float32),
                             churn_risk=np.array([np.inf, 0.0], np.float32), price_tier=["mid", "unknown"],
                             interest_cluster=np.array([0, 3]), embedding=np.array([[0.1, -0.0], [1e-30, 3e38]],
                                                                                   np.float32),
                             next_items=[["i1", "],["], []], expired=True),
         model_version='m"1', updated_at_ms=1)
def test_the_column_wise_encoder_writes_what_one_orjson_call_per_profile_writes(cols, model_version, updated_at_ms):
    assert encode_profiles(cols, model_version, updated_at_ms) == reference_encoding(cols, model_version, updated_at_ms)


def test_a_real_batch_of_profiles_is_encoded_byte_for_byte_as_before(monkeypatch):
    """Columns as the update step makes them: the shipped model's heads over generated users."""
    import models.update_step as update_step
    from models.checkpoint_io import load_checkpoint

    on_device = torch.device(DEVICE)
    updater = update_step.ProfileUpdater(load_checkpoint("demo", on_device), on_device, max_event_bytes=65536,
                                         emit_embedding=True, next_items=5)
    values = [orjson.dumps(e) for e in generate(users=300, events=3000, seed=4).events]
    updater.process(record_batch(values, topic="t", keys=None), profiles=False)
    captured: list[tuple] = []
    monkeypatch.setattr(update_step, "encode_profiles", lambda *args: captured.append(args) or encode_profiles(*args))
    encoded = updater.profiles_for(np.arange(len(updater.state)))
    ((cols, model_version, updated_at),) = captured
    assert len(encoded) == 300 and cols.next_items is not None and cols.embedding is not None
    assert encoded == reference_encoding(cols, model_version, updated_at)
