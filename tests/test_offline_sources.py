"""The offline readers (train, calibrate, evaluate-fields) take the replay's sources: a Kafka topic's range
is read as the same events in a file are."""

from __future__ import annotations

import orjson
import pytest
from click.testing import CliRunner

from consumers.cli import main
from models.dataset import load_events, read_records
from stream.generator import generate, write_jsonl
from stream.sources import SourceError
from tests.helpers import create_topics, produce


@pytest.fixture(scope="module")
def shop_log(tmp_path_factory):
    log = generate(users=300, events=12_000, seed=21, span_days=40)
    path = tmp_path_factory.mktemp("offline") / "shop.jsonl"
    write_jsonl(log.events, path)
    return log, path


def test_a_topic_range_is_read_as_the_same_events_in_a_file(kafka, unique, shop_log, tmp_path):
    log, path = shop_log
    topic = unique("history")
    create_topics(kafka, {topic: 2})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events])
    whole = load_events([f"kafka://{topic}"], kafka=kafka)
    from_file = load_events([path])
    assert len(whole) == len(from_file) == len(log.events)
    assert (whole.users == from_file.users).all() and (whole.events.ts == from_file.events.ts).all()
    assert (whole.events.event_id == from_file.events.event_id).all()
    # ?from=&to= keeps the events whose event time is in [from, to), as the replay does.
    ts = sorted(e["ts"] for e in log.events)
    start, end = ts[2_000], ts[9_000]
    part = load_events([f"kafka://{topic}?from={start}&to={end}"], kafka=kafka)
    assert len(part) == sum(start <= t < end for t in ts)
    assert part.events.ts.min() >= start and part.events.ts.max() < end
    with pytest.raises(SourceError, match="--bootstrap-servers"):
        read_records([f"kafka://{topic}"])


def test_evaluate_fields_and_calibrate_read_the_topic_the_daemon_reads(kafka, unique, shop_log, tmp_path):
    """The same report from a one-partition topic (the file's order) as from the file, through the CLI."""
    log, path = shop_log
    topic = unique("events")
    create_topics(kafka, {topic: 1})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events])
    brokers = ["--bootstrap-servers", kafka.bootstrap_servers]

    def report(*source: str) -> dict:
        result = CliRunner().invoke(main, ["evaluate-fields", "--model", "demo", "--json", "--events", *source,
                                           *brokers])
        assert result.exit_code == 0, result.output
        return orjson.loads(result.stdout)

    from_topic, from_file = report(f"kafka://{topic}"), report(str(path))
    assert from_topic["fields"] == from_file["fields"] and from_topic["cut"] == from_file["cut"]

    def calibrated(source: str, out: str) -> dict:
        result = CliRunner().invoke(main, ["calibrate", "--model", "demo", "--events", source, "--out",
                                           str(tmp_path / out), *brokers])
        assert result.exit_code == 0, result.output
        from models.checkpoint_io import load_checkpoint

        report = load_checkpoint(str(tmp_path / out)).metadata["calibrations"][-1]["report"]
        assert report.pop("seconds") > 0 and report["examples"] > 0
        return report

    assert calibrated(f"kafka://{topic}", "topic.pt") == calibrated(str(path), "file.pt")


def test_evaluate_reads_its_train_and_test_events_from_topic_ranges(kafka, unique, shop_log, tmp_path):
    """`profiles evaluate --train-events kafka://T?to=X --events kafka://T?from=X` judges the same next events as
    the two files cut at X."""
    log, _ = shop_log
    topic = unique("clicks")
    create_topics(kafka, {topic: 2})
    produce(kafka, topic, [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in log.events])
    middle = sorted(e["ts"] for e in log.events)[9_000]
    write_jsonl([e for e in log.events if e["ts"] < middle], tmp_path / "train.jsonl")
    write_jsonl([e for e in log.events if e["ts"] >= middle], tmp_path / "test.jsonl")

    def results(train: str, test: str) -> dict:
        result = CliRunner().invoke(main, ["evaluate", "--model", "demo", "--train-events", train, "--events", test,
                                           "--json", "--bootstrap-servers", kafka.bootstrap_servers])
        assert result.exit_code == 0, result.output
        report = orjson.loads(result.stdout)
        return {name: {k: v for k, v in scores.items() if k != "seconds"} for name, scores in report["results"].items()}

    from_topic = results(f"kafka://{topic}?to={middle}", f"kafka://{topic}?from={middle}")
    assert from_topic == results(str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl"))
    assert from_topic["gru"]["item_targets"] > 0
