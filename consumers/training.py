"""`profiles train` and `profiles calibrate`: event logs (files or a Kafka topic's range) -> checkpoint."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shlex
import sys
import time
from dataclasses import asdict, replace

import click
import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from consumers.commands.base import reading_sources
from consumers.field_report import window
from consumers.model_info import move_descriptions
from consumers.outfiles import Interrupted, atomic_paths, check_output_dir
from models.dataset import HOUR_MS, EventLog, load_events
from models.field_training import train_fields
from models.profile_model import ModelConfig, resolve_device
from models.checkpoint_io import LoadedModel, save_checkpoint
from models.sequence_data import item_vocabulary
from models.sequence_training import TrainConfig, auto_epochs, train
from stream.events import EVENT_TYPES, PURCHASE, iso_time
from stream.profiles import CHURN_HORIZON_HOURS, PURCHASE_HORIZON_HOURS
from stream.settings import KafkaSettings, Settings

log = logging.getLogger(__name__)


# Below these a trained model may have too little to learn from, and a note says so. Trained in the project's
# shop 3 and judged on its other users and three other shops' default logs (16 cuts, docs/model.md, session 72):
# on the default log, 20,000 events of 1,000 users, purchase_propensity and churn_risk ranked behind the simple
# rules (-0.011 and -0.036 of ROC AUC); on 60,000 events of 3,000 users level (+0.038, -0.007); on 150,000 ahead
# (+0.066, +0.009).
# The REES46 slice (17,434 events of 4,504 users) was level with them in its own shop. 16 independent shops'
# 20,000-event logs trained models ahead of the rules at most cuts, behind at 19 of 192 field-cuts (session 73).
SMALL_LOG_EVENTS = 60_000
SMALL_LOG_USERS = 3_000
# The published probabilities and the field heads behind them (churn_risk is the event head's complement).
PROBABILITY_HEADS = (("purchase_propensity", "purchase"), ("churn_risk", "event"))


def events_until(event_files: tuple[str, ...], until: int | None, kafka: KafkaSettings | None = None,
                 out: str | None = None, *, max_ahead_ms: int = Settings.max_ahead_ms) -> EventLog:
    """The sources' events at or before `until` (all of them: None), said in one line; an error if none.
    event_files: files, directories, globs or kafka://TOPIC?from=&to= (read with `kafka`), as the replay
    reads them; `out`, the command's output, is never read as a log; max_ahead_ms: the command's --max-ahead."""
    with reading_sources(kafka):
        events = load_events(event_files, kafka=kafka, outputs={"--out": out}, max_ahead_ms=max_ahead_ms)
    everything = events
    if until is not None:
        events = events.before(until)
    if len(events) < 2:
        if until is not None and len(everything):  # the cut is the mistake, not the files: say where they lie
            raise click.ClickException(
                f"{len(events)} of the {len(everything):,} events in {', '.join(event_files)} are at or before "
                f"--until {iso_time(until, 'seconds')}: the log runs from {iso_time(everything.first_ts, 'seconds')} "
                f"to {iso_time(everything.last_ts, 'seconds')}")
        if len(events):  # one event: nothing follows it to learn from
            raise click.ClickException(f"one usable event in {', '.join(event_files)}: training needs at least two "
                                       "(a model learns what follows an event)")
        raise click.ClickException(f"no usable events in {', '.join(event_files)}")
    click.echo(f"{len(events):,} events of {len(events.users):,} users"
               + (f" ({events.invalid:,} invalid lines skipped)" if events.invalid else ""), err=True)
    return events


def span_hours(events: EventLog) -> float:
    """The hours from the log's first event to its last."""
    return (events.last_ts - events.first_ts) / HOUR_MS


