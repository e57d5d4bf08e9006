"""`profiles inspect USER`: one user's events beside how each profile field moved.

A user's state depends only on that user's events, so the inspection replays just
them, one at a time, through the daemon's pipeline: each row is the profile the
daemon would have published right after that event.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
from dataclasses import dataclass, field, replace

import click
import numpy as np
import orjson
from rich import box
from rich.console import Console
from rich.table import Table

from consumers.outfiles import check_output_dir
from models.dataset import decode_offline, warn_skipped
from models.update_step import ProfileUpdater, load_updater
from models.features import category_keys
from stream.events import EVENT_TYPES, RecordBatch
from stream.decode import decode_batch
from stream.settings import Settings
from stream.sources import open_sources

# Panels drawn by --plot, top to bottom.
CHARTED = ("purchase_propensity", "churn_risk", "top_categories", "spend", "events")
# Categories drawn in the top_categories panel: those first in most profiles (the rest are named as a count).
CHARTED_CATEGORIES = 5
CATEGORY_COLOURS = ("tab:blue", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")  # not the markers' colours


# Idle re-scores are computed one by one (about a millisecond each) and shown collapsed into one row per run:
# more than this many would take minutes for nothing to read (1s over a month's log: about 2.6 million).
MAX_IDLE_RESCORES = 20_000


class InspectError(ValueError):
    """Nothing to inspect (unknown user, unreadable source)."""


@dataclass
class Timeline:
    """One user's published profiles in event-time order: one after each event ("event" rows), the
    re-scores the daemon publishes while the user is idle ("idle"), and the replay's final profile at
    the end of the log ("end"), each computed at the clock (event time) it would be published at."""

    user: str
    model_version: str
    idle_rescore_ms: int  # 0: idle re-scores not shown
    log_end_ms: int  # the largest event time in the sources: the clock of the replay's final profiles
    rows: list[dict] = field(default_factory=list)  # {"kind", "at_ms", "event" (None unless "event"), "profile"}
    duplicates: int = 0  # events skipped as the daemon skips them: an event_id among the user's recent ones
    erased_before: int = 0  # events before a forget record for the user: erased, not shown

    @property
    def events(self) -> list[dict]:
        return [r for r in self.rows if r["kind"] == "event"]


def user_records(settings: Settings, sources: list[str], fmt: str, user: str
                 ) -> tuple[list[bytes], set[str], int, int]:
    """The raw records of `user` in the sources, in source order, every category seen in them, and the
    largest event time of all (valid, in-range) events, and how many of the user's events came before a forget
    record for them (erased: left out)."""
    found: list[bytes] = []
    categories: set[str] = set()
    log_end = -1
    erased_before = 0
    skipped: list = []  # the sources' dead letters: said once at the end, as by the other commands that read logs
    for source in open_sources(settings.kafka, sources, fmt, 50_000):
        while not source.exhausted:
            batch = source.next_batch()
            controls: list = []
            events, dead = decode_offline(batch, settings.max_event_bytes, controls, max_ahead_ms=settings.max_ahead_ms)
            skipped += dead
            if source.time_range is not None:  # kafka:// ranges select by event time, as in replay
                events = events.take(source.time_range.mask(events.ts))
            if len(events):
                log_end = max(log_end, int(events.ts.max()))
            mine = np.flatnonzero(events.user_id == user)
            forgets = [c.record_index for c in controls if c.kind == "forget" and c.user_id == user]
            if forgets:  # the daemon erases the user there: what came before is gone, as in a replay
                erased_before += len(found) + int((events.record_index[mine] < forgets[-1]).sum())
                found = []
                mine = mine[events.record_index[mine] > forgets[-1]]
            found += [batch.values[i] for i in events.record_index[mine].tolist()]
            categories.update(c for c in events.category.tolist() if c is not None)
    warn_skipped(skipped)
    return found, categories, log_end, erased_before


def timeline(settings: Settings, sources: list[str], fmt: str, user: str) -> Timeline:
    """The user's profile after each event, the idle re-scores between events and after the last one
    (every `settings.idle_rescore_after_ms` of event time without an event, as the daemon publishes them
    while other users' events move its clock), and the final profile a replay of the sources writes."""
    records, categories, log_end, erased_before = user_records(settings, sources, fmt, user)
    if not records:
        why = f": {erased_before} erased by a forget record, none after it" if erased_before else ""
        raise InspectError(f"no valid events of user {user!r} in {', '.join(sources)}{why}")
    # In event-time order, as the pipeline orders a batch (arrival order breaks ties).
    events, _ = decode_batch(RecordBatch.of(records, topic="inspect"), settings.max_event_bytes)
    order = events.record_index[np.lexsort((events.record_index, events.ts))].tolist()
    ts_of = dict(zip(events.record_index.tolist(), events.ts.tolist()))  # epoch ms, whatever form the record had
    every = settings.idle_rescore_after_ms
    span = log_end - min(ts_of.values())
    if every and span // every > MAX_IDLE_RESCORES:
        raise InspectError(f"--idle-rescore-after {every / 1000:g}s would re-score the user {span // every:,} times "
                           f"over the log's {span / 86_400_000:,.1f} days (at most {MAX_IDLE_RESCORES:,}): give a "
                           f"longer interval, or 0 for none")
    updater = load_updater(replace(settings, idle_rescore_after_ms=0))  # re-scores are added below
    # top_categories scores are shares among the categories the daemon has seen: all of the sources'.
    names = np.array(sorted(categories), dtype=object)
    cfg = updater.config
    updater.state.remember_categories(category_keys(names, cfg.hash_seed + 1), names)
    out = Timeline(user, updater.model_version, every, log_end, erased_before=erased_before)
    published_at = None  # the clock of the latest profile published

    def idle_until(clock_ms: int, inclusive: bool) -> None:
        """Re-scores while the user is idle, up to the clock (its next event, or the end of the log)."""
        nonlocal published_at
        while every and published_at is not None and (
                published_at + every < clock_ms or inclusive and published_at + every == clock_ms):
            published_at += every
            out.rows.append({"kind": "idle", "at_ms": published_at, "event": None,
                             "profile": _profile_at(updater, user, published_at)})

    for i in order:
        event = orjson.loads(records[i])
        idle_until(ts_of[i], inclusive=False)
        result = updater.process(RecordBatch.of([records[i]], topic="inspect", first_offset=i))
        profile = next((orjson.loads(v) for k, v in result.profiles if k.decode() == user), None)
        if profile is None:  # a repeated event_id: the daemon skips the event and publishes nothing
            out.duplicates += 1
            continue
        published_at = updater.state.max_event_ts
        out.rows.append({"kind": "event", "at_ms": published_at, "event": event, "profile": profile})
    idle_until(log_end, inclusive=True)
    if log_end > published_at:  # a replay's final profiles are computed at the log's last event time
        out.rows.append({"kind": "end", "at_ms": log_end, "event": None,
                         "profile": _profile_at(updater, user, log_end)})
    return out


def _profile_at(updater: ProfileUpdater, user: str, clock_ms: int) -> dict:
    """The user's profile as published with the event-time clock at `clock_ms` (no new event)."""
    state = updater.state
    state.max_event_ts = max(state.max_event_ts, clock_ms)
    ((_, value),) = updater.profiles_for(state.rows_for([user]))
    return orjson.loads(value)


def _when(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)


SHORT_TYPES = {"search": "search", "click": "click", "add_to_cart": "cart", "purchase": "buy"}
PIPED_WIDTH = 400  # piped output: no cell cut short (a category or query of 100 characters fits)
WIDE = 150  # from this many columns the table has every column in full; below, a compact one
# The compact table's columns and their widths (longer names are cut with an ellipsis), one column
# apart: 111 in all; 95 without tier and cluster (below 120); 80 without price and events (below 96).
COMPACT_WIDTHS = {"time (UTC)": 10, "event": 6, "item": 11, "category": 13, "price": 7, "events": 6, "spend": 7,
                  "top category": 15, "p(buy)": 6, "churn": 5, "tier": 7, "cluster": 7}
_RIGHT = {"price", "events", "spend", "propensity", "p(buy)", "churn", "cluster"}


def render_table(tl: Timeline, width: int = WIDE) -> Table:
    """Each event beside the profile published after it; runs of idle re-scores as one row (the last).
    Below WIDE columns a compact table: times under a row per day, short event types, no borders,
    top category without its score, fewer columns on narrower terminals (COMPACT_WIDTHS)."""
    skipped = [f"{n} {what}" for n, what in ((tl.duplicates, "duplicate(s) skipped, as the daemon skips them"),
                                             (tl.erased_before, "erased by a forget record")) if n]
    title = (f"user {tl.user}: {len(tl.events)} events and the profile published after each "
             f"(model {tl.model_version})" + "".join(f"; {s}" for s in skipped))
    compact = width < WIDE
    if compact:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                      padding=0)
        left_out = ({"tier", "cluster"} if width < 120 else set()) | ({"price", "events"} if width < 96 else set())
        columns = [c for c in COMPACT_WIDTHS if c not in left_out]
        for col in columns:
            table.add_column(col, justify="right" if col in _RIGHT else "left", no_wrap=True, overflow="ellipsis",
                             width=COMPACT_WIDTHS[col])
    else:
        table = Table(title=title)
        columns = ["event time (UTC)", "type", "item", "category", "price", "events", "spend", "top category",
                   "propensity", "churn", "tier", "cluster"]
        for col in columns:
            table.add_column(col, justify="right" if col in _RIGHT else "left", no_wrap=col == "event time (UTC)")
    rows, day = tl.rows, None
    hours = f"{tl.idle_rescore_ms / 3_600_000:g}h"
    for k, row in enumerate(rows):
        e, p = row["event"], row["profile"]
        if row["kind"] == "idle" and k + 1 < len(rows) and rows[k + 1]["kind"] == "idle":
            continue  # the last of the run stands for it
        when = _when(row["at_ms"])
        top = p["top_categories"][0] if p["top_categories"] else None
        cells = {
            "events": str(sum(p["counts"].values())), "p(buy)": f"{p['purchase_propensity']:.3f}",
            "propensity": f"{p['purchase_propensity']:.3f}", "churn": f"{p['churn_risk']:.3f}",
            "tier": p["price_tier"], "cluster": str(p["interest_cluster"]),
            "time (UTC)": when.strftime("%H:%M:%S"), "event time (UTC)": when.strftime("%Y-%m-%d %H:%M:%S"),
            "spend": f"{p['spend']:.2f}" if not compact or p["spend"] < 10_000 else f"{p['spend'] / 1000:,.1f}k",
            "top category": (top["category"] if compact else f"{top['category']} ({top['score']:.2f})") if top else "-",
        }
        style = None
        if row["kind"] == "event":
            cells.update(event=SHORT_TYPES.get(e["type"], e["type"]), type=e["type"],
                         item=str(e.get("item_id") or e.get("query") or ""), category=str(e.get("category") or ""),
                         price="" if e.get("price") is None else f"{e['price']:.2f}")
        elif row["kind"] == "idle":
            run = 1
            while k - run >= 0 and rows[k - run]["kind"] == "idle":
                run += 1
            style = "dim"
            cells.update(event="idle", type="idle re-score",
                         item=(f"{run} x {hours}" if compact else f"{run} x every {hours}") if run > 1 else f"after {hours}")
        else:
            style = "dim"
            cells.update(event="end", type="end of log", item="(replay)" if compact else "replay's final")
        if compact and when.date() != day:
            day = when.date()
            table.add_row(day.isoformat(), style="bold")
        table.add_row(*(cells.get(c, "") for c in columns), style=style)
    return table


