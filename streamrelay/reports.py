"""What viewers report about their playback, and the clock exchange that makes their
latency estimate comparable: validation, per-connection rate limits and the per-stream
summary over the last minute.  Network-free; the clock is injected.

A player sends (docs/protocol.md, "Viewer reports"):

- ``{"type": "time", "t0": T}``: the relay answers ``{"type": "time", "t0": T,
  "server_us": S}`` so the player can estimate its clock's offset from the relay's, NTP
  style, from the round trip.  At most :data:`TIME_BURST` answers at once, then one per
  :data:`TIME_INTERVAL_SECONDS`; requests beyond that get no answer.
- ``{"type": "report", "latency_ms": ..., "fps": ..., "dropped": ..., "stalls": ...,
  "clock_offset_ms": ...}`` every few seconds: at most one per
  :data:`REPORT_MIN_INTERVAL_SECONDS` per connection is counted, the rest are ignored; a
  report with any member missing, of the wrong type, not finite or out of range is
  ignored as a whole (:func:`parse_report` says why, for the counters).

Each stream keeps the reports of the last :data:`WINDOW_SECONDS` in a ring of at most
:data:`MAX_REPORTS` entries (the newest win), so its memory is bounded however many
viewers report; the summary gives p50/p95 of the reported latencies, p50 of the fps, and
the stalls and drops summed.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from twisted.internet.interfaces import IReactorTime

WINDOW_SECONDS: Final = 60.0
MAX_REPORTS: Final = 1024
REPORT_MIN_INTERVAL_SECONDS: Final = 2.0
TIME_BURST: Final = 4
TIME_INTERVAL_SECONDS: Final = 5.0

# Ranges a sane player stays in; a value outside one makes the report invalid.
MAX_LATENCY_MS: Final = 600_000.0  # ten minutes
MAX_FPS: Final = 1_000.0
MAX_COUNT: Final = 1_000_000  # dropped frames in one report
MAX_STALLS: Final = 10_000
MAX_CLOCK_OFFSET_MS: Final = 86_400_000.0  # a day
# An edge passes its viewers' reports on to its upstream, at most this many per message
# (the newest: beyond ~100 viewers an edge forwards a sample); a message of that many
# stays under the 4 KiB an edge may send.
MAX_FORWARDED: Final = 100
# A summary is reused for this long unless a report came meanwhile.
SUMMARY_MAX_AGE_SECONDS: Final = 1.0
# A kept report: when it came, latency (NaN: none), fps (float64), dropped, stalls.
_PACKED: Final = struct.Struct("<dddIH")
_RECEIVED: Final = struct.Struct("<d")
# A ``time`` request's t0 is the player's own number, echoed: any finite number whose
# JSON stays short.
MAX_T0: Final = 1e16


class InvalidReport(ValueError):
    """Why a report is ignored."""


@dataclass(frozen=True, slots=True)
class ViewerReport:
    """One validated report (``latency_ms`` None: no frame decoded in its interval)."""

    latency_ms: float | None
    fps: float
    dropped: int
    stalls: int
    clock_offset_ms: float | None


def _number(message: Mapping[str, Any], name: str, low: float, high: float) -> float:
    value = message.get(name)
    # bool is an int to Python, never a number on the wire.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidReport(f"{name} is not a number")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer of hundreds of digits
        raise InvalidReport(f"{name} out of range") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidReport(f"{name} out of range")
    return number


def _optional(message: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    if message.get(name, None) is None:
        return None
    return _number(message, name, low, high)


def _count(message: Mapping[str, Any], name: str, high: int) -> int:
    value = message.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise InvalidReport(f"{name} is not a whole number from 0 to {high}")
    return value


def parse_report(message: Mapping[str, Any]) -> ViewerReport:
    """The report in ``message`` (a parsed ``report`` text message), or
    :class:`InvalidReport`."""
    return ViewerReport(
        latency_ms=_optional(message, "latency_ms", 0.0, MAX_LATENCY_MS),
        fps=_number(message, "fps", 0.0, MAX_FPS),
        dropped=_count(message, "dropped", MAX_COUNT),
        stalls=_count(message, "stalls", MAX_STALLS),
        clock_offset_ms=_optional(
            message, "clock_offset_ms", -MAX_CLOCK_OFFSET_MS, MAX_CLOCK_OFFSET_MS
        ),
    )


def parse_forwarded(message: Mapping[str, Any]) -> tuple[list[ViewerReport], int]:
    """The reports of an edge's ``reports`` message and how many rows were invalid
    (skipped); raises :class:`InvalidReport` when ``reports`` is not a list of at most
    :data:`MAX_FORWARDED` rows."""
    rows = message.get("reports")
    if not isinstance(rows, list) or len(rows) > MAX_FORWARDED:
        raise InvalidReport(f"reports is not a list of at most {MAX_FORWARDED} rows")
    reports = []
    invalid = 0
    for row in rows:
        if not isinstance(row, list) or len(row) != 4:
            invalid += 1
            continue
        latency, fps, dropped, stalls = row
        try:
            reports.append(parse_report(
                {"latency_ms": latency, "fps": fps, "dropped": dropped, "stalls": stalls}
            ))
        except InvalidReport:
            invalid += 1
    return reports, invalid


def parse_time_request(message: Mapping[str, Any]) -> float | int | None:
    """The ``t0`` of a ``time`` request to echo, or None when it is not a finite number
    of at most :data:`MAX_T0` in size (the request is then ignored)."""
    t0 = message.get("t0")
    if isinstance(t0, bool) or not isinstance(t0, (int, float)):
        return None
    if not math.isfinite(t0) or abs(t0) > MAX_T0:
        return None
    return t0


class ViewerInputGate:
    """One viewer connection's allowance of counted reports and answered time requests."""

    __slots__ = ("_clock", "_last_report", "_time_tokens", "_time_updated")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._last_report: float | None = None
        self._time_tokens = float(TIME_BURST)
        self._time_updated = clock.seconds()

    def allow_report(self) -> bool:
        """True when a report arriving now is counted (one per minimum interval)."""
        now = self._clock.seconds()
        if self._last_report is not None and now - self._last_report < REPORT_MIN_INTERVAL_SECONDS:
            return False
        self._last_report = now
        return True

    def allow_time(self) -> bool:
        """True when a time request arriving now is answered (a small token bucket)."""
        now = self._clock.seconds()
        tokens = min(
            float(TIME_BURST),
            self._time_tokens + (now - self._time_updated) / TIME_INTERVAL_SECONDS,
        )
        self._time_updated = now
        if tokens < 1.0:
            self._time_tokens = tokens
            return False
        self._time_tokens = tokens - 1.0
        return True


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of non-empty ``sorted_values``."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