def small_log_note(events: EventLog, sources: tuple[str, ...]) -> str | None:
    """A line for a log that may be too small to train fields that beat counting, or without a kind of event a
    field is learned from; else None. `sources`: the log as given to `profiles train`, for the command the line
    suggests."""
    missing = [] if (events.events.type_idx == PURCHASE).any() else [
        f"no {EVENT_TYPES[PURCHASE]} events: purchase_propensity cannot be learned from this log (it will say near 0 "
        "for everyone)"]
    if np.equal(events.events.category, None).all():
        missing.append("no categories: top_categories stays empty")
    if len(events) < SMALL_LOG_EVENTS or len(events.users) < SMALL_LOG_USERS:
        # Measured in session 73 (docs/model.md): on the generator's default logs the shipped model calibrated on the
        # log beat a model trained on it (the shipped one was trained in the generator's shops); on 20,000 events of
        # 16 independent shops neither won (purchase and churn behind the rules at 8 of 128 cuts trained, at 9
        # calibrated; top_categories at 11 of 64 trained, at 4 calibrated).
        calibrate = f"profiles calibrate --model demo --events {' '.join(map(shlex.quote, sources))} --out shop.pt"
        # (calibrating needs a cut with purchase_propensity's horizon after it: a shorter log cannot be)
        beside = (", beside the shipped one calibrated on this log, which did better on the generator's logs, the "
                  f"shops it was trained in (seconds: `{calibrate}`)"
                  if span_hours(events) > PURCHASE_HORIZON_HOURS else "")
        missing.append(f"{len(events):,} events of {len(events.users):,} users is a small log to learn from (under "
                       f"{SMALL_LOG_EVENTS:,} events or {SMALL_LOG_USERS:,} users): trained on `profiles generate`'s "
                       "default log, 20,000 events of 1,000 users, purchase_propensity and churn_risk ranked users "
                       "behind simple rules of their own history, even in the same shop, while on 20,000 events of "
                       "16 independent shops they were behind at 8 of 128 cuts, about as often as the shipped model "
                       "calibrated on the log. Judge this model with `profiles evaluate-fields` before serving "
                       f"it{beside}")
    return "note: " + "; ".join(missing) if missing else None


def short_span_note(events: EventLog) -> str | None:
    """A line for a log shorter than purchase_propensity's horizon (the probability heads then learn only what
    follows within hours, and are served over days); else None."""
    hours = span_hours(events)
    if hours >= PURCHASE_HORIZON_HOURS:
        return None
    # Measured in session 65 (docs/model.md): the REES46 slice's model in `profiles generate --seed 53 --shop-seed 3`.
    return (f"note: the log spans {window(hours)}, less than purchase_propensity's horizon "
            f"({PURCHASE_HORIZON_HOURS / 24:g} days; churn_risk's {CHURN_HORIZON_HOURS / 24:g}): both learn here what "
            f"follows within {window(hours)} at most and are served over days, where that can rank users the other "
            "way (trained on REES46's 2.8-hour slice, purchase_propensity ranked a 16-day shop's next-week buyers at "
            "ROC AUC 0.40, where their recent purchases rank them at 0.73). Train on a log that spans the horizons; "
            "judge this one with `profiles evaluate-fields` before serving it")


# Above this many items in the next-item vocabulary (and up to TrainConfig.full_softmax_max_items, where sampling
# takes over), every event scores every item: docs/model-journal.md, session 39, measured an epoch of a
# 165k-event log on 2 CPU cores at 5 minutes with 35,580 items and 28 s with the 8,000 most frequent.
LARGE_CATALOGUE_ITEMS = 16_384


def catalogue_note(events: EventLog, max_items: int) -> str | None:
    """A line for a catalogue whose full softmax makes each epoch slow, with the option that bounds it; else None."""
    n = len(item_vocabulary(events, events.last_ts, max_items))  # the vocabulary `train` will build
    if not LARGE_CATALOGUE_ITEMS < n <= TrainConfig.full_softmax_max_items:
        return None
    return (f"note: {n:,} items in the next-item vocabulary: every training event scores each of them, so an epoch "
            f"takes minutes (on 2 CPU cores, 165k events of 35,580 items: 5 minutes an epoch; of the 8,000 most "
            f"frequent: 28 s). --max-items 8000 keeps the most frequent (next_items then name only those; "
            "docs/model-journal.md, session 39)")


