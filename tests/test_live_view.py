"""The live view of `profiles demo` (issue 18): readable at 100 columns (and at 80), whole values, a
waiting state until the daemon has partitions, and log lines printed above the view, not through it."""

from __future__ import annotations

import io
import logging
import threading

import orjson
import pytest
from rich.console import Console

from consumers.daemon import DaemonStats
from consumers.demo import Frame, LiveView, _screen, compact, milliseconds, render
from stream.generator import generate
from tests.helpers import create_topics, produce, wait_until


def profile(user: str, category: str, spend: float, clicks: int = 1259) -> dict:
    return {"user_id": user, "counts": {"search": 105, "click": clicks, "add_to_cart": 103, "purchase": 69},
            "spend": spend, "top_categories": [{"category": category, "score": 0.41}],
            "purchase_propensity": 0.98, "churn_risk": 0.004, "price_tier": "premium", "interest_cluster": 7}


def busy_frame(n_profiles: int = 6) -> Frame:
    """A frame of a busy demo, with the numbers that wrapped or were cut before: 30,999 and 21,375.42."""
    stats = DaemonStats(records=31_100, events=30_999, dead_letters=110, profiles=2_099)
    stats.batch_seconds.extend([0.053] * 98 + [2.4911] * 2)
    names = ["electronics.accessories", "grocery.coffee", "computers.peripherals", "beauty.fragrance",
             "sports.camping", "home.lighting"]
    profiles = [profile(f"u00010{i}", names[i % len(names)], 21_375.42 if i == 0 else 516.09)
                for i in range(n_profiles)]
    return Frame("running", 12.0, 2_071.4, stats, users=300, produced=31_234, partitions=4,
                 group_id="profiles-demo", profiles=profiles)


def text_of(renderable: object, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


@pytest.mark.parametrize("value, shown", [
    (0, "0"), (950, "950"), (999.4, "999"), (999.6, "1.0k"), (30_999, "31.0k"), (999_960, "1.0M"),
    (2_500_000, "2.5M"), (21_375.42, "21.4k"),
])
def test_numbers_are_compact(value, shown):
    assert compact(value) == shown


def test_latencies_are_compact():
    assert [milliseconds(x) for x in (2.61, 53.1, 2491.1)] == ["2.6 ms", "53 ms", "2.5 s"]


def test_a_busy_frame_fits_100_columns_with_every_value_whole():
    lines = text_of(render(busy_frame(), 100, 40), 100)
    assert max(len(line) for line in lines) <= 100
    text = "\n".join(lines)
    assert "…" not in text, text  # nothing cut
    stats = [line for line in lines if "applied" in line or "profiles out" in line]
    assert len(stats) == 2, text  # the stats in two rows of label-value pairs, not wrapped over three
    for value in ("31.0k", "2.1k", "110", "300", "31.2k", "53 ms", "2.5 s", "21.4k", "1.3k",
                  "electronics.accessories", "computers.peripherals", "0.980", "0.004", "premium"):
        assert value in text, value
    header = next(line for line in lines if line.startswith("user"))
    assert header.split() == ["user", "search", "click", "cart", "buy", "spend", "top", "category", "p(buy)",
                              "churn", "tier", "cluster"]
    assert sum(line.startswith("u00010") for line in lines) == 6


def test_at_80_columns_the_table_drops_tier_and_cluster_and_keeps_the_rest_whole():
    lines = text_of(render(busy_frame(), 80, 40), 80)
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text, text
    assert "tier" not in text and "premium" not in text
    for value in ("31.0k", "21.4k", "electronics.accessories", "0.980", "0.004", "2.5 s"):
        assert value in text, value


def test_a_short_terminal_gets_fewer_user_rows_not_a_frame_taller_than_the_screen():
    lines = text_of(render(busy_frame(), 100, 12), 100)
    assert len(lines) <= 12 and sum(line.startswith("u00010") for line in lines) >= 1


def test_the_waiting_state_says_so_instead_of_showing_zeros():
    frame = Frame("waiting", 2.4, 0.0, DaemonStats(), users=0, produced=4_100, partitions=0,
                  group_id="profiles-demo")
    text = "\n".join(text_of(render(frame, 100), 100))
    assert "waiting for partitions" in text and "profiles-demo" in text and "4.1k events produced" in text
    assert "applied" not in text and "latest profiles" not in text


def test_the_view_waits_for_partitions_until_the_daemon_has_them(kafka, settings_factory):
    from consumers.daemon import ProfileDaemon
    from models.update_step import load_updater
    from stream.metrics import Metrics

    settings = settings_factory()
    topic = settings.input_topics[0]
    create_topics(kafka, {topic: 2})
    events = generate(users=20, events=300, seed=5).events
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events])
    stop = threading.Event()
    daemon = ProfileDaemon(settings, load_updater(settings), Metrics(), stop)
    view = LiveView(daemon, None, produced=lambda: len(events))
    seen: list[tuple[str, bool]] = []  # (phase, partitions assigned when the frame was made)

    def look() -> bool:
        assigned = daemon.stats.assigned_at is not None
        frame = view.frame()
        seen.append((frame.phase, assigned))
        return frame.phase == "running" and frame.stats.events == len(events)

    assert not look() and seen == [("waiting", False)]
    text = "\n".join(text_of(render(view.frame(), 100), 100))
    assert "waiting for partitions" in text and "300 events produced" in text and "applied" not in text
    errors: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run(daemon, errors), daemon=True)
    thread.start()
    try:
        wait_until(lambda: look() or bool(errors), 60, "the view to show the daemon's events", interval_s=0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors
    # Waiting until the partitions came, never "running" before them; then the numbers.
    assert all(phase == "waiting" for phase, assigned in seen if not assigned)
    assert ("waiting", False) in seen and seen[-1][0] == "running"
    text = "\n".join(text_of(render(view.frame(), 100), 100))
    assert "waiting" not in text and "applied" in text and "300" in text


def _run(daemon, errors: list[BaseException]) -> None:
    try:
        daemon.run()
    except BaseException as exc:  # surfaced in the test thread
        errors.append(exc)


def test_log_lines_on_a_terminal_are_printed_above_the_live_view_not_through_it():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stderr = Terminal()
    handler = logging.StreamHandler(stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100, height=30, color_system=None)
    try:
        with _screen(console) as show:
            show(busy_frame(), False)
            logging.getLogger("consumers.daemon").warning("restored 12 users of partition(s) [0, 1]")
            show(busy_frame(), True)
    finally:
        root.removeHandler(handler)
    assert stderr.getvalue() == ""  # nothing written past the display (it left a stale frame per line)
    assert "restored 12 users of partition(s) [0, 1]" in screen.getvalue()
    assert handler.stream is stderr  # given back after the view
