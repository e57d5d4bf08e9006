from __future__ import annotations

import pytest

from stream.settings import KafkaSettings, Settings, parse_kafka_config


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
