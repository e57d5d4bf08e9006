"""`profiles run` as a real process: graceful SIGTERM, start-up checks, secrets kept out of output."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import orjson

from stream.generator import generate
from tests.helpers import (
    committed_offsets, create_topics, end_offsets, expected_from_events, latest_profiles, produce, profiles_command,
    published, read_topic, start_daemon, wait_until,
)


def counts(line: str, *names: str) -> list[int]:
    """The numbers before each of `names` in a summary line ("1,234 events applied" -> 1234)."""
    return [int(re.search(rf"([\d,]+) {name}", line).group(1).replace(",", "")) for name in names]


def test_sigterm_mid_stream_exits_0_and_commits_exactly_what_was_published(kafka, unique):
    log = generate(users=1000, events=20000, seed=5)
    topic, out, group = unique("events"), unique("profiles"), unique("group")
    create_topics(kafka, {topic: 4})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events])

    # Small batches so that the stream is still being worked through when SIGTERM arrives.
    proc = start_daemon(kafka, "--input-topics", topic, "--output-topic", out, "--group-id", group,
                        "--batch-max-events", "20", "--batch-max-ms", "50")
    try:
        wait_until(lambda: proc.poll() is not None or published(kafka, out) > 0, 90, "the first profiles")
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr.decode()[-2000:]

    committed = committed_offsets(kafka, group, topic)
    total = sum(end_offsets(kafka, topic).values())
    assert 0 < sum(committed.values()) < total, "SIGTERM arrived mid-stream"
    # The one-line summary counts what was committed and published: every committed record was applied.
    summary = stderr.decode().strip().splitlines()[-1]
    assert summary.startswith("stopped: ") and summary.endswith("offsets committed"), summary
    applied, profiles_out, dead = counts(summary, "events applied", "profiles published", "dead letters")
    assert applied == sum(committed.values()) and dead == 0, summary
    assert profiles_out == published(kafka, out), summary
    consumed = [orjson.loads(r.value) for r in read_topic(kafka, topic) if r.offset < committed[r.partition]]
    expected = expected_from_events(consumed)
    profiles, _ = latest_profiles(kafka, out)
    # Published profiles reflect exactly the committed events: nothing more, nothing less.
    assert set(profiles) == set(expected)
    for user, want in expected.items():
        assert profiles[user]["counts"] == {t: want["counts"].get(t, 0)
                                            for t in ("search", "click", "add_to_cart", "purchase")}
        assert round(profiles[user]["spend"] * 1e6) == want["spend_micros"]


def test_refuses_inputs_that_are_not_copartitioned_without_printing_secrets(kafka, unique, tmp_path,
                                                                          monkeypatch):
    clicks, searches = unique("clicks"), unique("searches")
    create_topics(kafka, {clicks: 2, searches: 3})
    secret, file_secret, hmac_key = "Sup3r-Secret-Value", "F1le Secret = with spaces", "hmac-K3y-value"
    config = tmp_path / "client.properties"
    config.write_text(f"# from a mounted secret\nsasl.mechanism=PLAIN\nssl.key.password={file_secret}\n")
    monkeypatch.setenv("PROFILES_PSEUDONYMIZE_KEY", hmac_key)
    proc = start_daemon(kafka, "--input-topics", f"{clicks},{searches}", "--output-topic", unique("profiles"),
                        "--kafka-config", f"sasl.password={secret}", "--kafka-config", "client.id=copart-test",
                        "--kafka-config-file", str(config))
    stdout, stderr = proc.communicate(timeout=60)
    text = (stdout + stderr).decode()
    assert proc.returncode == 1, text
    assert stdout == b"" and stderr.decode().strip().splitlines()[-1].startswith("Error: "), text  # one error line
    assert "not co-partitioned" in text and f"{clicks}=2" in text and f"{searches}=3" in text
    for value in (secret, file_secret, "F1le", hmac_key):
        assert value not in text
    assert "***" in text  # the settings line shows the key with its value redacted
    assert "sasl.mechanism" in text and "pseudonymize" in text  # ... and that the file and the key were taken


def test_missing_input_topic_is_a_clear_error(kafka, unique):
    missing, out, group = unique("nope"), unique("profiles"), unique("group")
    proc = start_daemon(kafka, "--input-topics", missing, "--output-topic", out, "--group-id", group)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr.decode()[-2000:]
    last = stderr.decode().strip().splitlines()[-1]  # the error is the last thing said, on one line
    assert stdout == b"" and last.startswith("Error: ") and f"input topic(s) not found: {missing}" in last, last
    assert published(kafka, out) == 0  # nothing published before the refusal


def test_demo_shows_profiles_and_exits_cleanly():
    """The README's first command: embedded broker, traffic, daemon and live view, stopped by --duration.
    Its log (stderr) comes in the same stream here, as on a terminal: the summary must still end it."""
    proc = subprocess.run(profiles_command() + ["demo", "--duration", "8", "--users", "100", "--rate", "1000"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = proc.stdout.decode()
    assert proc.returncode == 0, out[-2000:]
    assert "latest profiles of the busiest users" in out
    # Until the group has assigned partitions the view says so, instead of seconds of zeros.
    assert out.index("waiting for partitions") < out.index("latest profiles")
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("demo finished:"), out[-2000:]  # no broker or client noise after it
    applied, dead, profiles_out, users = counts(summary, "events applied", "dead letters", "profiles published",
                                                "users")
    assert 1000 < applied <= 1000 * 8 * 2  # events made it through the whole pipeline, at about --rate
    assert 0 < dead < applied / 50  # the demo's traffic holds 0.5% malformed records, dead-lettered
    assert 0 < users <= 100 and users <= profiles_out  # users of --users only, each with a profile out
    assert "u0" in out or "9000" in out  # user rows from the output topic
    assert max(len(line) for line in out.splitlines() if not line.startswith("20")) <= 100  # log lines aside
