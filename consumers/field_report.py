"""`profiles evaluate-fields` output: tables (or JSON) and reliability diagrams."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click
import numpy as np
import orjson
from rich import box
from rich.console import Console
from rich.table import Table

from models.field_evaluation import (
    DEFAULT_CUT_SHARE, JUDGED_FIELDS, PROBABILITY_FIELDS, SPREAD_CUT_SHARES, evaluate_fields, summarise_cuts,
)
from consumers.commands.base import reading_sources
from consumers.outfiles import check_output_dir
from models.dataset import read_records
from models.profile_model import CheckpointError, resolve_device
from models.category_calibration import STEADY_WEEKS
from models.checkpoint_io import load_checkpoint
from stream.settings import KafkaSettings, Settings
from stream.sources import parse_kafka_uri


def log_name(source: str) -> str:
    """What names a log across commands: a file's name, a kafka:// source's topic."""
    return parse_kafka_uri(source)[0] if source.startswith("kafka://") else Path(source).name


def seen_in_training(metadata: dict, files: tuple[str, ...], cut_iso: str) -> str | None:
    """Where the model was trained on a file (or topic) of the same name as one judged, with events after the
    cut: what it saw of the future it is judged on (the training span's end), else None. Checkpoints before
    the span was recorded say nothing."""
    span = metadata.get("trained_span")
    trained = {log_name(f) for f in metadata.get("events", [])}
    if not span or not trained & {log_name(f) for f in files}:
        return None
    end = dt.datetime.fromisoformat(span[1])
    return span[1] if end > dt.datetime.fromisoformat(cut_iso) else None


def run_field_evaluation(model_path: str, files: tuple[str, ...], cuts: list[int], spread: int | None,
                         device_name: str, as_json: bool, plot_path: str | None,
                         kafka: KafkaSettings | None = None, stream_calibration: bool = True, *,
                         max_ahead_ms: int = Settings.max_ahead_ms) -> None:
    """One report at one cut (the default, or the one given); with several cuts, each cut's report and a
    summary of what they say together (summarise_cuts). files: the replay's sources (files, directories,
    globs, kafka://TOPIC?from=&to= read with `kafka`), read once for every cut; max_ahead_ms: --max-ahead."""
    if plot_path:
        check_output_dir(plot_path, "--plot")  # now, not after replaying to the cut
    device = resolve_device(device_name)
    try:
        loaded = load_checkpoint(model_path, device)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from None
    with reading_sources(kafka):
        records = read_records(files, kafka, {"--plot": plot_path})
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    # (cut, share of the span where no cut is given): the cuts given, or one share per spread cut, or the default.
    shares = np.linspace(*SPREAD_CUT_SHARES, spread).tolist() if spread else [DEFAULT_CUT_SHARE]
    plan = [(cut, DEFAULT_CUT_SHARE) for cut in cuts] or [(None, share) for share in shares]
    reports = []
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed:,}/{task.total:,} records"), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True,
                  disable=not sys.stderr.isatty()) as bar:  # piped: no bar, and no blank line before an Error:
        for k, (cut, share) in enumerate(plan):
            what = "replaying to the cut" if len(plan) == 1 else f"replaying to cut {k + 1} of {len(plan)}"
            task = bar.add_task(what, total=1)
            try:
                reports.append(evaluate_fields(
                    loaded, list(files), device, cut, share=share, records=records,
                    stream_calibration=stream_calibration, max_ahead_ms=max_ahead_ms,
                    progress=lambda done, total, t=task: bar.update(t, completed=done, total=total)))
            except ValueError as exc:
                raise click.ClickException(str(exc)) from None
            bar.remove_task(task)
    for report in reports:
        report["seen_in_training"] = seen_in_training(loaded.metadata, files, report["cut"])
    if plot_path:
        draw_reliability(reports[0], plot_path)
        click.echo(f"wrote {plot_path} (reliability diagrams)", err=True)
    result = reports[0] if len(reports) == 1 else {"cuts": reports, "summary": summarise_cuts(reports)}
    if as_json:
        click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
    elif len(reports) == 1:
        print_tables(reports[0])
    else:
        print_cut_summary(reports, result["summary"])


