"""`profiles model info CHECKPOINT`: what a checkpoint holds, without writing code."""

from __future__ import annotations

from dataclasses import asdict

from models.checkpoint_io import CHECKPOINT_FORMAT, checkpoint_path, load_checkpoint
from models.field_heads import HABIT_COUNT, HABIT_FRESHNESS
from stream.changelog_records import STATE_DTYPE_NAMES
from stream.events import iso_time
from stream.settings import Settings
from stream.statistics import stat_bytes_per_user


def checkpoint_info(path: str) -> dict:
    """Version, sizes, vocabularies and training metadata of a checkpoint, as plain data."""
    loaded = load_checkpoint(path, "cpu")
    config = loaded.model.config
    meta = loaded.metadata
    report = meta.get("report", {})
    fields = loaded.model.fields
    probability_heads = (("purchase_propensity", fields.purchase), ("churn_risk", fields.event))
    return {
        "path": str(checkpoint_path(path)),
        "model_version": loaded.version,
        "state_version": loaded.state_version,  # differs for a model calibrated again (`profiles calibrate`)
        "calibrations": [{**{k: c.get(k) for k in ("from", "events", "until", "created_at")},
                          "moved": calibration_moves(c)} for c in meta.get("calibrations", [])],
        # Weights set by hand where the training shop could not teach them (the shipped demo's, docs/model.md).
        "priors": [p.get("what", "") for p in meta.get("priors", [])],
        "format": loaded.format,
        "transitions": {name: {"pairs": len(loaded.model.transitions(name).cols),
                               "weight": float(loaded.model.transition_weight[i])}
                        for i, name in enumerate(("item", "category"))},
        "neighbours": {"sessions": len(loaded.model.neighbours().session_size),
                       "weight": float(loaded.model.neighbour_weight[0])},
        # Per probability field, the scale (in the shop's typical in-visit gaps) over which its session process
        # fades with idle time, or None where it does not (checkpoints before format 13, or not earned in training).
        "pace_decay": {name: float(head.log_step_scale.detach().exp()) if bool(head.idle_decay) else None
                       for name, head in probability_heads},
        # ... and the power its odds fall by, (1 + gaps / scale) ** -power; None where they fall exponentially,
        # exp(-gaps / scale) (format 13).
        "pace_fade_power": {name: float(head.log_fade_power.detach().exp())
                            if bool(head.idle_decay) and bool(head.power_fade) else None
                            for name, head in probability_heads},
        # Per probability field, the power its return hazard falls by after a long silence, (1 + idle / days) **
        # -power, and the days; None where it does not (checkpoints before format 15, purchase_propensity).
        "silence": {name: {"power": float(head.silence_power), "days": float(head.silence_minutes) / 1440}
                    if float(head.silence_power) > 0 else None for name, head in probability_heads},
        # top_categories' lean toward the freshest categories (stream/habit.py): the weight every model reads, and the
        # lean of the shop the heads were fitted in (a serving shop's lean beyond it reads the weight); the same for
        # the lean toward the categories the user engaged with most (their log count).
        "habit": {"weight": float(fields.repeat_score.weight.detach()[0, HABIT_FRESHNESS]),
                  "lean_trained": float(fields.habit_lean_trained),
                  "counts_weight": float(fields.repeat_score.weight.detach()[0, HABIT_COUNT]),
                  "counts_lean_trained": float(fields.habit_counts_lean_trained)},
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "state_floats_per_user": config.state_size,
        # What a user's state costs beside the counters and exactly-once bookkeeping: the model state as the
        # default --state-dtype stores it, and the behaviour statistics the heads read.
        "state_bytes_per_user": {"model_state": config.state_size * STATE_DTYPE_NAMES[Settings.state_dtype].itemsize,
                                 "model_state_dtype": Settings.state_dtype, "statistics": stat_bytes_per_user()},
        "next_item_vocabulary": len(loaded.item_vocab),
        # The training log's items (models/catalogue.py): others are read as unknown; None: every item is read as
        # the one its id hashes to (checkpoints before format 19, untrained models).
        "item_catalogue": len(loaded.model.catalogue) if loaded.model.catalogue is not None else None,
        "config": asdict(config),
        "trained": {k: meta[k] for k in ("created_at", "events", "trained_span", "torch") if k in meta},
        "train_config": meta.get("train_config", {}),
        "report": report,
    }


