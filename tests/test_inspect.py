"""`profiles inspect --plot` (issue 18): an x-axis label and dates that do not overlap, the category panel
names its categories, the model version in the title, and the idle re-scores (which move churn risk
with no event) drawn as their own markers, down to the final profile a replay writes."""

from __future__ import annotations

import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from consumers.inspect import CHARTED, END_LABEL, IDLE_LABEL, category_series, plot, render_table, timeline
from consumers.replay import replay
from stream.settings import Settings
from tests.helpers import DEVICE

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_700_000_000_000


def event(n: int, user: str, ts: int, kind: str = "click", category: str = "shoes.running", price: float = 20.0) -> dict:
    e = {"event_id": f"e{n}", "user_id": user, "type": kind, "ts": ts, "category": category}
    if kind == "search":
        e["query"] = "running shoes"
    else:
        e.update(item_id=f"i{n % 7}", price=price)
    return e


@pytest.fixture
def quiet_user_log(tmp_path):
    """`quiet` is active on day 0 and day 2.5 then goes quiet; `busy` keeps the log going to day 8.5
    (5 days and 23:57 after quiet's last event)."""
    events = []
    for i in range(12):
        kind, category = ("purchase", "books.cooking") if i == 7 else ("click", "shoes.running" if i % 3 else "books.cooking")
        events.append(event(i, "quiet", T0 + i * 60_000, kind, category))
    events += [event(100 + i, "quiet", T0 + int(2.5 * DAY) + i * 60_000, "click", "garden.tools") for i in range(4)]
    events += [event(200 + i, "busy", T0 + i * 6 * HOUR, "search" if i % 2 else "click") for i in range(35)]
    events.sort(key=lambda e: e["ts"])
    import datetime as dt

    back = next(e for e in events if e["event_id"] == "e100")  # the contract's other form of time: ISO 8601
    back["ts"] = dt.datetime.fromtimestamp(back["ts"] / 1000, dt.timezone.utc).isoformat().replace("+00:00", "Z")
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
    return path


def settings(idle_hours: float = 24) -> Settings:
    return Settings(device=DEVICE, emit_embedding=False, idle_rescore_after_ms=int(idle_hours * HOUR))


def test_the_timeline_has_the_idle_rescores_and_the_replays_final_profile(quiet_user_log, tmp_path):
    tl = timeline(settings(), [str(quiet_user_log)], "jsonl", "quiet")
    last_ts = T0 + int(2.5 * DAY) + 3 * 60_000
    log_end = T0 + 34 * 6 * HOUR
    assert tl.log_end_ms == log_end and tl.model_version.startswith("untrained-")
    # 12 events, re-scores at +1 and +2 days, 4 events, re-scores each day to the end of the log, its end.
    kinds = [r["kind"] for r in tl.rows]
    assert kinds == ["event"] * 12 + ["idle"] * 2 + ["event"] * 4 + ["idle"] * 5 + ["end"]
    idle = [r for r in tl.rows if r["kind"] == "idle"]
    assert [r["at_ms"] for r in idle] == [T0 + 11 * 60_000 + d * DAY for d in (1, 2)] + [
        last_ts + d * DAY for d in range(1, 6)]
    assert tl.rows[-1]["at_ms"] == log_end
    # No event: the counters stay, churn risk rises with each day of silence.
    after = [r["profile"] for r in tl.rows[-6:]]
    assert all(p["counts"] == tl.events[-1]["profile"]["counts"] for p in after)
    churn = [tl.events[-1]["profile"]["churn_risk"]] + [p["churn_risk"] for p in after]
    assert all(b > a for a, b in zip(churn, churn[1:])), churn
    # The end-of-log row is what a replay of the same log writes for the user (same clock, same fields).
    out = tmp_path / "replayed.jsonl"
    replay(settings(), [str(quiet_user_log)], "jsonl", str(out), None, False, None, str(tmp_path / "dlq.jsonl"),
           50_000, show_progress=False)
    replayed = next(p for p in map(orjson.loads, out.read_bytes().splitlines()) if p["user_id"] == "quiet")
    final = tl.rows[-1]["profile"]
    for name in ("churn_risk", "purchase_propensity", "spend", "counts", "price_tier", "interest_cluster"):
        assert final[name] == pytest.approx(replayed[name], abs=1e-6), name
    assert [t["category"] for t in final["top_categories"]] == [t["category"] for t in replayed["top_categories"]]
    # The table: each run of idle re-scores as one row, after the events it follows.
    table = render_table(tl)
    assert table.row_count == 16 + 2 + 1
    assert tl.model_version in str(table.title)