def stream_calibration_line(calibration: dict) -> str:
    """What the stream's calibration did at the cut (models/stream_calibration.py), in a sentence."""
    if not any(calibration[name]["users"] for name in ("purchase_propensity", "churn_risk")):
        return ("probabilities as the model says them: no calibration anchor had matured before the cut (the stream "
                "calibrates them on the shop's own outcomes after four to five weeks of its traffic)")
    said = []
    for name in ("purchase_propensity", "churn_risk"):
        head = calibration[name]
        if head["applied"]:
            moved = f", {head['drift']:+.2f} of it the shop's move since" if head.get("drift") else ""
            weights = "".join(f" {w:+.2f} x {stat}" for stat, w in (head.get("weights") or {}).items())
            fitted = f"{head['sampled']:,} sampled users" if weights else f"{head['users']:,} users"
            said.append(f"{name} {head['a']:+.2f} + {head['b']:.2f} x logit{weights} (fitted on {fitted}{moved})")
        else:
            said.append(f"{name} as the model says (a map would gain {head['gain_nats']:,.0f} nats: not enough)")
    categories = calibration.get("top_categories") or {}
    if categories.get("applied"):
        weights = ", ".join(f"{w:+.2f} x {stat}" for stat, w in categories["weights"].items())
        if categories.get("gain") is not None:
            verdict = (f"over the latest two weeks, each week's previous weights were {categories['gain']:+.3f} +- "
                       f"{categories['gain_standard_error']:.3f} of precision@3 ahead of the model's ranking"
                       f"{_steady(categories)}")
        else:
            verdict = _cross(categories) + " ahead of the model's ranking"
        said.append(f"top_categories re-ranked by {weights} (fitted on {categories['users']:,} sampled users; "
                    f"{verdict})")
    elif categories.get("gain") is not None:
        said.append(f"top_categories as the model ranks them (re-ranked, the latest two weeks would have gained "
                    f"{categories['gain']:+.3f} +- {categories['gain_standard_error']:.3f} of precision@3: not enough)")
    elif categories.get("cross_validated_gain") is not None:
        said.append(f"top_categories as the model ranks them ({_cross(categories)}: not enough)")
    return "calibrated by the stream on the shop's outcomes before the cut: " + "; ".join(said)


def _cross(categories: dict) -> str:
    """The first week's re-ranking judged on its own users (no earlier week's weights to judge on them)."""
    return (f"on the first week's users, each re-ranked by weights fitted on the others, "
            f"{categories['cross_validated_gain']:+.3f} +- {categories['cross_validated_gain_standard_error']:.3f} "
            "of precision@3")


def _steady(categories: dict) -> str:
    if categories.get("steady_gain") is None:
        return ""
    return (f"; ahead in each of the latest {STEADY_WEEKS} weeks, by {categories['steady_gain']:+.3f} +- "
            f"{categories['steady_gain_standard_error']:.3f} on average")