def _fade(name: str, scale: float, power: float | None) -> str:
    if power is None:
        return f"{name} (fades over {scale:.3g} in-visit gaps)"
    return f"{name} (odds fall as (1 + in-visit gaps / {scale:.3g}) ** -{power:.3g})"


def _steps(move) -> tuple[float, ...]:
    """A silence or carts move as a tuple of 3: session 42's calibrations moved one weight, and their move is a
    number (the power; the carts step); before session 46 a carts move was a pair. The steps they lack are 0."""
    steps = tuple(move) if isinstance(move, (list, tuple)) else (move,)
    return steps + (0.0,) * (3 - len(steps))


def move_descriptions(report: dict) -> dict[str, str]:
    """The moves one `profiles calibrate` kept besides its maps (models/shop_calibration.py's report), each in
    words: "silence" (churn_risk), "carts" (purchase_propensity), "ranking" (top_categories)."""
    said = {}
    silence, carts, ranking = (report.get(name) or {} for name in ("silence", "carts", "ranking"))
    if silence.get("kept"):
        power, step, _ = _steps(silence["move"])
        parts = []
        if power != silence["power_before"]:
            parts.append(f"the return hazard x (1 + idle / 28 days) ** -{silence['power_before']:g} -> ** -{power:g}")
        if step:
            parts.append(f"the weight on idle time {silence['idle_weight_before']:g} -> "
                         f"{silence['idle_weight_after']:g}")
        said["silence"] = ", ".join(parts)
    if carts.get("kept"):
        steps = _steps(carts["move"])
        parts = []
        if steps[0]:
            parts.append(f"the weight on carts pending {carts['weight_before']:g} -> {carts['weight_after']:g}")
        if steps[1]:
            parts.append(f"the weight on the last 7 days' purchases {carts['recent_weight_before']:g} -> "
                         f"{carts['recent_weight_after']:g}")
        if steps[2]:
            parts.append(f"the weight on the next order being due {carts['due_weight_before']:g} -> "
                         f"{carts['due_weight_after']:g}")
        said["carts"] = ", ".join(parts)
    if ranking.get("kept"):
        parts = []
        if ranking["recency"] and "freshness_weight_before" in ranking:
            parts.append(f"the freshness weight {ranking['freshness_weight_before']:g} -> "
                         f"{ranking['freshness_weight_after']:g}")
        elif ranking["recency"]:  # session 42's calibrations moved the weight on being the latest category
            parts.append(f"the latest category's weight {ranking['latest_weight_before']:g} -> "
                         f"{ranking['latest_weight_after']:g}")
        if ranking["frequency"]:
            parts.append(f"the all-time count's weight {ranking['count_weight_before']:g} -> "
                         f"{ranking['count_weight_after']:g}")
        if ranking["gate_shift"]:
            side = "the user's own categories" if ranking["gate_shift"] > 0 else "the sequence model's"
            parts.append(f"the gate {ranking['gate_shift']:+g} (toward {side})")
        said["ranking"] = ", ".join(parts)
    return said


def calibration_moves(calibration: dict) -> list[str]:
    """What one `profiles calibrate` changed, from its report (older reports name only the two maps)."""
    report = calibration.get("report") or {}
    moves = [f"{name}'s map" for name, head in (("purchase_propensity", "purchase"), ("churn_risk", "event"))
             if report.get(head, {}).get("kept")]
    field = {"silence": "churn_risk", "carts": "purchase_propensity", "ranking": "top_categories"}
    return moves + [f"{field[name]}: {said}" for name, said in move_descriptions(report).items()]


