"""`profiles evaluate-fields`: every learned profile field judged against what users do next.

Protocol (the same on any event log):
  1. cut at a time T (default: 80% of the log's span);
  2. replay the events before T through the serving path (decoder, state step, profile encoding) and
     take every user's published profile at T (the clock set to T, as an idle re-score would publish);
  3. judge each field on the user's events after T, with the horizons of the profile contract
     (stream/profiles.py), cut short where the log ends sooner (the report says so, and the
     probabilities are then asked for that shorter window);
  4. beside the strongest simple baselines, computed from the same events before T.
No profile or baseline sees an event after T.
"""

from __future__ import annotations

import numpy as np
import orjson
import torch

from models.dataset import HOUR_MS, EventLog, event_log, read_records, usable_events
from models.next_event_evaluation import roc_auc
from models.field_training import FutureIndex
from models.checkpoint_io import LoadedModel
from models.category_calibration import CATEGORY_TERMS
from models.stream_calibration import LogitMap, fisher_information, logistic, logistic_fit
from stream.events import ADD_TO_CART, PURCHASE, RecordBatch, iso_time
from stream.settings import Settings
from stream.profiles import CATEGORY_HORIZON_HOURS, CHURN_HORIZON_HOURS, PURCHASE_HORIZON_HOURS
from stream.sources import TimeRange, no_usable_events_among
from stream import statistics
from stream.anchor_samples import STATISTICS
from stream.outcomes import HEADS
from stream.statistics import ORDER_GAP_MS

DAY_MS = 24 * HOUR_MS
DECAY_MS = 7 * DAY_MS  # time scale of the decayed-count baselines
ECE_BINS = 10
BOOTSTRAP_RESAMPLES = 200


# The least future after a cut that evaluate_fields judges: the shortest window training draws (short_windows).
MIN_FUTURE_MS = 5 * 60_000


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-mass bins: the size-weighted mean |mean predicted - observed rate|."""
    if not len(p):
        return float("nan")
    order = np.argsort(p, kind="stable")
    err = 0.0
    for part in np.array_split(order, min(bins, len(p))):
        err += len(part) * abs(float(p[part].mean()) - float(y[part].mean()))
    return err / len(p)


def ece_if_calibrated(p: np.ndarray, draws: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The ECE that these probabilities would show if they were exact: outcomes drawn from them `draws` times,
    the mean ECE and its 95th percentile. On a few thousand users ECE is never near 0 (bins of 300 users at a
    rate near one half miss their own rate by 0.02 on average), so a reported ECE means miscalibration only as
    far as it stands above this floor."""
    if not len(p):
        return float("nan"), float("nan")
    order = np.argsort(p, kind="stable")
    parts = np.array_split(order, min(ECE_BINS, len(p)))
    starts = np.cumsum([0] + [len(b) for b in parts[:-1]])
    sizes = np.array([len(b) for b in parts], dtype=float)
    sorted_p = p[order]
    mean_p = np.add.reduceat(sorted_p, starts) / sizes
    # One bin at a time keeps the memory at draws x the largest bin, whatever the number of users.
    rng, err = np.random.default_rng(seed), np.zeros(draws)
    for start, size, m in zip(starts, sizes.astype(int), mean_p):
        drawn = rng.random((draws, size)) < sorted_p[start:start + size]
        err += size * np.abs(drawn.mean(axis=1) - m)
    err /= len(p)
    return float(err.mean()), float(np.quantile(err, 0.95))


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[tuple[float, float, int]]:
    """(mean predicted, observed rate, size) per equal-mass bin."""
    order = np.argsort(p, kind="stable")
    return [(float(p[b].mean()), float(y[b].mean()), len(b)) for b in np.array_split(order, min(bins, len(p)))
            if len(b)]


def average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    """PR AUC as average precision, tied scores taken as one threshold (a constant score earns the base rate)."""
    if y.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], y[order]
    last_of_group = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(hits)[last_of_group]
    seen = np.flatnonzero(last_of_group) + 1
    recall_step = np.diff(np.r_[0, tp]) / hits.sum()
    return float((recall_step * tp / seen).sum())