def print_tables(report: dict) -> None:
    console = Console()
    w = report["windows_hours"]
    console.print(f"[bold]{report['model']}[/]: {report['users']:,} users with events before the cut "
                  f"{report['cut']} (log {report['first']} .. {report['last']}, {report['events']:,} events)")
    if report.get("seen_in_training"):
        console.print(f"[red]the model was trained on a file of this name with events up to "
                      f"{report['seen_in_training']}, after this cut: it has seen the future it is judged on "
                      "(train with --until the cut)[/]")
    if report["users"] < RATE_MIN_USERS:
        console.print(f"[yellow]{report['users']:,} users are too few to judge a field: its figures below are rough "
                      "or n/a (ROC AUC needs users of both outcomes); judge on a log with more users[/]")
    if report["windows_cut_short"]:
        console.print(f"[yellow]the log ends before a horizon: judged over {window(w['category'])} (categories), "
                      f"{window(w['purchase'])} (purchase), {window(w['churn'])} (churn); probabilities asked for "
                      "those windows[/]")
    if report.get("stream_calibration") is not None:
        console.print(stream_calibration_line(report["stream_calibration"]))
    fields = report["fields"]
    cats = fields["top_categories"]
    table = Table(title=f"top_categories vs categories engaged with in the next {window(w['category'])} "
                        f"({cats['model']['users']:,} users)")
    table.add_column("scorer")
    table.add_column("precision@3", justify="right")
    table.add_column("top future category hit", justify="right")
    for name, m in [("model", cats["model"]), *cats["baselines"].items()]:
        table.add_row(name, _fmt(m["precision@3"]), _fmt(m["top_future_hit_rate"]))
    console.print(table)
    console.print(_versus_best(cats))
    for field, what in (("purchase_propensity", f"a purchase within {window(w['purchase'])}"),
                        ("churn_risk", f"no event within {window(w['churn'])}")):
        f = fields[field]
        table = Table(title=f"{field} vs {what} ({f['positives']:,} of {f['users']:,} users)")
        for c in ("scorer", "ROC AUC", "PR AUC", "Brier", "ECE", "ECE if exact", "mean"):
            table.add_column(c, justify="left" if c == "scorer" else "right")
        for name, m in [("model", f["model"]), *f["baselines"].items()]:
            table.add_row(name, _fmt(m["roc_auc"]), _fmt(m["pr_auc"]), _fmt(m.get("brier")), _fmt(m.get("ece")),
                          _fmt(m.get("ece_if_calibrated")), _fmt(m.get("mean_probability")))
        console.print(table)
        console.print(_versus_best(f))
        console.print(_calibration(f["model"]))
        console.print(_rates(field, f, report["windows_cut_short"]))
    behind = [name for name in JUDGED_FIELDS if _verdict(fields[name].get("versus_best")) == "behind"]
    if behind:
        console.print(_train_here(behind, report["cut"], "on", report["first"]))


def print_cut_summary(reports: list[dict], summary: dict) -> None:
    """Several cuts: per cut, its window and each field's gap to the best rule; then per field the mean gap and
    at how many cuts the model was ahead, within the sampling noise, or behind."""
    console = Console()
    r0 = reports[0]
    console.print(f"[bold]{r0['model']}[/]: {len(reports)} cuts of {r0['first']} .. {r0['last']} "
                  f"({r0['events']:,} events). Model minus the best rule at each cut, and whether its 95% "
                  "paired-bootstrap interval over users is above 0 (ahead), holds 0 (noise) or is below "
                  "(behind); --json gives the intervals and each cut's full report.")
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for c in ("cut (UTC)", "users", "window h", "categories", "purchase", "churn"):
        table.add_column(c, justify="left" if c == "cut (UTC)" else "right", no_wrap=True)
    for r in reports:
        table.add_row(r["cut"][:16].replace("T", " "), f"{r['users']:,}", f"{r['windows_hours']['purchase']:.3g}",
                      *(_gap(r["fields"][f]["versus_best"]) for f in JUDGED_FIELDS))
    console.print(table)
    # Calibration beside it: one cut's ECE is rough (calibration_over_cuts), so each with the ECE that exact
    # probabilities would still show on as many users, at its 95th percentile.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title="ECE at each cut (if exact: what exact probabilities would show, 95th percentile)")
    for c in ("cut (UTC)", "purchase ECE", "if exact", "churn ECE", "if exact"):
        table.add_column(c, justify="left" if c == "cut (UTC)" else "right", no_wrap=True)
    for r in reports:
        table.add_row(r["cut"][:16].replace("T", " "),
                      *(x for f in PROBABILITY_FIELDS for x in _ece_at_cut(r["fields"][f].get("model", {}))))
    console.print(table)
    if seen := [r["cut"][:16].replace("T", " ") for r in reports if r.get("seen_in_training")]:
        console.print(f"[red]the model was trained on a file of this name with events after the cut(s) "
                      f"{', '.join(seen)}: it has seen the future it is judged on there (train with --until the "
                      "earliest cut)[/]")
    for field in JUDGED_FIELDS:
        f = summary["fields"][field]
        unmeasured = len(reports) - f["ahead"] - f["within_noise"] - f["behind"]
        console.print(f"{field}: mean {_fmt_signed(f['mean_difference'])} {f['metric']}; ahead at {f['ahead']}, "
                      f"within the noise at {f['within_noise']}, behind at {f['behind']} of {len(reports)} cuts"
                      + (f" (n/a at {unmeasured})" if unmeasured else ""))
    for field, c in summary.get("calibration", {}).items():
        if c["judged"]:
            console.print(f"{field}: ECE {c['mean_ece']:.3f} on average, where exact probabilities would show "
                          f"{c['mean_ece_if_calibrated']:.3f} on these users; more than sampling alone explains at "
                          f"{c['beyond_sampling']} of {c['judged']} cuts"
                          + _slope(c.get("median_calibration_slope"), label="median calibration slope"))
    behind = [field for field in JUDGED_FIELDS if 2 * summary["fields"][field]["behind"] > len(reports)]
    if behind:
        # Trained up to the earliest cut, a model sees none of the windows judged.
        console.print("\n" + _train_here(behind, min(r["cut"] for r in reports), "at most cuts on",
                                          reports[0]["first"]))


