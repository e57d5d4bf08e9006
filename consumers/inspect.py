"""`profiles inspect USER`: one user's events beside how each profile field moved.

A user's state depends only on that user's events, so the inspection replays just
them, one at a time, through the daemon's pipeline: each row is the profile the
daemon would have published right after that event.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from consumers.pipeline import load_updater
from models.features import hash_buckets
from stream.events import EVENT_TYPES, RecordBatch, decode_batch
from stream.settings import Settings
from stream.sources import open_sources

# Fields charted by --plot, one panel each.
CHARTED = ("purchase_propensity", "churn_risk", "top_category_score", "spend", "events")


class InspectError(ValueError):
    """Nothing to inspect (unknown user, unreadable source)."""


def user_records(settings: Settings, sources: list[str], fmt: str, user: str) -> tuple[list[bytes], set[str]]:
    """The raw records of `user` in the sources, in source order, and every category seen in them."""
    found: list[bytes] = []
    categories: set[str] = set()
    for source, window in open_sources(settings.kafka, sources, fmt, 50_000):
        while not source.exhausted:
            batch = source.next_batch()
            events, _ = decode_batch(batch, settings.max_event_bytes)
            if window is not None:  # kafka:// ranges select by event time, as in replay
                events = events.take(window.mask(events.ts))
            mine = np.flatnonzero(events.user_id == user)
            found += [batch.values[i] for i in events.record_index[mine].tolist()]
            categories.update(c for c in events.category.tolist() if c is not None)
    return found, categories


def timeline(settings: Settings, sources: list[str], fmt: str, user: str) -> list[dict]:
    """One row per event of the user: the event and the profile published right after it."""
    records, categories = user_records(settings, sources, fmt, user)
    if not records:
        raise InspectError(f"no valid events of user {user!r} in {', '.join(sources)}")
    # In event-time order, as the pipeline orders a batch (arrival order breaks ties).
    n = len(records)
    events, _ = decode_batch(RecordBatch(["inspect"] * n, [0] * n, list(range(n)), [None] * n, records),
                             settings.max_event_bytes)
    order = events.record_index[np.lexsort((events.record_index, events.ts))].tolist()
    updater = load_updater(settings)
    # top_categories scores are shares among the categories the daemon has seen: all of the sources'.
    names = np.array(sorted(categories), dtype=object)
    cfg = updater.config
    updater.state.remember_categories(hash_buckets(names, cfg.category_buckets, cfg.hash_seed + 1), names)
    rows = []
    for i in order:
        result = updater.process(RecordBatch(["inspect"], [0], [i], [None], [records[i]]))
        event = orjson.loads(records[i])
        profile = next(orjson.loads(v) for k, v in result.profiles if k.decode() == user)
        rows.append({"event": event, "profile": profile})
    return rows


def render_table(rows: list[dict], user: str) -> Table:
    table = Table(title=f"user {user}: {len(rows)} events and the profile after each")
    for col in ("event time (UTC)", "type", "item", "category", "price", "events", "spend", "top category",
                "propensity", "churn", "tier", "cluster"):
        table.add_column(col, justify="right" if col in ("price", "events", "spend", "propensity", "churn",
                                                          "cluster") else "left")
    for row in rows:
        e, p = row["event"], row["profile"]
        when = dt.datetime.fromtimestamp(p["last_event_ts"] / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        top = p["top_categories"][0] if p["top_categories"] else None
        table.add_row(
            when, e["type"], str(e.get("item_id") or e.get("query") or ""), str(e.get("category") or ""),
            "" if e.get("price") is None else f"{e['price']:.2f}", str(sum(p["counts"].values())),
            f"{p['spend']:.2f}", f"{top['category']} ({top['score']:.2f})" if top else "-",
            f"{p['purchase_propensity']:.3f}", f"{p['churn_risk']:.3f}", p["price_tier"], str(p["interest_cluster"]),
        )
    return table


def series(rows: list[dict]) -> dict[str, list[float]]:
    """The charted fields, one value per event."""
    return {
        "purchase_propensity": [r["profile"]["purchase_propensity"] for r in rows],
        "churn_risk": [r["profile"]["churn_risk"] for r in rows],
        "top_category_score": [r["profile"]["top_categories"][0]["score"] if r["profile"]["top_categories"] else 0.0
                               for r in rows],
        "spend": [r["profile"]["spend"] for r in rows],
        "events": [float(sum(r["profile"]["counts"].values())) for r in rows],
    }


def plot(rows: list[dict], user: str, path: str) -> int:
    """A PNG with one panel per charted field against event time; purchases marked. Returns the panel count."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise InspectError("--plot needs matplotlib: pip install matplotlib") from None
    when = [dt.datetime.fromtimestamp(r["profile"]["last_event_ts"] / 1000, dt.timezone.utc) for r in rows]
    data = series(rows)
    fig, axes = plt.subplots(len(CHARTED), 1, figsize=(10, 2.1 * len(CHARTED)), sharex=True, squeeze=False)
    buys = [w for w, r in zip(when, rows) if r["event"]["type"] == EVENT_TYPES[3]]
    for ax, field in zip(axes[:, 0], CHARTED):
        ax.step(when, data[field], where="post")
        ax.set_ylabel(field.replace("_", "\n"), fontsize=8)
        for b in buys:
            ax.axvline(b, color="tab:green", alpha=0.3, linewidth=1)
    axes[0, 0].set_title(f"user {user}: profile fields after each event (green: purchases)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return len(CHARTED)


def run_inspect(settings: Settings, sources: list[str], fmt: str, user: str, plot_path: str | None) -> None:
    rows = timeline(settings, sources, fmt, user)
    console = Console()
    if not console.is_terminal:  # piped: room for every column
        console = Console(width=max(console.width, 160))
    console.print(render_table(rows, user))
    if plot_path:
        panels = plot(rows, user, plot_path)
        Console(stderr=True).print(f"wrote {plot_path} ({panels} panels)")