class ReportWindow:
    """A stream's viewer reports over the last :data:`WINDOW_SECONDS` (at most
    :data:`MAX_REPORTS` of them).

    Each report is kept packed (:data:`_PACKED`, about 70 bytes with its slot), so a
    full window costs about 75 KB; the summary is computed again only after a new report
    or a second, so a busy listing does not sort the window on every request."""

    def __init__(
        self,
        clock: IReactorTime,
        window: float = WINDOW_SECONDS,
        max_reports: int = MAX_REPORTS,
    ) -> None:
        self._clock = clock
        self._window = window
        self._entries: deque[bytes] = deque(maxlen=max_reports)
        self._summary: dict[str, Any] | None = None
        self._summarised_at = 0.0
        self.total = 0
        self.invalid = 0
        # On an edge (the stream is pulled): reports not yet passed on upstream.
        self.forwarding = False
        self._new: deque[ViewerReport] = deque(maxlen=MAX_FORWARDED)

    def add(self, report: ViewerReport) -> None:
        """Count one report, received now."""
        latency = math.nan if report.latency_ms is None else report.latency_ms
        self._entries.append(
            _PACKED.pack(self._clock.seconds(), latency, report.fps, report.dropped, report.stalls)
        )
        self._summary = None
        self.total += 1
        if self.forwarding:
            self._new.append(report)

    def take_new(self) -> list[list[float | int | None]]:
        """The reports added since the last call (at most :data:`MAX_FORWARDED`, the
        newest), as ``[latency_ms, fps, dropped, stalls]`` rows for the upstream."""
        rows: list[list[float | int | None]] = [
            [r.latency_ms, r.fps, r.dropped, r.stalls] for r in self._new
        ]
        self._new.clear()
        return rows

    def _prune(self) -> None:
        horizon = self._clock.seconds() - self._window
        entries = self._entries
        while entries and _RECEIVED.unpack_from(entries[0])[0] < horizon:
            entries.popleft()
            self._summary = None

    def __len__(self) -> int:
        self._prune()
        return len(self._entries)

    def summary(self) -> dict[str, Any]:
        """The last minute: ``reports``, ``latency_ms`` (``p50``, ``p95``; null without a
        latency), ``fps`` (``p50``; null without reports), ``stalls``, ``dropped``,
        ``window_seconds``."""
        now = self._clock.seconds()
        if self._summary is not None and now - self._summarised_at < SUMMARY_MAX_AGE_SECONDS:
            return dict(self._summary)
        self._prune()
        rows = [_PACKED.unpack(entry) for entry in self._entries]
        latencies = sorted(row[1] for row in rows if not math.isnan(row[1]))
        rates = sorted(row[2] for row in rows)
        self._summary = {
            "reports": len(rows),
            "window_seconds": self._window,
            "latency_ms": (
                {
                    "p50": round(percentile(latencies, 0.50), 1),
                    "p95": round(percentile(latencies, 0.95), 1),
                }
                if latencies
                else None
            ),
            "fps": {"p50": round(percentile(rates, 0.50), 1)} if rates else None,
            "stalls": sum(row[4] for row in rows),
            "dropped": sum(row[3] for row in rows),
        }
        self._summarised_at = now
        return dict(self._summary)

    def clear(self) -> None:
        """Forget every report and the counts (a new publisher: a new picture, a new
        latency)."""
        self._entries.clear()
        self._new.clear()
        self._summary = None
        self.total = 0
        self.invalid = 0