def series(rows: list[dict]) -> dict[str, list[float]]:
    """The charted scalar fields, one value per row (top_categories: see category_series)."""
    return {
        "purchase_propensity": [r["profile"]["purchase_propensity"] for r in rows],
        "churn_risk": [r["profile"]["churn_risk"] for r in rows],
        "spend": [r["profile"]["spend"] for r in rows],
        "events": [float(sum(r["profile"]["counts"].values())) for r in rows],
    }


def category_series(rows: list[dict], most: int = CHARTED_CATEGORIES) -> tuple[dict[str, list[float]], int]:
    """Score of each category that was first in a profile, per row (NaN where it was not among the
    profile's top categories), for the `most` first most often; and how many other categories were first."""
    firsts = collections.Counter(r["profile"]["top_categories"][0]["category"] for r in rows
                                 if r["profile"]["top_categories"])
    chosen = [c for c, _ in firsts.most_common(most)]
    scores = {c: [next((t["score"] for t in r["profile"]["top_categories"] if t["category"] == c), float("nan"))
                  for r in rows] for c in chosen}
    return scores, len(firsts) - len(chosen)


IDLE_LABEL = "re-published after {hours:g}h without events (idle re-score), where it moved the field"
END_LABEL = "end of the log: a replay's final profile (the clock at the log's last event)"


