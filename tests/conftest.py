"""Shared fixtures: a real Mosquitto per test session, unique topics per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import MOSQUITTO_HINT, Mosquitto, find_mosquitto

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if find_mosquitto() is not None:
        return
    # Fail loudly rather than skip: a suite that silently skips its broker tests proves nothing.
    raise pytest.UsageError(MOSQUITTO_HINT)


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A plain anonymous broker on a free loopback port, shared by the session."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own, free to be stopped, killed and restarted."""
    broker = Mosquitto(tmp_path / "mosquitto")
    yield broker
    broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic root so tests sharing one broker never see each other's messages."""
    return f"t{uuid.uuid4().hex[:10]}"