# History before a cut that `profiles calibrate` can test each field's moves on: its cuts lie at 30% to 95% of
# the log's traffic, and a move is tested on the latest cut that saw the field's whole horizon, fitted on the cuts
# before it. With traffic spread evenly, the second cut (at 37%) sees 7 days after it in a log of 11 days and 14
# days (churn_risk's horizon) in one of 23: with a margin, 14 and 23 (the classic shop's churn at its 50% cut, 15
# days of history, got a hint to calibrate that calibrate then could not test: docs/model.md, session 47).
CALIBRATE_MIN_DAYS = {"top_categories": 14, "purchase_propensity": 14, "churn_risk": 23}


def _train_here(fields: list[str], cut: str, where: str, first: str) -> str:
    """The line for a model behind the rules: calibrating it on this log before the cut (where the log is long
    enough to test the moves of every field behind on), or a model trained on this log's own events, is what
    to try."""
    history = dt.datetime.fromisoformat(cut) - dt.datetime.fromisoformat(first)
    needed = max(CALIBRATE_MIN_DAYS[f] for f in fields)
    calibrate = (f"Calibrate it for this shop on the log before the cut (`profiles calibrate --model ... --events ... "
                 f"--until {cut} --out shop.pt`, seconds: it also weighs how recently users came to each category, "
                 "all-time counts, carts pending and a long silence as this log says), or train"
                 if history.days >= needed else
                 f"With {history.days} days of log before the cut, too few for `profiles calibrate` to test its moves "
                 f"for {', '.join(fields)} on (it needs about {needed}), train")
    return (f"behind a counting rule {where} {', '.join(fields)}: a model ranks users by what the traffic it was "
            f"trained on taught it. {calibrate} one on this log's events before the cut (`profiles train --events ... "
            f"--until {cut}`) and judge it the same way (docs/model.md, Results).\n")


def _verdict(v: dict | None) -> str | None:
    """"ahead", "behind" or "noise" by the 95% interval of model minus the best rule; None where nothing was
    ranked (no users judged, or one class only)."""
    if not v or np.isnan([v["difference"], *v["interval95"]]).any():
        return None
    lo, hi = v["interval95"]
    return "ahead" if lo > 0 else "behind" if hi < 0 else "noise"


def _gap(v: dict) -> str:
    verdict = _verdict(v)
    if verdict is None:
        return "n/a"
    shown = {"ahead": "[green]ahead[/]", "behind": "[red]behind[/]"}.get(verdict, verdict)
    return f"{_fmt_signed(v['difference'])} {shown}"


def _ece_at_cut(m: dict) -> tuple[str, str]:
    """A cut's ECE and the 95th percentile of exact probabilities' ECE on its users."""
    return _fmt(m.get("ece")), _fmt(m.get("ece_if_calibrated_95"))


