"""Shared fixtures: one real Kafka-protocol broker (Tansu) per test session, and factories around it."""

from __future__ import annotations

import uuid
from typing import Callable, Iterable

import pytest

from stream.broker import EmbeddedBroker
from stream.settings import KafkaSettings, Settings
from tests import helpers
from tests.helpers import SESSION_TIMEOUT_MS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", choices=("cpu", "cuda"), default="cpu",
                     help="where the model and pipeline tests run their model and state (default: cpu). "
                          "cuda needs a GPU; tests/test_gpu.py runs on one whenever it is found.")


def pytest_configure(config: pytest.Config) -> None:
    device = config.getoption("--device")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: no CUDA GPU found (torch.cuda.is_available() is False)")
    helpers.use_device(device)  # before the test modules are imported: they read helpers.DEVICE then


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterable[EmbeddedBroker]:
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as b:
        yield b


class ReplaceableBroker:
    """A broker of its own for one test, which the test can stop and replace by an empty one on the same port."""

    def __init__(self, log_path) -> None:
        self.log_path = log_path
        self.current = EmbeddedBroker(log_path=log_path).start()
        self.port = self.current.port
        self.kafka = KafkaSettings(self.current.bootstrap_servers)

    def stop(self) -> None:
        self.current.stop()

    def start_empty(self) -> None:
        """A new broker (memory storage: no topics, no groups) where the old one listened."""
        self.current = EmbeddedBroker(port=self.port, log_path=self.log_path).start()


@pytest.fixture
def replaceable_broker(tmp_path) -> Iterable[ReplaceableBroker]:
    broker = ReplaceableBroker(tmp_path / "tansu.log")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka(broker: EmbeddedBroker) -> KafkaSettings:
    return KafkaSettings(broker.bootstrap_servers)


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Unique topic/group names, so tests sharing the session broker never see each other's data."""
    suffix = uuid.uuid4().hex[:8]
    return lambda name: f"{name}-{suffix}"


@pytest.fixture
def settings_factory(kafka: KafkaSettings, unique: Callable[[str], str]) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        base = dict(kafka=kafka, input_topics=(unique("events"),), output_topic=unique("profiles"),
                    group_id=unique("group"), batch_max_ms=100, session_timeout_ms=SESSION_TIMEOUT_MS,
                    device=helpers.DEVICE)
        base.update(overrides)
        return Settings(**base)  # type: ignore[arg-type]

    return make
