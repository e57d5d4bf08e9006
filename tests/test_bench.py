"""`profiles bench`: the figures it prints come from a real run of both consumers over every event."""

from __future__ import annotations

import orjson
from click.testing import CliRunner

from consumers.cli import main
from stream.generator import generate


def test_bench_on_the_broker_reports_both_rates_and_latencies(kafka):
    result = CliRunner().invoke(main, ["--log-level", "WARNING", "bench", "--events", "3000", "--users", "300",
                                       "--batch-max-events", "500", "--bootstrap-servers", kafka.bootstrap_servers,
                                       "--partitions", "2", "--offered-rate", "1000", "--offered-seconds", "2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.output.strip().splitlines()[-1])
    # Every generated event went through the pipeline: the state holds exactly the log's users.
    assert report["users"] == len({str(e["user_id"]) for e in generate(users=300, events=3000, seed=0).events})
    assert report["pipeline_events_per_s"] > 0 and report["raw_events_per_s"] > 0
    assert abs(report["ratio"] - report["pipeline_events_per_s"] / report["raw_events_per_s"]) < 1e-9
    assert 0 < report["p50_batch_ms"] <= report["p99_batch_ms"]
    assert report["device"] == "cpu" and report["state_bytes"] > 0
    assert report["dead_letters"] == 0  # generated traffic is valid: every event took the full path
    assert set(report["stage_share"]) == {"decode", "model", "encode", "publish", "commit"}
    assert report["offered_events_per_s"] == 1000 and report["offered_p99_batch_ms"] > 0


def test_bench_without_a_broker_prints_the_scaling_table():
    result = CliRunner().invoke(main, ["--log-level", "WARNING", "bench", "--no-broker", "--events", "4000",
                                       "--users", "400", "--batch-max-events", "1000",
                                       "--scaling-users", "1000,20000"])
    assert result.exit_code == 0, result.output
    assert "model step (no broker)" in result.output
    table = [row.split() for row in result.output[result.output.index("users in state"):].splitlines()[1:]]
    rows = [row for row in table if row and row[0][0].isdigit()]
    assert [row[0] for row in rows] == ["1,000", "20,000"]
    assert all(float(row[1].replace(",", "")) > 0 for row in rows)  # step events/s


def test_bench_times_a_restore_of_every_user(kafka):
    result = CliRunner().invoke(main, ["--log-level", "WARNING", "bench", "--restore-users", "5000",
                                       "--bootstrap-servers", kafka.bootstrap_servers, "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.output.strip().splitlines()[-1])
    assert report["users"] == 5000 and report["restore_seconds"] > 0  # the bench asserts all 5000 came back
