"""`profiles bench`: the figures it prints come from a real run of both consumers over every event."""

from __future__ import annotations

import time

import orjson
import pytest
from click.testing import CliRunner

from consumers.bench import bench_brokers, generated_records
from consumers.cli import main
from stream.generator import generate
from stream.kafka import BrokerUnreachable, check_reachable
from stream.settings import KafkaSettings


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


def test_bench_without_a_broker_prints_the_scaling_table(caplog):
    result = CliRunner().invoke(main, ["--log-level", "WARNING", "bench", "--no-broker", "--events", "4000",
                                       "--users", "400", "--batch-max-events", "1000",
                                       "--scaling-users", "1000,20000"])
    assert result.exit_code == 0, result.output
    assert "model step (no broker)" in result.output
    # bench has no --model: its untrained model is no mistake to warn of
    assert not [r for r in caplog.records if "no --model given" in r.getMessage()]
    table = [row.split() for row in result.output[result.output.index("users in state"):].splitlines()[1:]]
    rows = [row for row in table if row and row[0][0].isdigit()]
    assert [row[0] for row in rows] == ["1,000", "20,000"]
    assert all(float(row[1].replace(",", "")) > 0 for row in rows)  # step events/s


def test_scattered_traffic_gives_nearly_every_event_of_a_batch_its_own_user():
    sessions, scattered = (generated_records(4000, 4000, 0, start_ts_ms=1_700_000_000_000, traffic=t)
                           for t in ("sessions", "scattered"))
    events = [orjson.loads(v) for _, v in scattered]
    # The same events in the same (event-time) order, each keyed by its new user (the partitioning policy).
    assert [{k: v for k, v in e.items() if k != "user_id"} for e in events] == \
        [{k: v for k, v in orjson.loads(v).items() if k != "user_id"} for _, v in sessions]
    assert all(key == e["user_id"].encode() for (key, _), e in zip(scattered, events))

    def users_per_event(recs: list) -> list[float]:  # per 1000-event batch
        users = [orjson.loads(v)["user_id"] for _, v in recs]
        return [len(set(map(str, users[i:i + 1000]))) / 1000 for i in range(0, len(users), 1000)]
    # 1000 draws among 4000 users: ~885 distinct; the generator's sessions: fewer than half that.
    assert min(users_per_event(scattered)) > 0.85 > 0.5 > max(users_per_event(sessions))


def test_bench_without_a_broker_takes_scattered_traffic():
    result = CliRunner().invoke(main, ["--log-level", "WARNING", "bench", "--no-broker", "--events", "2000",
                                       "--users", "2000", "--traffic", "scattered", "--scaling-users", "", "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.output.strip().splitlines()[-1])
    assert report["traffic"] == "scattered" and report["model_step_events_per_s"] > 0
    assert report["users"] > 1150  # 2,000 draws among 2,000 users: ~1,264 distinct (2000 * (1 - 1/e))


def test_bench_times_a_restore_of_every_user(kafka):
    result = CliRunner().invoke(main, ["--log-level", "WARNING", "bench", "--restore-users", "5000",
                                       "--bootstrap-servers", kafka.bootstrap_servers, "--json"])
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.output.strip().splitlines()[-1])
    assert report["users"] == 5000 and report["restore_seconds"] > 0  # the bench asserts all 5000 came back


def test_bench_takes_the_kafka_options_from_a_file_and_the_flags(kafka, tmp_path):
    """The shared Kafka group: a properties file and --kafka-config entries are taken (librdkafka accepts
    them in every client of a real restore run)."""
    (tmp_path / "client.properties").write_text("# mounted\nclient.id = bench-from-file\n")
    result = CliRunner().invoke(main, ["--log-level", "WARNING", "bench", "--restore-users", "2000",
                                       "--partitions", "1", "--bootstrap-servers", kafka.bootstrap_servers,
                                       "--kafka-config-file", str(tmp_path / "client.properties"),
                                       "--kafka-config", "client.id=bench-from-flag", "--json"])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output.strip().splitlines()[-1])["users"] == 2000


def test_bench_applies_kafka_config_to_its_clients(kafka):
    """An entry that changes how clients connect reaches them: TLS against the plaintext test broker is
    one clear line and exit 1, within --connect-timeout, instead of a bench."""
    started = time.monotonic()
    result = CliRunner().invoke(main, ["bench", "--events", "1000", "--bootstrap-servers", kafka.bootstrap_servers,
                                       "--kafka-config", "security.protocol=SSL", "--connect-timeout", "2s"])
    assert result.exit_code == 1, result.output
    assert f"no Kafka broker reachable at {kafka.bootstrap_servers} within 2s" in result.output
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("args, message", [
    (["--kafka-config", "s3cret-without-equals"], "--kafka-config expects KEY=VALUE"),
    (["--kafka-config", "=s3cret"], "--kafka-config expects KEY=VALUE"),
    (["--kafka-config-file", "/nonexistent/client.properties"], "cannot read --kafka-config-file"),
])
def test_a_bad_kafka_option_is_a_usage_error_before_any_broker_starts(args, message):
    result = CliRunner().invoke(main, ["bench", "--restore-users", "1000", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "s3cret" not in result.output  # what may be a secret is never echoed


def test_without_bootstrap_servers_bench_starts_an_embedded_broker_and_keeps_the_client_properties():
    extra = (("client.id", "bench-embedded"),)
    with bench_brokers(KafkaSettings(None, extra)) as brokers:  # no --bootstrap-servers
        assert brokers.extra == extra and brokers.bootstrap_servers
        check_reachable(brokers, 10)  # a broker answers there while the bench runs
    with pytest.raises(BrokerUnreachable):
        check_reachable(brokers, 1)  # and is stopped after it


def test_with_bootstrap_servers_bench_uses_them_as_given(kafka):
    given = KafkaSettings(kafka.bootstrap_servers, (("client.id", "bench-given"),))
    with bench_brokers(given) as brokers:
        assert brokers is given


def test_soak_reports_memory_while_users_come_go_and_expire(kafka):
    result = CliRunner().invoke(main, ["bench", "--soak", "8s", "--soak-rate", "2000", "--users", "4000",
                                       "--soak-report-every", "3s", "--partitions", "2", "--json",
                                       "--bootstrap-servers", kafka.bootstrap_servers])
    assert result.exit_code == 0, result.output
    samples = orjson.loads(result.stdout.strip().splitlines()[-1])
    assert len(samples) >= 3 and samples[0]["events"] == 0 and samples[-1]["events"] == 16_000
    last = samples[-1]
    assert last["event_day"] > 700  # event time covered the two years
    # Users who left were expired (30 days idle): the state holds only the recent ones. The last sample is taken
    # once the input went quiet, so those the last batch left idle are gone too, however big that batch was (a
    # busy machine's: sampled straight after it, 1,015 users were still held).
    assert last["users_expired"] > 2000 and last["users_in_state"] < 500
    assert all(s["rss_mib"] > 0 for s in samples)
