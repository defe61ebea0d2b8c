"""Shared fixtures: a launcher for the real ``twistd streamrelay`` process."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from relay_process import RelayProcess  # noqa: E402


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[Callable[..., RelayProcess]]:
    """Start relays with ``start_relay(arguments=[...])``; all are stopped at teardown
    and their logs are kept in ``tmp_path``."""
    started: list[RelayProcess] = []

    def start(*arguments: str, **keywords: object) -> RelayProcess:
        index = len(started)
        relay = RelayProcess(tmp_path / f"relay-{index}.log", list(arguments), **keywords)  # type: ignore[arg-type]
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(start_relay: Callable[..., RelayProcess]) -> RelayProcess:
    """One relay with the production defaults (loopback, tcp:0)."""
    return start_relay()
