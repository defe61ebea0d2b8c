"""The relay's log: rate-limited at the source, and JSON lines for log shippers.

- :data:`limited` is the observer every relay logger emits through
  (``Logger(observer=limited)``).  Each message of the relay is a kind (its namespace and
  format string); each kind may log ``--log-rate`` lines a second with bursts of ten
  seconds' worth, so a storm of bad clients cannot fill a disk.  Lines over the rate are
  counted, and one warning per kind says how many were suppressed: before the kind's next
  line that gets through, or at the latest when :meth:`RateLimitedObserver.flush` runs
  (every :data:`FLUSH_SECONDS`).  Errors and tracebacks always get through.  The limit
  holds while a :class:`LogLimitService` runs (the relay's service has one); otherwise
  nothing is limited.
- :func:`event_as_json` renders an event as one flat JSON object (``time``, ``level``,
  ``namespace``, ``message``, then the event's own fields, ``traceback`` for failures);
  :func:`json_observer` writes such lines to standard output, and works as twistd's
  ``--logger streamrelay.logs.json_observer`` for any twistd application.

Nothing the relay logs carries a token: paths are logged without their query string and
no header value is logged.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from zope.interface import implementer

# How often the relay's service writes the summaries of suppressed lines.
FLUSH_SECONDS = 10.0

# Keys of events bridged from the legacy twisted.python.log API: already in "message".
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})
_MAX_DEPTH = 4


@implementer(ILogObserver)
class RateLimitedObserver:
    """Forwards events to ``downstream`` within a token bucket per kind of line."""

    def __init__(self, downstream: ILogObserver | None = None) -> None:
        self._downstream: ILogObserver = (
            downstream if downstream is not None else globalLogPublisher
        )
        self.rate = 0.0
        self.burst = 0.0
        self._now: Callable[[], float] = time.monotonic
        # kind -> (tokens, time of last update)
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._summary = Logger(namespace=__name__, observer=self._downstream)

    def configure(self, rate: float, burst: float, now: Callable[[], float]) -> None:
        """Let ``rate`` lines a second of each kind through, ``burst`` at once, timed by
        ``now``; a rate of 0 turns the limit off.  Counts start afresh."""
        self.flush()
        self.rate = rate
        self.burst = max(1.0, burst)
        self._now = now
        self._buckets.clear()

    def __call__(self, event: LogEvent) -> None:
        """Forward ``event``, or count it when its kind is over the rate."""
        level = event.get("log_level")
        if self.rate <= 0 or level in (LogLevel.error, LogLevel.critical):
            self._downstream(event)
            return
        kind = (str(event.get("log_namespace", "")), str(event.get("log_format", "")))
        now = self._now()
        tokens, updated = self._buckets.get(kind, (self.burst, now))
        tokens = min(self.burst, tokens + (now - updated) * self.rate)
        if tokens < 1.0:
            self._buckets[kind] = (tokens, now)
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._buckets[kind] = (tokens - 1.0, now)
        if kind in self._suppressed:
            self._summarise(kind)
        self._downstream(event)

    def over_rate(self, namespace: str, line: str) -> bool:
        """Whether a line of this kind (``namespace``, format string ``line``) would be
        suppressed now; if so it is counted as suppressed, and the caller need not build
        it (a refusal storm then costs no formatting).  False takes no token: the line,
        emitted, is judged as usual."""
        if self.rate <= 0:
            return False
        kind = (namespace, line)
        bucket = self._buckets.get(kind)
        if bucket is None:
            return False
        tokens, updated = bucket
        if min(self.burst, tokens + (self._now() - updated) * self.rate) >= 1.0:
            return False
        self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
        return True

    def flush(self) -> None:
        """Write the summary of every kind with suppressed lines, and forget buckets that
        have refilled (kinds are the relay's own messages, so they are few anyway)."""
        for kind in list(self._suppressed):
            self._summarise(kind)
        if self.rate > 0:
            now = self._now()
            full_after = self.burst / self.rate
            for kind, (_tokens, updated) in list(self._buckets.items()):
                if now - updated >= full_after:
                    del self._buckets[kind]

    @property
    def suppressed(self) -> int:
        """Lines suppressed and not yet summarised."""
        return sum(self._suppressed.values())

    def _summarise(self, kind: tuple[str, str]) -> None:
        count = self._suppressed.pop(kind, 0)
        if count:
            namespace, line = kind
            self._summary.warn(
                "{suppressed} log lines like {line!r} ({source}) were suppressed: over "
                "{rate:g} a second (--log-rate)",
                suppressed=count,
                line=line,
                source=namespace,
                rate=self.rate,
                kind="log.suppressed",
            )


limited = RateLimitedObserver()


class LogLimitService(TimerService):
    """While running: :data:`limited` lets ``rate`` lines a second of each kind through
    (``burst`` at once), timed by ``clock``, and writes its summaries every
    :data:`FLUSH_SECONDS`; once stopped, a last summary and no limit."""

    def __init__(self, rate: float, burst: float, clock: IReactorTime) -> None:
        super().__init__(FLUSH_SECONDS, limited.flush)
        self.clock = clock
        self._now = clock.seconds
        self._rate = rate
        self._burst = burst

    def startService(self) -> None:
        """Limit from now on."""
        limited.configure(self._rate, self._burst, self._now)
        super().startService()

    def stopService(self) -> Deferred[None]:
        """Summarise what was suppressed and lift the limit."""
        stopped: Deferred[None] = super().stopService()
        limited.configure(0.0, 1.0, time.monotonic)
        return stopped


def relay_logger(namespace: str) -> Logger:
    """A logger for module ``namespace`` whose lines go through :data:`limited`."""
    return Logger(namespace=namespace, observer=limited)


# Autobahn logs each opening handshake it fails and each connection it drops, quoting
# what the peer sent: its protocols log through the limit too (see autobahn_logger).
_AUTOBAHN_NAMESPACE = "autobahn.websocket.protocol"
_autobahn_log: Any = None


def autobahn_logger() -> Any:
    """The txaio logger the relay gives each Autobahn protocol (``protocol.log``), at
    txaio's level, whose lines go through :data:`limited`."""
    global _autobahn_log
    if _autobahn_log is None:
        from txaio.tx import Logger as TxaioLogger

        _autobahn_log = TxaioLogger(namespace=_AUTOBAHN_NAMESPACE, logger=Logger, observer=limited)
    return _autobahn_log


# -- JSON lines -------------------------------------------------------------------------------


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON can hold it: text for anything else, and no NaN or infinity
    (which are not JSON)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        return [_plain(item, depth + 1) for item in value]
    if depth < _MAX_DEPTH and isinstance(value, dict):
        return {str(key): _plain(item, depth + 1) for key, item in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_json(event: LogEvent) -> str:
    """One line of JSON for ``event``: ``time`` (UTC, ISO 8601), ``level``,
    ``namespace``, ``message`` (the rendered text), ``traceback`` when it carries a
    failure, then its own fields."""
    record: dict[str, Any] = {
        "time": _timestamp(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:  # a failure that cannot render itself still leaves a line
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = _plain(value)
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def json_file_observer(out: IO[Any]) -> FileLogObserver:
    """An observer writing :func:`event_as_json` lines to ``out``."""
    return FileLogObserver(out, event_as_json)


def json_observer() -> FileLogObserver:
    """JSON lines on standard output: the relay's ``--json-logs``, and a factory for
    ``twistd --logger streamrelay.logs.json_observer``.  The stream is taken now, before
    twistd redirects ``sys.stdout`` into the log."""
    return json_file_observer(sys.stdout)