def fields_summary(report: dict) -> str:
    """One line on the field stage: how many examples it learned from and what calibration it kept."""
    if "train_examples" not in report:
        return "fields: the log is too short to fit them: left untrained"
    fits = report.get("calibration_fit", {})
    kept = [name for name, head in PROBABILITY_HEADS if fits.get(head, {}).get("kept")]
    paced = [name for name, head in PROBABILITY_HEADS if report.get("idle_decay", {}).get(head)]
    return (f"fields: fitted on {report['train_examples']:,} profiles at {report['cuts']} cuts, "
            f"{report['val_examples']:,} held out; calibrated on held-out time: "
            + (", ".join(kept) if kept else "none (too few held-out profiles, or no gain)")
            + "; idle time in the shop's pace: " + (", ".join(paced) if paced else "none (no gain on held-out time)")
            + gate_summary(report.get("gate_shift", {})) + habit_summary(report.get("habit")))


def habit_summary(habit: dict | None) -> str:
    """The training shop's habit (stream/habit.py): where its users come back to their latest categories, the heads
    learned how fresh a category is there (or, where they keep their staples, how much the counts say), and a serving
    shop's lean beyond it adds to that."""
    if not habit:
        return ""
    return (f"; in its users' latest weeks, only the latest category came again in {habit['recency_weeks']:,} and "
            f"only the most engaged-with one in {habit['counts_weeks']:,}: lean toward the latest {habit['lean']:.2f}, "
            f"toward the counts {habit.get('counts_lean', 0.0):.2f} (on average over the cuts)")


def gate_summary(gate: dict) -> str:
    """The top_categories gate's move for ranking (models.field_training.shift_gate_for_ranking), if any."""
    shift, precision = gate.get("shift", 0.0), gate.get("precision_at_3", {})
    if not shift:
        return ""
    side = "the user's own categories" if shift > 0 else "the sequence model's"
    foreign = gate.get("precision_at_3_foreign") or {}  # (not in reports before session 63)
    abroad = (f", with a foreign explore side {foreign['0.0']:.3f} -> {foreign[str(shift)]:.3f}"
              if str(shift) in foreign else "")
    return (f"; top_categories leans toward {side} (gate {shift:+g}: held-out precision@3 "
            f"{precision['0.0']:.3f} -> {precision[str(shift)]:.3f}{abroad})")


def weights_digest(model: torch.nn.Module) -> str:
    """A short digest of the weights, for the version string of a checkpoint."""
    return hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in model.state_dict().values())).hexdigest()[:8]