def binary_metrics(scores: np.ndarray, y: np.ndarray, probability: bool) -> dict[str, float]:
    out = {"roc_auc": roc_auc(scores, y), "pr_auc": average_precision(scores, y)}
    if probability:
        out["brier"] = float(np.mean((scores - y) ** 2))
        out["ece"] = expected_calibration_error(scores, y)
        out["ece_if_calibrated"], out["ece_if_calibrated_95"] = ece_if_calibrated(scores)
        # Calibration in the large: the mean probability beside the observed rate (positives / users).
        out["mean_probability"] = float(np.mean(scores)) if len(scores) else float("nan")
        out["calibration_intercept"], out["calibration_slope"], out["calibration_slope_se"] = \
            calibration_line(scores, y)
    return out


def calibration_line(p: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, b, standard error of b) of the logistic fit of the outcomes on the probabilities' logit,
    y ~ sigmoid(a + b logit(p)): the calibration slope b is 1 for exact probabilities, below 1 where they spread too
    far from the middle (too sure of themselves), above 1 where they huddle too close to it. ECE says how far off
    the probabilities are, the slope which way; where the slope is near 1 and the mean probability is not the
    observed rate, the level alone is off. NaN where the outcomes are all one class or every probability is the
    same (nothing to fit)."""
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    z = np.log(q / (1 - q))
    if not len(p) or y.min() == y.max() or z.std() < 1e-6:  # (every probability the same: no slope to speak of)
        return float("nan"), float("nan"), float("nan")
    design = np.column_stack([np.ones(len(q)), z])
    yes = np.asarray(y, dtype=np.float64)
    a, b = logistic_fit(design, yes, 1 - yes, steps=50)
    variance = np.linalg.pinv(fisher_information(design, logistic(design @ np.array([a, b]))))[1, 1]
    return float(a), float(b), float(np.sqrt(variance)) if variance > 0 else float("nan")


def category_scores(predicted: list[list[str]], future: list[dict[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per user with a categorised future: precision@3 against the categories engaged with after T, and
    whether the top 3 holds the most engaged one."""
    precision, hit = [], []
    for top, fut in zip(predicted, future):
        if not fut:
            continue
        top = top[:3]
        precision.append(len(set(top) & set(fut)) / min(3, len(fut)))
        best = max(fut.items(), key=lambda kv: (kv[1], kv[0]))[0]
        hit.append(best in top)
    return np.asarray(precision, dtype=np.float64), np.asarray(hit, dtype=np.float64)


def category_metrics(predicted: list[list[str]], future: list[dict[str, int]]) -> dict[str, float]:
    precision, hit = category_scores(predicted, future)
    return {"precision@3": float(precision.mean()) if len(precision) else float("nan"),
            "top_future_hit_rate": float(hit.mean()) if len(hit) else float("nan"), "users": len(precision)}


