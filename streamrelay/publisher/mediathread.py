"""What the publisher's media threads share: start, idle wait, end report.

The capture (:mod:`.pipeline`), source (:mod:`.remux`) and audio (:mod:`.audio`) pipelines
each run one daemon thread, wait in it while the publisher is idle on demand, and report
its end to the reactor thread through a Deferred.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from .client import Readiness

#: The longest an idle thread sleeps before it looks at the sink again unwoken.
IDLE_RECHECK_SECONDS = 1.0


class _Closeable(Protocol):
    def close(self) -> None: ...


class _HasReadiness(Protocol):
    @property
    def readiness(self) -> Readiness: ...


def start_daemon(
    thread: threading.Thread | None, target: Callable[[], None], name: str, what: str
) -> threading.Thread:
    """Start ``target`` in a daemon thread (a read that blocks forever must not keep the
    process alive); ``thread`` is the one already started, if any (``what`` names it in
    the error)."""
    if thread is not None:
        raise RuntimeError(f"{what} already started")
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def join(thread: threading.Thread | None, timeout: float | None) -> bool:
    """Wait for ``thread`` (None: never started); True if it has ended."""
    if thread is None:
        return True
    thread.join(timeout)
    return not thread.is_alive()


def wait_while_idle(
    sink: _HasReadiness,
    stop: threading.Event,
    wake: threading.Event,
    poll: Callable[[], None] | None = None,
) -> None:
    """Return once the sink is no longer IDLE, or on a stop.

    ``wake`` is set to look again at once (the publisher turned active, or stop); the
    recheck timeout is a safety net. ``poll``, when given, runs instead of the sleep (a
    source that must be read on while idle).
    """
    while not stop.is_set():
        wake.clear()  # before the check: a wake-up after it is not lost
        if sink.readiness is not Readiness.IDLE:
            break
        if poll is not None:
            poll()
            continue
        wake.wait(IDLE_RECHECK_SECONDS)


def close_and_report(
    reactor: Any,
    finished: defer.Deferred[None],
    outcome: Failure | None,
    *parts: _Closeable,
) -> None:
    """Close a thread's ``parts`` and report its end (``outcome``, or a failure to close)
    to ``finished`` in the reactor thread. Called last in the thread."""
    try:
        for part in parts:
            part.close()
    except Exception:
        outcome = outcome or Failure()
    reactor.callFromThread(report_finished, finished, outcome)


def report_finished(finished: defer.Deferred[None], outcome: Failure | None) -> None:
    """Fire ``finished`` with ``outcome`` (once: a later report is passed over). Reactor
    thread."""
    if finished.called:
        return
    if outcome is None:
        finished.callback(None)
    else:
        finished.errback(outcome)


__all__ = [
    "IDLE_RECHECK_SECONDS",
    "close_and_report",
    "join",
    "report_finished",
    "start_daemon",
    "wait_while_idle",
]