def run_training(event_files: tuple[str, ...], out: str, device_name: str, *, seed: int, hidden_size: int,
                 dropout: float, unknown_items: float = 0.0, until: int | None = None,
                 buckets: tuple[int, int, int] | None = None,
                 kafka: KafkaSettings | None = None, max_ahead_ms: int = Settings.max_ahead_ms,
                 **train_options: object) -> None:
    started = time.monotonic()
    check_output_dir(out)
    device = resolve_device(device_name)
    events = events_until(event_files, until, kafka, out, max_ahead_ms=max_ahead_ms)
    if events.first_ts == events.last_ts:  # no later part to validate on: the losses would be of nothing (0.0000)
        raise click.ClickException(
            f"every event of {', '.join(event_files)} is at {iso_time(events.first_ts, 'seconds')}: training learns "
            "what follows an event in time and validates on the latest part of the log's span, and this one has none")
    max_items = train_options.get("max_items", TrainConfig.max_items)
    notes = (small_log_note(events, event_files), short_span_note(events),
             catalogue_note(events, max_items))  # type: ignore[arg-type]
    for note in notes:
        if note is not None:
            click.echo(note, err=True)
    model_config = ModelConfig(hidden_size=hidden_size, dropout=dropout, unknown_items=unknown_items, init_seed=seed)
    if buckets is not None:
        model_config = replace(model_config, item_buckets=buckets[0], category_buckets=buckets[1],
                               query_buckets=buckets[2])
    if train_options.get("epochs") is None:
        train_options["epochs"] = auto_epochs(len(events))
        click.echo(f"{train_options['epochs']} epochs (auto for this size; --epochs to choose)", err=True)
    train_config = TrainConfig(seed=seed, **train_options)  # type: ignore[arg-type]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
                  disable=not sys.stdout.isatty()) as bar:  # piped: no bar, and no blank line before an Error:
        task = bar.add_task("epoch 1", total=None, info="")

        def progress(stage: str, done: int, total: int, info: dict) -> None:
            # The refit's epoch count is the best one of the first pass: not known to this callback.
            of = f"/{train_config.epochs}" if stage == "train" else ""
            bar.update(task, completed=done, total=total, description=f"{stage} epoch {info['epoch']}{of}",
                       info=f"loss {info['loss']:.3f}")

        try:
            model, vocab, report = train(events, model_config, train_config, device, progress)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: nothing written ({out} is written only when training ends)") from None
    # Stage two: the published fields, fitted on profiles taken through the serving path at cuts.
    click.echo("fitting the profile fields (purchase_propensity, churn_risk, top_categories) ...", err=True)
    fields_report = train_fields(LoadedModel(model, "training", True, {}, vocab), events, device, seed=seed)
    click.echo(fields_summary(fields_report), err=True)
    version = f"gru-h{hidden_size}-{dt.datetime.now(dt.timezone.utc):%Y%m%d}-{weights_digest(model)}"
    metadata = {"train_config": asdict(train_config), "report": asdict(report), "fields": fields_report,
                "events": list(event_files),
                # The span of event time it learned from: a later judge at a cut inside it is told so.
                "trained_span": [iso_time(t, "milliseconds") for t in (events.first_ts, events.last_ts)],
                "created_at": dt.datetime.now(dt.timezone.utc).isoformat(), "torch": str(torch.__version__)}
    with atomic_paths(out) as (tmp,):  # an earlier checkpoint stays whole until this one is
        save_checkpoint(tmp, model, version, metadata, vocab)
    took = time.monotonic() - started
    click.echo(f"saved {version} to {out}: best epoch {report.best_epoch} of {report.epochs_run}, "
               f"validation loss {report.best_val_loss:.4f}, {report.n_items:,} items, {took:.0f}s "
               f"({report.seconds:.0f}s of it the sequence model)", err=True)