def paired_interval(model: np.ndarray, baseline: np.ndarray, metric=None, y: np.ndarray | None = None,
                    resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> list[float]:
    """95% interval of metric(model) - metric(baseline) over users resampled with replacement, the same
    users for both (a paired bootstrap): whether a difference is more than the luck of who was sampled.
    With metric and y: metric(scores, y), a ranking metric of per-user scores; without: the difference of
    the mean of per-user values (e.g. each user's precision@3)."""
    rng = np.random.default_rng(seed)
    n = len(model)
    if n < 2:
        return [float("nan"), float("nan")]
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        if y is None:
            diffs.append(float(model[i].mean() - baseline[i].mean()))
        elif 0 < y[i].sum() < n:
            diffs.append(metric(model[i], y[i]) - metric(baseline[i], y[i]))
    if not diffs:
        return [float("nan"), float("nan")]
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return [float(lo), float(hi)]


def baseline_categories(hist: EventLog, cut: int) -> dict[str, list[list[str]]]:
    """Top 3 categories per user by all-time counts, by counts decayed over DECAY_MS, and the most
    recent distinct categories (last category first). Ties: the more recent category first."""
    ev = hist.events
    has = np.array([c is not None for c in ev.category], dtype=bool)
    user, cat, ts = hist.user_of_event[has], ev.category[has].astype(str), ev.ts[has]
    names, cat_idx = np.unique(cat, return_inverse=True) if len(cat) else (np.empty(0, str), np.empty(0, int))
    pair_key = user.astype(np.int64) * max(len(names), 1) + cat_idx
    keys, inverse = np.unique(pair_key, return_inverse=True)
    count = np.bincount(inverse)
    decayed = np.bincount(inverse, weights=np.exp(-(cut - ts) / DECAY_MS))
    latest = np.full(len(keys), -1, dtype=np.int64)
    np.maximum.at(latest, inverse, ts)
    k_user, k_cat = keys // max(len(names), 1), keys % max(len(names), 1)
    out = {}
    for name, score in (("all-time counts", count.astype(float)), ("decayed counts", decayed),
                        ("most recent categories", latest.astype(float))):
        order = np.lexsort((-latest, -score, k_user))
        users, cats = k_user[order], k_cat[order]
        keep = np.arange(len(users)) - np.searchsorted(users, users) < 3  # each user's best 3
        users, cats = users[keep], cats[keep]
        out[name] = [names[c].tolist() for c in np.split(cats, np.searchsorted(users, np.arange(1, len(hist.users))))]
    return out


def baseline_scores(hist: EventLog, cut: int) -> dict[str, dict[str, np.ndarray]]:
    """Per-user scores of the simple rules (higher = more likely), for purchase and churn."""
    ev, u, n = hist.events, hist.user_of_event, len(hist.users)
    purchase, cart = ev.type_idx == PURCHASE, ev.type_idx == ADD_TO_CART
    events = np.bincount(u, minlength=n).astype(float)
    purchases = np.bincount(u, weights=purchase, minlength=n)
    recent = ev.ts > cut - 7 * DAY_MS
    recent_purchases = np.bincount(u, weights=purchase & recent, minlength=n)
    last_purchase = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last_purchase, u[purchase], ev.ts[purchase])
    carts_after = cart & (ev.ts > last_purchase[u])
    pending = np.bincount(u, weights=carts_after, minlength=n)
    last_ts = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last_ts, u, ev.ts)
    idle_days = (cut - last_ts) / DAY_MS
    recent_events = np.bincount(u, weights=recent, minlength=n)
    due = order_due(u[purchase], ev.ts[purchase], n, cut)
    # Tie-breaks by a second, weaker signal (scaled far below one unit of the first).
    return {
        "purchase": {"purchase share": purchases / np.maximum(events, 1),
                     "recent purchases (7 days)": recent_purchases + 1e-3 * purchases / (1 + purchases),
                     "carts not bought": pending + 1e-3 * np.exp(-idle_days),
                     "order due (own rhythm)": due + 1e-3 * purchases / (1 + purchases)},
        "churn": {"days idle": idle_days,
                  "recent activity (7 days, fewer = churn)": -recent_events - 1e-3 * np.exp(-idle_days)},
    }


def order_due(user: np.ndarray, ts: np.ndarray, n: int, cut: int) -> np.ndarray:
    """(n,) how due each user's next order is at `cut` by their own rhythm, the replenishment rule: the state's
    order_due score (stream/statistics.py) read from the plain mean of the log gaps between the user's orders
    (purchases more than ORDER_GAP_MS apart) instead of the state's exponential average. Users with fewer than two
    orders score 0; those who never bought rank below those who did by the tie-break of baseline_scores."""
    order = np.lexsort((ts, user))
    user, ts = user[order], ts[order]
    gap = np.diff(ts, prepend=ts[:1])
    new_order = np.r_[False, user[1:] == user[:-1]] & (gap > ORDER_GAP_MS)
    gaps = np.bincount(user[new_order], minlength=n)
    usual = np.bincount(user[new_order], weights=np.log1p(gap[new_order] / HOUR_MS), minlength=n) / np.maximum(gaps, 1)
    last = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last, user, ts)
    since = np.log1p(np.maximum(cut - last, 0) / HOUR_MS)
    return statistics.order_due(since - usual, gaps)


DEFAULT_CUT_SHARE = 0.8  # the cut where none is given: this share of the log's span
SPREAD_CUT_SHARES = (0.5, 0.9)  # `--cuts N`: N cuts evenly from the first share of the span to the second