def figure(tl: Timeline):  # -> matplotlib.figure.Figure
    """The fields against event time, one panel each, purchases marked; the idle re-scores and the
    end-of-log profile as their own markers where they moved a field."""
    try:
        from matplotlib import dates as mdates
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure  # no pyplot: no display, no global state
        from matplotlib.lines import Line2D
    except ImportError:
        raise InspectError("--plot needs matplotlib: pip install matplotlib") from None
    rows = tl.rows
    when = [_when(r["at_ms"]) for r in rows]
    data = series(rows)
    fig = Figure(figsize=(11, 2.2 * len(CHARTED) + 0.8), layout="constrained")
    FigureCanvasAgg(fig)  # draws to PNG (and measures text, for a caller that checks the layout)
    axes = fig.subplots(len(CHARTED), 1, sharex=True, squeeze=False)[:, 0]
    buys = [w for w, r in zip(when, rows) if r["kind"] == "event" and r["event"]["type"] == EVENT_TYPES[3]]
    marks = {"idle": dict(marker="o", markersize=6, markerfacecolor="none", markeredgecolor="tab:orange",
                          linestyle="none"),
             "end": dict(marker="D", markersize=6, color="tab:red", linestyle="none")}
    drawn: set[str] = set()
    labels = {"purchase_propensity": "purchase\npropensity", "churn_risk": "churn risk",
              "top_categories": "category score\n(top 3 of each\nprofile)", "spend": "spend", "events": "events"}
    for ax, name in zip(axes, CHARTED):
        ax.set_ylabel(labels[name], fontsize=8)
        for b in buys:
            ax.axvline(b, color="tab:green", alpha=0.3, linewidth=1)
        if name == "top_categories":
            scores, others = category_series(rows)
            for (category, values), color in zip(scores.items(), CATEGORY_COLOURS):
                ax.step(when, values, where="post", label=category, color=color)
                drawn |= _mark_moves(ax, when, rows, values, marks)
            if scores:
                title = "categories first in most profiles" + (f" (+{others} more not drawn)" if others else "")
                ax.legend(title=title, title_fontsize=7, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            continue
        ax.step(when, data[name], where="post", color="tab:blue")
        drawn |= _mark_moves(ax, when, rows, data[name], marks)
    bottom = axes[-1]
    bottom.set_xlabel("event time (UTC)")
    locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    hours = tl.idle_rescore_ms / 3_600_000
    handles = [Line2D([], [], color="tab:green", alpha=0.5, label="purchase"),
               Line2D([], [], color="tab:blue", label="the profile as published (after each event and re-score)")]
    if "idle" in drawn:
        handles.append(Line2D([], [], **marks["idle"], label=IDLE_LABEL.format(hours=hours)))
    if "end" in drawn:
        handles.append(Line2D([], [], **marks["end"], label=END_LABEL))
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(f"user {tl.user}: profile fields over event time · model {tl.model_version}", fontsize=11)
    return fig


def _mark_moves(ax, when: list, rows: list[dict], values: list[float], marks: dict) -> set[str]:
    """Markers on the rows without an event (idle re-score, end of log) whose value differs from the
    profile published before; returns the kinds marked."""
    drawn = set()
    for kind in ("idle", "end"):
        xs, ys = [], []
        for k in range(1, len(rows)):
            if rows[k]["kind"] == kind and _moved(values[k - 1], values[k]):
                xs.append(when[k])
                ys.append(values[k])
        if xs:
            ax.plot(xs, ys, **marks[kind])
            drawn.add(kind)
    return drawn


def _moved(before: float, after: float) -> bool:
    if math.isnan(before) or math.isnan(after):
        return math.isnan(before) != math.isnan(after)
    return abs(after - before) > 5e-4  # visible on the panel (and in the profile's 3 decimals shown)


def plot(tl: Timeline, path: str):  # -> matplotlib.figure.Figure
    """Draw the figure to a PNG at `path`; returns the figure (its axes, labels and legends)."""
    fig = figure(tl)
    fig.savefig(path, dpi=100)
    return fig


def run_inspect(settings: Settings, sources: list[str], fmt: str, user: str, plot_path: str | None) -> None:
    if plot_path:
        check_output_dir(plot_path, "--plot")  # now, not after the replay
    tl = timeline(settings, sources, fmt, user)
    console = Console()
    if not console.is_terminal:  # piped: room for every column in full (the table is as wide as its cells)
        console = Console(width=max(console.width, PIPED_WIDTH))
    console.print(render_table(tl, console.width))
    if plot_path:
        fig = plot(tl, plot_path)
        click.echo(f"wrote {plot_path} ({len(fig.axes)} panels)", err=True)  # one line, however long the path