def run_calibration(model_path: str, event_files: tuple[str, ...], out: str, device_name: str, *,
                    until: int | None, seed: int, kafka: KafkaSettings | None = None,
                    max_ahead_ms: int = Settings.max_ahead_ms) -> None:
    """`profiles calibrate`: a trained model's probabilities calibrated again on another shop's log."""
    from models.checkpoint_io import load_checkpoint
    from models.shop_calibration import recalibrate

    check_output_dir(out)
    device = resolve_device(device_name)
    loaded = load_checkpoint(model_path, device)
    events = events_until(event_files, until, kafka, out, max_ahead_ms=max_ahead_ms)
    report = recalibrate(loaded, events, device, seed=seed)
    fits = [report[name] for name in ("purchase", "event", "silence", "carts", "ranking")]
    if not any("test" in fit for fit in fits):  # nothing could be tested on this log: a mistake, say so once
        ts = events.events.ts
        raise click.ClickException(
            f"the log spans {window((int(ts.max()) - int(ts.min())) / 3_600_000)}: too short to calibrate on, which "
            f"needs a cut with {PURCHASE_HORIZON_HOURS / 24:g} days of events after it and history before it "
            f"({CHURN_HORIZON_HOURS / 24:g} days after it for churn_risk); nothing written to {out}")
    click.echo(f"profiles at {report['cuts']} cuts, {report['examples']:,} of them judged on what followed:", err=True)
    _say_moves({name: report[name] for name in ("silence", "carts")})
    for name, head in PROBABILITY_HEADS:
        fit = report[head]
        test = fit.get("test") or {}
        if "observed_rate" not in fit:
            base_rate = (f", {test['loss_base_rate']:.4f} for the earlier cuts' rate alone"
                         if test.get("loss_base_rate") is not None else "")  # (not in reports before session 65)
            found = (f"; on the profiles of {iso_time(test['cut_ms'], 'minutes')}: log loss "
                     f"{test['loss_current']:.4f} as it was, {test['loss_recalibrated']:.4f} with the new map"
                     f"{base_rate}" if test.get("loss_recalibrated") is not None else "")
            click.echo(f"  {name}: left as it was ({fit['reason']}{found})", err=True)
            continue
        # churn_risk is the event head's complement: its rates read as 1 - the event head's.
        flip = (lambda r: 1 - r) if head == "event" else (lambda r: r)
        verdict = "calibrated" if fit["kept"] else "left as it was (a new fit did not lower the loss)"
        # "before" is after the move above where one was made: a move chosen for ranking can leave the probabilities
        # far off (a log loss of 40 with a mean of 49%), which this map then puts right
        moved = report.get({"event": "silence"}.get(head, "carts"), {}).get("kept")
        click.echo(f"  {name}: observed {flip(fit['observed_rate']):.1%}, mean probability "
                   f"{flip(fit['mean_probability_before']):.1%} -> {flip(fit['mean_probability_after']):.1%}, "
                   f"log loss {fit['loss_before']:.4f}{' (with the move above)' if moved else ''} -> "
                   f"{fit['loss_after']:.4f}: {verdict}", err=True)
        if test.get("loss_recalibrated") is not None:
            click.echo(f"    tested first on the profiles of {iso_time(test['cut_ms'], 'minutes')}, fitted on the "
                       f"earlier ones: log loss {test['loss_current']:.4f} -> {test['loss_recalibrated']:.4f}",
                       err=True)
    _say_moves({"ranking": report["ranking"]})
    base = loaded.state_version
    if any(fit["kept"] for fit in fits):
        version = f"{base}+cal-{dt.datetime.now(dt.timezone.utc):%Y%m%d}-{weights_digest(loaded.model)}"
    else:  # tested, and the model's own calibration did best: the same model, the same version
        version = loaded.version
        click.echo("  the model's calibration already predicts this shop best: written unchanged", err=True)
    metadata = {**loaded.metadata, "state_version": base,
                "calibrations": [*loaded.metadata.get("calibrations", []),
                                 {"from": loaded.version, "events": list(event_files), "until": until,
                                  "report": report, "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}]}
    with atomic_paths(out) as (tmp,):
        save_checkpoint(tmp, loaded.model, version, metadata, loaded.item_vocab)
    click.echo(f"saved {version} to {out} (it keeps the state of {base}: a daemon switched to it restores the "
               "same changelog)", err=True)


def _say_move(what: str, metric: str, fit: dict, moved: str, note: str = "") -> None:
    """`profiles calibrate`'s line on one of its moves (shop_calibration.tune_*_on_cuts' report): what moved, and the
    metric before and after on the earlier profiles and on the latest that saw the whole horizon."""
    test = fit.get("test")
    if not fit["kept"]:
        tried = (f", {test['moved']:.4f} with the earlier cuts' best move" if test and fit["earlier"]["moved"]
                 != fit["earlier"]["current"] else "")
        found = (f"; on the profiles of {iso_time(test['cut_ms'], 'minutes')}: {metric} {test['current']:.4f} as it "
                 f"was{tried}" if test else "")
        click.echo(f"  {what}: left as it was ({fit['reason']}{found})", err=True)
        return
    click.echo(f"  {what}: {moved}: {metric} {fit['earlier']['current']:.4f} -> {fit['earlier']['moved']:.4f} on the "
               f"earlier profiles; tested on those of {iso_time(test['cut_ms'], 'minutes')}: {test['current']:.4f} -> "
               f"{test['moved']:.4f}: moved{note}", err=True)


def _say_moves(report: dict) -> None:
    """The lines on the moves besides the maps: the two hazards' (made before the maps are fitted again, so
    said first), or top_categories' (after the maps)."""
    said = move_descriptions(report)
    for name, what, metric, note in (
            ("silence", "churn_risk after a long silence", "ROC AUC", " (the churn_risk map below is fitted with it)"),
            ("carts", "purchase_propensity, carts pending, recent purchases and orders due", "ROC AUC",
             " (the purchase_propensity map below is fitted with it)"),
            ("ranking", "top_categories", "precision@3", "")):
        if name in report:
            _say_move(what, metric, report[name], said.get(name, ""), note)