def evaluate_fields(loaded: LoadedModel, files: list[str], device: torch.device, cut: int | None = None,
                    batch_records: int = 20_000, progress=None, share: float = DEFAULT_CUT_SHARE,
                    records: RecordBatch | None = None, stream_calibration: bool = True, *,
                    max_ahead_ms: int = Settings.max_ahead_ms) -> dict:
    """The report of `profiles evaluate-fields` (see the module docstring); without a cut, at `share` of the
    log's span. `records`: the files' records, where the caller read them already (once for several cuts).
    stream_calibration: the probabilities as a daemon publishes them, calibrated on the shop's outcomes before
    the cut (models/stream_calibration.py), or as the model says them. max_ahead_ms: the command's --max-ahead
    (usable_events)."""
    records = read_records(files) if records is None else records
    events, dead = usable_events(records, 1 << 30, max_ahead_ms=max_ahead_ms)
    if len(events) < 2:
        raise ValueError(no_usable_events_among(files, dead))
    first, last = int(events.ts.min()), int(events.ts.max())
    if first == last:  # no cut has a before and an after (the default one would be said to lie outside the log)
        raise ValueError(f"every event of {', '.join(map(str, files))} is at {iso_time(first)}: profiles are judged on "
                         "what users do after a cut, and this log has no later events")
    cut = int(first + share * (last - first)) if cut is None else int(cut)
    if not first < cut < last:
        raise ValueError(f"the cut {iso_time(cut)} is not inside the log ({iso_time(first)} .. {iso_time(last)})")
    if last - cut < MIN_FUTURE_MS:  # a verdict over seconds of future says nothing (a log spanning 1 s: "ahead")
        raise ValueError(f"the log runs only {(last - cut) / 1000:,.1f} s past the cut {iso_time(cut)}: profiles are "
                         f"judged on what users do after it, and at least {MIN_FUTURE_MS // 60_000} minutes of it "
                         f"are needed (a longer log, or an earlier --cut)")

    windows = {"category": min(CATEGORY_HORIZON_HOURS, (last - cut) / HOUR_MS),
               "purchase": min(PURCHASE_HORIZON_HOURS, (last - cut) / HOUR_MS),
               "churn": min(CHURN_HORIZON_HOURS, (last - cut) / HOUR_MS)}
    profiles, shop_map = profiles_at(loaded, records, device, cut, (windows["purchase"], windows["churn"]),
                                     batch_records, progress, stream_calibration)

    # 2. History (before T) and future (after T) of the same users, from the decoded events.
    log_ = event_log(events, len(dead))
    before = log_.events.ts <= cut
    hist = log_.subset_users(np.bincount(log_.user_of_event[before], minlength=len(log_.users)) > 0)
    keep_hist = hist.events.ts <= cut
    future_ev = hist.events.take(np.flatnonzero(~keep_hist))
    future_user = hist.user_of_event[~keep_hist]
    hist_before = event_log(hist.events.take(np.flatnonzero(keep_hist)))
    assert (hist_before.users == hist.users).all()
    users = hist.users.astype(str)
    n = len(users)

    # The labels as training reads them (models/field_training.FutureIndex): one definition of each field.
    cfg = loaded.model.config
    future = FutureIndex(hist, cfg.hash_seed)
    everyone = np.arange(n)
    bought = future.any_within(everyone, cut, cut + int(windows["purchase"] * HOUR_MS), purchases=True).astype(np.int64)
    silent = (~future.any_within(everyone, cut, cut + int(windows["churn"] * HOUR_MS))).astype(np.int64)
    future_cats: list[dict[str, int]] = [{} for _ in range(n)]
    cat_mask = (future_ev.ts <= cut + windows["category"] * HOUR_MS)
    for u, c in zip(future_user[cat_mask].tolist(), future_ev.category[cat_mask].tolist()):
        if c is not None:
            future_cats[u][c] = future_cats[u].get(c, 0) + 1

    missing = [u for u in users if u not in profiles]
    if missing:
        raise RuntimeError(f"{len(missing)} users have events before the cut but no profile, e.g. {missing[0]!r}")
    prof = [profiles[u] for u in users]
    model_top = [[c["category"] for c in p["top_categories"]] for p in prof]
    propensity = np.array([p["purchase_propensity"] for p in prof], dtype=np.float64)
    churn = np.array([p["churn_risk"] for p in prof], dtype=np.float64)

    fields = {
        "top_categories": {"model": category_metrics(model_top, future_cats), "baselines": {}},
        "purchase_propensity": {"model": binary_metrics(propensity, bought, True),
                                "positives": int(bought.sum()), "users": n, "baselines": {}},
        "churn_risk": {"model": binary_metrics(churn, silent, True),
                       "positives": int(silent.sum()), "users": n, "baselines": {}},
    }
    # Model minus the best baseline, with a paired-bootstrap interval: on a small log a gap of 0.02 can
    # be the luck of which users were sampled, and a team deciding to trust a field needs to know which.
    category_baselines = baseline_categories(hist_before, cut)
    for name, top in category_baselines.items():
        fields["top_categories"]["baselines"][name] = category_metrics(top, future_cats)
    best, _ = best_baseline(fields["top_categories"], "precision@3")
    model_p3, _ = category_scores(model_top, future_cats)
    base_p3, _ = category_scores(category_baselines[best], future_cats)
    fields["top_categories"]["versus_best"] = {
        "baseline": best, "metric": "precision@3",
        "difference": float(model_p3.mean() - base_p3.mean()) if len(model_p3) else float("nan"),
        "interval95": paired_interval(model_p3, base_p3)}
    scores = baseline_scores(hist_before, cut)
    for field, key, truth, model_score in (("purchase_propensity", "purchase", bought, propensity),
                                           ("churn_risk", "churn", silent, churn)):
        for name, score in scores[key].items():
            fields[field]["baselines"][name] = binary_metrics(score, truth, False)
        best, best_auc = best_baseline(fields[field], "roc_auc")
        fields[field]["versus_best"] = {
            "baseline": best, "metric": "roc_auc", "difference": fields[field]["model"]["roc_auc"] - best_auc,
            "interval95": paired_interval(model_score, scores[key][best], roc_auc, truth)}
    return {
        "model": loaded.version, "trained": loaded.trained, "events": int(len(events)), "users": n,
        "first": iso_time(first), "cut": iso_time(cut), "last": iso_time(last),
        "horizons_hours": {"category": CATEGORY_HORIZON_HOURS, "purchase": PURCHASE_HORIZON_HOURS,
                           "churn": CHURN_HORIZON_HOURS},
        "windows_hours": {k: round(v, 3) for k, v in windows.items()},
        "stream_calibration": stream_map_report(shop_map),
        "windows_cut_short": any(windows[k] < h for k, h in (("category", CATEGORY_HORIZON_HOURS),
                                                             ("purchase", PURCHASE_HORIZON_HOURS),
                                                             ("churn", CHURN_HORIZON_HOURS))),
        "fields": fields,
        "reliability": {"purchase_propensity": reliability(propensity, bought),
                        "churn_risk": reliability(churn, silent)},
    }