def info_lines(info: dict) -> list[str]:
    """The human-readable form: a few aligned lines, then the training report's numbers."""
    c, t, r = info["config"], info["trained"], info["report"]
    lines = [
        ("model version", info["model_version"]),
        *([("keeps the state of", info["state_version"])] if info["state_version"] != info["model_version"] else []),
        *[("calibrated again", f"from {c['from']} on {', '.join(c['events'] or [])} at {c['created_at']}"
           + (f" (events until {iso_time(c['until'])})" if c["until"] is not None else "")
           + (f"; moved: {', '.join(c['moved'])}" if c["moved"] else "; nothing moved"))
          for c in info["calibrations"]],
        *[("set by hand", what) for what in info.get("priors", [])],
        ("checkpoint", f"{info['path']} (format {info['format']}"
                       + (f"; this version writes {CHECKPOINT_FORMAT})" if info["format"] != CHECKPOINT_FORMAT
                          else ")")),
        ("parameters", f"{info['parameters']:,}"),
        ("hidden size", f"{c['hidden_size']} (+ {c['memory_size']} long-term memory = "
                        f"{info['state_floats_per_user']} floats of state per user)"),
        ("state per user", "{model_state} bytes of model state ({model_state_dtype}) + {statistics} of behaviour "
                           "statistics".format(**info["state_bytes_per_user"])),
        ("next-item vocabulary", f"{info['next_item_vocabulary']:,} items"),
        ("item catalogue", f"{info['item_catalogue']:,} training items, each in its category; others read as unknown "
                           f"({c.get('unknown_items', 0):g} of training's items were)"
         if info["item_catalogue"] is not None else "none: every item id read as the item it hashes to"),
        ("hashed features", f"items {c['item_buckets']:,}, categories {c['category_buckets']:,}, "
                            f"queries {c['query_buckets']:,} buckets (hash seed {c['hash_seed']})"),
        ("next-event transitions", ", ".join(f"{name} {v['pairs']:,} pairs, weight {v['weight']:g}"
                                             for name, v in info["transitions"].items())),
        ("next-item neighbours", f"{info['neighbours']['sessions']:,} training sessions, "
                                 f"weight {info['neighbours']['weight']:g}"),
        ("interest clusters", str(c["clusters"])),
        ("price tiers", ", ".join(f"{n} < {e:g}" for n, e in zip(c["price_tier_names"], c["price_tier_edges"]))
         + f", {c['price_tier_names'][-1]} above"),
        ("churn horizon", f"{c['churn_horizon_hours']:g} h"),
        ("idle time in the shop's pace", ", ".join(_fade(name, scale, info["pace_fade_power"][name])
                                                   for name, scale in info["pace_decay"].items()
                                                   if scale is not None)
         or "not read (the session processes do not fade with it)"),
        ("after a long silence", ", ".join(
            f"{name}'s return hazard x (1 + idle / {v['days']:g} days) ** -{v['power']:g}"
            for name, v in info["silence"].items() if v is not None) or "nothing more than the fitted heads say"),
        ("the shop's habit", f"top_categories weighs freshness {info['habit']['weight']:g} x the serving shop's lean "
                             f"toward its users' latest categories beyond {info['habit']['lean_trained']:.2f} "
                             f"(the training shop's), and the log count {info['habit']['counts_weight']:g} x its lean "
                             f"toward their most engaged-with ones beyond {info['habit']['counts_lean_trained']:.2f}"),
    ]
    if t:
        span = " (events " + " .. ".join(t["trained_span"]) + ")" if "trained_span" in t else ""
        lines += [("trained at", t.get("created_at", "?")),
                  ("trained on", (", ".join(t.get("events", [])) or "?") + span),
                  ("torch", t.get("torch", "?"))]
    else:
        lines.append(("trained", "no training metadata in this checkpoint"))
    lines += [(f"train {k}", _plain(v)) for k, v in info["train_config"].items()]
    lines += [(f"report {k}", _plain(v)) for k, v in r.items() if not isinstance(v, (list, dict))]
    width = max(len(k) for k, _ in lines)
    return [f"{k:<{width}}  {v}" for k, v in lines]


def _plain(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