def _fmt_signed(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{value:+.3f}"


def draw_reliability(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for ax, field in zip(axes, PROBABILITY_FIELDS):
        bins = report["reliability"][field]
        m = report["fields"][field]["model"]
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
        if bins:
            x, y, _n = zip(*bins)
            ax.plot(x, y, marker="o", label="model")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted probability (equal-mass bins)")
        ax.set_ylabel("observed rate")
        slope = m.get("calibration_slope")
        ax.set_title(f"{field}\nECE {m['ece']:.3f}, Brier {m['brier']:.3f}"
                     + ("" if slope is None or np.isnan(slope) else f", calibration slope {slope:.2f}"))
        ax.legend(loc="upper left")
    fig.suptitle(f"{report['model']} at cut {report['cut']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def window(hours: float) -> str:
    """A judged window in the unit a reader thinks in: a real sample's 26 minutes are not "0 h"."""
    if hours < 1:
        return f"{hours * 60:.0f} min"
    if hours < 48:
        return f"{hours:.3g} h"
    return f"{hours / 24:.3g} days"


def _versus_best(field: dict) -> str:
    """One line: the model minus the best baseline, its 95% paired-bootstrap interval, and what it means."""
    v = field.get("versus_best")
    if not v or np.isnan(v["difference"]):
        return ""
    head = f"model - {v['baseline']}: {v['difference']:+.3f} {v['metric']}"
    verdict = _verdict(v)
    if verdict is None:  # a log of one user: no interval, and no verdict without one
        return f"{head} (too few users for a bootstrap interval)\n"
    lo, hi = v["interval95"]
    said = {"ahead": "[green]ahead[/]", "behind": "[red]behind[/]"}.get(verdict, "within the sampling noise")
    return f"{head} (95% paired bootstrap [{lo:+.3f}, {hi:+.3f}]): {said}\n"


RATE_GAP = 0.02  # mean probability this far from the observed rate: say so, and what fits it
RATE_MIN_USERS = 30  # below, the observed rate is too rough to send anyone to `profiles calibrate`


def _calibration(m: dict) -> str:
    """The ECE against the ECE that exact probabilities would show on as many users (sampling alone)."""
    ece, floor, high = m.get("ece"), m.get("ece_if_calibrated"), m.get("ece_if_calibrated_95")
    if ece is None or floor is None or np.isnan([ece, floor, high]).any():
        return ""
    verdict = "more than sampling alone explains" if ece > high else "within what sampling alone explains"
    return (f"ECE {ece:.3f}; exact probabilities would show {floor:.3f} on these users ({high:.3f} at the 95th "
            f"percentile): {verdict}{_slope(m.get('calibration_slope'), m.get('calibration_slope_se'))}")


# A calibration slope this far from 1 (and more than two standard errors): the report says which way the
# probabilities are off.
SLOPE_NOTE = 0.1


def _slope(slope: float | None, se: float | None = None, label: str = "calibration slope") -> str:
    """The calibration slope (models/field_evaluation.py calibration_line), and which way it says the probabilities
    are off where it is SLOPE_NOTE or more from 1 and more than two of its standard errors (`se`; None: not known)."""
    if slope is None or np.isnan(slope):
        return ""
    off = abs(slope - 1) >= SLOPE_NOTE and (se is None or np.isnan(se) or abs(slope - 1) > 2 * se)
    way = "" if not off else (" (backwards: the likelier the model says, the rarer)" if slope <= 0 else
                              " (too sure: spread too far from the middle)" if slope < 1 else
                              " (too timid: too close to the middle)")
    return f"; {label} {slope:.2f}{'' if se is None or np.isnan(se) else f' +- {se:.2f}'}{way}"


def _rates(field: str, f: dict, short_log: bool) -> str:
    """The model's mean probability against the rate observed; where they are apart, the command that fits a
    model's probabilities to a shop's rates (or, on a log shorter than the horizons, what it would need)."""
    mean, rate = f["model"].get("mean_probability"), f["positives"] / max(f["users"], 1)
    if mean is None or np.isnan(mean) or abs(mean - rate) <= RATE_GAP or f["users"] < RATE_MIN_USERS:
        return ""
    # calibrate tests a map on a later cut that saw the whole horizon: a log shorter than the horizons has none
    needs = (", on a log that runs at least the horizons past a cut; on a log this short, train on its events "
             "instead") if short_log else ""
    return (f"mean {field} {mean:.1%} against {rate:.1%} observed: `profiles calibrate` fits a trained model's "
            f"probabilities to a shop's rates{needs} (docs/operations.md)\n")


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "n/a" if np.isnan(value) else f"{value:.3f}"
    return str(value)