def profiles_at(loaded: LoadedModel, records, device: torch.device, cut: int,
                horizons_hours: tuple[float, float] | None = None, batch_records: int = 20_000,
                progress=None, stream_calibration: bool = True) -> tuple[dict[str, dict], LogitMap | None]:
    """Every user's profile at the clock `cut`, through the serving path (the replay's: decoder, state
    step, profile encoding) over the records' events at or before the cut; the later ones are never applied.
    Also the stream's calibration map they were published with (None: turned off)."""
    from models.update_step import ProfileUpdater

    # Duplicates are skipped as the daemon skips them (its default window), so the profiles judged are the
    # ones it would publish.
    updater = ProfileUpdater(loaded, device, max_event_bytes=1 << 30, emit_embedding=False,
                             dedupe_window=Settings.dedupe_window, stream_calibration=stream_calibration)
    before_cut = TimeRange(None, cut + 1)
    for a in range(0, len(records), batch_records):
        updater.process(records.slice(a, a + batch_records), before_cut, profiles=False)
        if progress:
            progress(min(a + batch_records, len(records)), len(records))
    state = updater.state
    state.max_event_ts = cut  # the clock at T, as an idle re-score at T would publish
    profiles = {}
    rows = np.arange(len(state))
    for a in range(0, len(rows), 50_000):
        for _, value in updater.profiles_for(rows[a:a + 50_000], horizons_hours):
            p = orjson.loads(value)
            profiles[p["user_id"]] = p
    return profiles, updater.calibration.shop_map() if updater.calibration is not None else None


def stream_map_report(shop_map: LogitMap | None) -> dict | None:
    """What the stream's calibration did to each probability at the cut: its map, fitted on how many users, and
    whether it was applied (kept; over a window cut short, carried over by the model's own hazards)."""
    if shop_map is None:
        return None
    return {name: {"users": shop_map.users[head], "a": shop_map.a[head], "b": shop_map.b[head],
                   "gain_nats": shop_map.gain_nats[head], "kept": shop_map.kept[head], "drift": shop_map.drift[head],
                   "weights": None if shop_map.weights[head] is None else dict(zip(STATISTICS[head],
                                                                                   shop_map.weights[head])),
                   "weights_gain_nats": shop_map.weights_gain_nats[head], "sampled": shop_map.sampled[head],
                   "weights_held_out_nats": shop_map.weights_held_out_nats[head],
                   "fitted_on_week": head == HEADS.index("churn_risk") and shop_map.churn_from_week,
                   "fitted_on_table_start": head == HEADS.index("purchase_propensity")
                   and shop_map.purchase_from_table_start,
                   "idle_reach_log_minutes": shop_map.idle_reach[head],
                   "share_power": shop_map.churn_share_power if head == HEADS.index("churn_risk") else 1.0,
                   "idle_bend": None if head != HEADS.index("churn_risk") or shop_map.idle_weights is None else {
                       "knots_log_idle_minutes": list(shop_map.idle_knots), "weights": list(shop_map.idle_weights)},
                   "idle_bend_held_out_nats": shop_map.idle_held_out_nats if head == HEADS.index("churn_risk")
                   else None,
                   "rate_volatility": shop_map.rate_volatility, "level_shift": shop_map.level_shift[head],
                   "applied": shop_map.applies(head)}
            for head, name in enumerate(HEADS)} | {"top_categories": {
                "users": shop_map.category_users, "gain": shop_map.category_gain,
                "gain_standard_error": shop_map.category_gain_se, "steady_gain": shop_map.category_steady_gain,
                "steady_gain_standard_error": shop_map.category_steady_gain_se,
                "cross_validated_gain": shop_map.category_cross_gain,
                "cross_validated_gain_standard_error": shop_map.category_cross_gain_se, "applied": shop_map.reranks(),
                "weights": None if shop_map.category_weights is None else dict(zip(CATEGORY_TERMS,
                                                                                   shop_map.category_weights))}}


