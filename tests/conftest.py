"""Shared fixtures: a launcher for the real ``twistd streamrelay`` process, and the
hypothesis settings profiles (``HYPOTHESIS_PROFILE=dev|ci|thorough``, ``ci`` by default).

A relay whose log shows a traceback (or Twisted's ``Unhandled Error`` / ``Unhandled
error in Deferred``) fails the test that started it: an exception that escaped in the
relay is a bug even when every client got the answer it expected."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

from tests.support.relay_process import RelayProcess, StartRelay, problems_report

if TYPE_CHECKING:
    from tests.fakes import LogCapture

# Launched in the background by a non-interactive shell (``cmd &``, ``nohup``), this
# process starts with SIGINT ignored, and every process it starts inherits that: the
# publishers that tests stop with SIGINT (as a user's Ctrl-C does) would then never hear
# it.  Python's own handler here gives every child the default disposition again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

_SLOW_OR_BIG = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "ci", max_examples=400, deadline=None, suppress_health_check=_SLOW_OR_BIG, print_blob=True
)
settings.register_profile("dev", max_examples=50, deadline=None, suppress_health_check=_SLOW_OR_BIG)
settings.register_profile(
    "thorough",
    max_examples=10000,
    deadline=None,
    suppress_health_check=_SLOW_OR_BIG,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def log() -> Iterator[LogCapture]:
    """The relay's log events during the test (in-process relays, ``tests.fakes``): the
    test fails if any is an unhandled error. A module applies it to every test with
    ``pytestmark = pytest.mark.usefixtures("log")``."""
    # Imported here: the process-level suites (integration, browser) need none of it.
    from tests.fakes import captured_log

    with captured_log() as capture:
        yield capture
    assert not capture.failures, capture.describe_failures()


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[StartRelay]:
    """Start relays with ``start_relay(*arguments, internals=False, ...)``; all are
    stopped at teardown, their logs kept in ``tmp_path`` and checked for tracebacks."""
    started: list[RelayProcess] = []

    def start(*arguments: str, **launch: Any) -> RelayProcess:
        relay = RelayProcess(tmp_path / f"relay-{len(started)}.log", arguments, **launch)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()
    report = problems_report(started)
    if report:
        pytest.fail(report, pytrace=False)


@pytest.fixture
def relay(start_relay: StartRelay) -> RelayProcess:
    """One relay with the production defaults (loopback, tcp:0)."""
    return start_relay()