def test_the_plot_labels_dates_categories_version_and_marks_the_idle_rescores(quiet_user_log, tmp_path):
    tl = timeline(settings(), [str(quiet_user_log)], "jsonl", "quiet")
    png = tmp_path / "quiet.png"
    fig = plot(tl, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == len(CHARTED)
    panels = dict(zip(CHARTED, fig.axes))
    assert tl.model_version in fig.get_suptitle() and "quiet" in fig.get_suptitle()
    assert fig.axes[-1].get_xlabel() == "event time (UTC)"

    # Date tick labels on the shared axis: more than one, none overlapping another.
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [t for t in fig.axes[-1].get_xticklabels() if t.get_visible() and t.get_text()]
    assert len(ticks) >= 3
    boxes = sorted((t.get_window_extent(renderer) for t in ticks), key=lambda b: b.x0)
    assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in ticks]

    # The category panel names each category it draws (one line each), those first in most profiles.
    categories = panels["top_categories"]
    legend = categories.get_legend()
    assert legend is not None
    named = [t.get_text() for t in legend.get_texts()]
    scores, _ = category_series(tl.rows)
    assert named == list(scores) and set(named) >= {"shoes.running", "garden.tools"}
    assert [line.get_label() for line in categories.get_lines() if line.get_label() in named] == named

    # Idle re-scores and the end of the log: their own markers where they move a field, explained in the legend.
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert IDLE_LABEL.format(hours=24) in texts and END_LABEL in texts and "purchase" in texts

    def marked(ax, marker: str) -> list[tuple[float, float]]:
        return [(x, y) for line in ax.get_lines() if line.get_marker() == marker
                for x, y in zip(line.get_xdata(), line.get_ydata())]

    churn = [r["profile"]["churn_risk"] for r in tl.rows if r["kind"] == "idle"]
    assert [y for _, y in marked(panels["churn_risk"], "o")] == pytest.approx(churn)
    assert [y for _, y in marked(panels["churn_risk"], "D")] == pytest.approx([tl.rows[-1]["profile"]["churn_risk"]])
    # Re-scores move neither spend nor the event count: nothing marked there.
    assert not marked(panels["spend"], "o") and not marked(panels["events"], "o") and not marked(panels["events"], "D")


def test_without_idle_rescores_the_plot_says_nothing_about_them(quiet_user_log, tmp_path):
    tl = timeline(settings(idle_hours=0), [str(quiet_user_log)], "jsonl", "quiet")
    assert [r["kind"] for r in tl.rows] == ["event"] * 16 + ["end"]
    texts = [t.get_text() for legend in plot(tl, str(tmp_path / "q.png")).legends for t in legend.get_texts()]
    assert not any("idle" in t for t in texts) and END_LABEL in texts


def test_inspect_command_draws_the_plot_and_reports_its_panels(quiet_user_log, tmp_path):
    png = tmp_path / "cli.png"
    result = CliRunner().invoke(main, ["inspect", "quiet", "--events", str(quiet_user_log), "--plot", str(png),
                                       "--idle-rescore-after", "2d", "--device", DEVICE])
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 10_000 and f"({len(CHARTED)} panels)" in result.output
    assert "idle re-score" in result.output and "after 48h" in result.output and "end of log" in result.output


@pytest.mark.parametrize("span_hours", [5, 60, 24 * 20, 24 * 30, 24 * 45, 24 * 60, 24 * 120, 24 * 400])
def test_date_labels_never_overlap_whatever_the_span(span_hours, tmp_path):
    from consumers.inspect import Timeline

    def profile(i: int) -> dict:
        return {"counts": {"search": 0, "click": i, "add_to_cart": 0, "purchase": 0}, "spend": 0.0,
                "purchase_propensity": 0.5, "churn_risk": 0.1, "price_tier": "mid", "interest_cluster": 0,
                "top_categories": [{"category": "shoes.running", "score": 0.5}]}

    n = 50
    at = [T0 + round(i * span_hours * HOUR / (n - 1)) for i in range(n)]
    tl = Timeline("u1", "gru-test", 0, at[-1], [
        {"kind": "event", "at_ms": t, "event": event(i, "u1", t), "profile": profile(i)} for i, t in enumerate(at)])
    fig = plot(tl, str(tmp_path / "span.png"))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks = [t for t in fig.axes[-1].get_xticklabels() if t.get_visible() and t.get_text()]
    boxes = sorted((t.get_window_extent(renderer) for t in ticks), key=lambda b: b.x0)
    assert len(boxes) >= 3 and all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in ticks]


@pytest.mark.parametrize("width, absent", [(100, ["tier", "premium", "budget"]), (80, ["tier", "price", "19.99"])])
def test_the_table_fits_a_terminal_of_100_or_80_columns(quiet_user_log, width, absent):
    import io

    from rich.console import Console

    tl = timeline(settings(), [str(quiet_user_log)], "jsonl", "quiet")
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(render_table(tl, console.width))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    header = next(line for line in lines if line.startswith("time (UTC)"))
    for word in absent:
        assert word not in header.split() and word not in text.split()
    # A row per day above its times; every event, each run of idle re-scores (its last) and the end of the log.
    shown = [r for k, r in enumerate(tl.rows) if r["kind"] != "idle" or k + 1 == len(tl.rows)
             or tl.rows[k + 1]["kind"] != "idle"]
    days = [d for k, d in enumerate(_days(shown)) if k == 0 or d != _days(shown)[k - 1]]
    assert [line.split()[0] for line in lines if line[:4] == "2023"] == days
    kinds = [line.split()[1] for line in lines if line[:2].isdigit() and line[2] == ":"]
    assert kinds.count("click") + kinds.count("buy") == 16 and kinds.count("idle") == 2 and kinds[-1] == "end"
    assert "5 x 24h" in text and "garden.tools" in text and f"{tl.rows[-1]['profile']['churn_risk']:.3f}" in text


def _days(rows: list[dict]) -> list[str]:
    import datetime as dt

    return [dt.datetime.fromtimestamp(r["at_ms"] / 1000, dt.timezone.utc).date().isoformat() for r in rows]