# The published fields a report judges, in the order it shows them; the two that are probabilities.
PROBABILITY_FIELDS = ("purchase_propensity", "churn_risk")
JUDGED_FIELDS = ("top_categories", *PROBABILITY_FIELDS)


def summarise_cuts(reports: list[dict]) -> dict:
    """What several cuts' reports say together, per field: each cut's model-minus-best-rule difference, their
    mean, and at how many cuts the model was ahead, behind, or within the noise (its 95% interval holds 0).
    On a short log one cut can mislead: the same model's gap to a rule moves by 0.05 from one cut to the next
    on the REES46 slice (docs/model-journal.md, session 30)."""
    out = {}
    for field in JUDGED_FIELDS:
        gaps = [r["fields"][field]["versus_best"] for r in reports]
        differences = [float(g["difference"]) for g in gaps]
        # A cut with nothing to rank (no user judged, or one outcome only) has no interval: left out of the mean.
        known = [d for d, g in zip(differences, gaps) if not np.isnan([d, *g["interval95"]]).any()]
        out[field] = {
            "metric": gaps[0]["metric"], "differences": differences, "baselines": [g["baseline"] for g in gaps],
            "mean_difference": float(np.mean(known)) if known else float("nan"),
            "ahead": sum(g["interval95"][0] > 0 for g in gaps), "behind": sum(g["interval95"][1] < 0 for g in gaps),
            "within_noise": sum(g["interval95"][0] <= 0 <= g["interval95"][1] for g in gaps),
        }
    return {"cuts": [r["cut"] for r in reports], "fields": out, "calibration": calibration_over_cuts(reports)}


def calibration_over_cuts(reports: list[dict]) -> dict:
    """Per probability: its ECE at each cut, their mean beside the mean ECE that exact probabilities would show on
    the same users, and at how many cuts the ECE was above that floor's 95th percentile (more than sampling alone
    explains). One cut's ECE is a rough figure: on 3,000 users of shop 0 the shipped demo's churn_risk showed
    0.020 to 0.043 at cuts a few days apart (docs/model-journal.md, session 50)."""
    out = {}
    for field in PROBABILITY_FIELDS:
        models = [r["fields"][field].get("model", {}) for r in reports]
        ece, floor, high, slope = (np.array([m.get(k, np.nan) for m in models], dtype=np.float64)
                                   for k in ("ece", "ece_if_calibrated", "ece_if_calibrated_95", "calibration_slope"))
        known = ~np.isnan(ece + floor + high)  # a cut with one outcome only has no ECE
        sloped = ~np.isnan(slope)  # (reports of an older release have none)
        out[field] = {"ece": ece.tolist(),
                      "mean_ece": float(ece[known].mean()) if known.any() else float("nan"),
                      "mean_ece_if_calibrated": float(floor[known].mean()) if known.any() else float("nan"),
                      "beyond_sampling": int((ece[known] > high[known]).sum()), "judged": int(known.sum()),
                      "calibration_slopes": slope.tolist(),
                      "median_calibration_slope": float(np.median(slope[sloped])) if sloped.any() else float("nan")}
    return out


def best_baseline(field: dict, metric: str) -> tuple[str, float]:
    name, m = max(field["baselines"].items(), key=lambda kv: (np.nan_to_num(kv[1][metric], nan=-1.0)))
    return name, m[metric]
