from __future__ import annotations

import pytest

from stream.settings import KafkaSettings, Settings, parse_kafka_config, split_kafka_config_env


def test_secrets_never_appear_in_reprs():
    extra = parse_kafka_config(["security.protocol=SASL_SSL", "sasl.username=svc", "sasl.password=hunter2",
                                "ssl.key.password=k3y", "sasl.oauthbearer.client.secret=s3"])
    settings = Settings(kafka=KafkaSettings("b:9093", extra))
    printed = repr(settings) + str(settings.describe()) + str(settings.kafka)
    for secret in ("hunter2", "k3y", "s3"):
        assert secret not in printed
    assert "SASL_SSL" in printed and "svc" in printed
    # The real config still carries them for librdkafka.
    assert settings.kafka.client_config()["sasl.password"] == "hunter2"


def test_pipeline_overrides_win_over_user_extras():
    kafka = KafkaSettings("b:9092", parse_kafka_config(["enable.auto.commit=true"]))
    assert kafka.client_config(**{"enable.auto.commit": False})["enable.auto.commit"] is False


def test_user_extras_win_over_tuning_defaults():
    """A consumer's tuning (fetch.queue.backoff.ms) is a default the user's --kafka-config may change."""
    from stream.kafka import FETCH_WITHOUT_STALLS

    plain = KafkaSettings("b:9092")
    assert plain.client_config(FETCH_WITHOUT_STALLS)["fetch.queue.backoff.ms"] == 10
    tuned = KafkaSettings("b:9092", parse_kafka_config(["fetch.queue.backoff.ms=250", "enable.auto.commit=true"]))
    conf = tuned.client_config(FETCH_WITHOUT_STALLS, **{"enable.auto.commit": False})
    assert conf["fetch.queue.backoff.ms"] == "250" and conf["enable.auto.commit"] is False


def test_malformed_kafka_config_does_not_echo_the_value():
    with pytest.raises(ValueError) as err:
        parse_kafka_config(["sasl.passwordhunter2"])
    assert "hunter2" not in str(err.value)


def test_validation_messages():
    assert Settings().dead_letter_topic == "profiles.dlq"
    with pytest.raises(ValueError, match="must differ"):
        Settings(input_topics=("a",), output_topic="a").validate()
    with pytest.raises(ValueError, match="batch-max-events"):
        Settings(batch_max_events=0).validate()
    with pytest.raises(ValueError, match="--restore-from cannot be combined with --repartition"):
        Settings(repartition=True, restore_from="snap").validate()
    with pytest.raises(ValueError, match="must differ"):  # the internal topic is an input too
        Settings(repartition=True, group_id="g", output_topic="g.repartition").validate()
    # A dead-letter or state topic that is the output topic would put raw input or changelog records where
    # readers take every record for a profile.
    with pytest.raises(ValueError, match="--output-topic and --dlq-topic are both 'p'"):
        Settings(output_topic="p", dlq_topic="p").validate()
    with pytest.raises(ValueError, match="--dlq-topic and --state-topic are both 'x'"):
        Settings(dlq_topic="x", state_topic="x").validate()
    with pytest.raises(ValueError, match="--output-topic and --state-topic are both 'g.state'"):
        Settings(group_id="g", output_topic="g.state").validate()
    repartitioned = Settings(input_topics=("a", "b"), group_id="g", repartition=True)
    assert repartitioned.state_topics == ("g.repartition",)
    assert repartitioned.subscribed_topics == ("a", "b", "g.repartition")


@pytest.mark.parametrize("key", ["sasl.password", "sasl.pasword", "sasl.passwd", "ssl.key.password",
                                 "sasl.oauthbearer.config", "sasl.oauthbearer.client.secret", "sasl.jaas.config",
                                 "my.api.token", "ssl.keystore.password", "ssl.key.pem", "db_pwd", "x.credentails",
                                 "SASL.PASSWORD", "client.secert"])
def test_anything_that_looks_like_a_secret_name_is_masked(key):
    kafka = KafkaSettings("b:9093", ((key, "hunter2 sp4ce"),))
    assert "hunter2" not in str(kafka) and "sp4ce" not in str(kafka)
    assert kafka.redacted()[key] == "***"


@pytest.mark.parametrize("key", ["security.protocol", "sasl.mechanism", "sasl.username", "linger.ms",
                                 "bootstrap.servers", "client.id", "socket.keepalive.enable"])
def test_ordinary_properties_stay_readable(key):
    assert KafkaSettings("b", ((key, "v"),)).redacted()[key] == "v"


def test_the_environment_form_keeps_quoted_values_with_spaces_whole():
    entries = split_kafka_config_env('security.protocol=SASL_SSL sasl.password="correct horse=battery" '
                                     "sasl.oauthbearer.config='principal=a secret=b'")
    assert parse_kafka_config(entries) == (("security.protocol", "SASL_SSL"),
                                           ("sasl.password", "correct horse=battery"),
                                           ("sasl.oauthbearer.config", "principal=a secret=b"))
    with pytest.raises(ValueError) as err:
        split_kafka_config_env('sasl.password="hunter2 unclosed')
    assert "hunter2" not in str(err.value)


def test_error_messages_are_scrubbed_of_secret_values_and_their_words():
    kafka = KafkaSettings("b", (("sasl.password", "correct horse battery"), ("sasl.username", "svc")))
    text = kafka.scrub('Invalid value "correct horse battery" (near "horse"), user svc')
    assert "correct" not in text and "horse" not in text and "battery" not in text and "svc" in text


def test_run_never_prints_a_secret_from_the_environment(tmp_path):
    """PROFILES_KAFKA_CONFIG with a password holding spaces and '=', a misspelt secret name and an
    oauthbearer config: the settings line and the error (librdkafka refuses the misspelt name) show none."""
    import os
    import subprocess

    from tests.helpers import profiles_command

    env = dict(os.environ, PROFILES_KAFKA_CONFIG=(
        'security.protocol=PLAINTEXT sasl.password="correct horse=battery staple" sasl.pasword=hunter2 '
        "sasl.oauthbearer.config='principal=zq7user secret=s3cr3tvalue'"))
    done = subprocess.run(profiles_command() + ["--log-level", "debug", "run", "--untrained", "--bootstrap-servers",
                                                "127.0.0.1:9", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=120)
    printed = done.stdout + done.stderr
    assert done.returncode == 1, printed
    assert "settings:" in printed and "sasl.pasword" in printed  # the line was logged, the name shown
    for secret in ("correct", "horse", "battery", "staple", "hunter2", "s3cr3tvalue", "zq7user"):
        assert secret not in printed, secret
