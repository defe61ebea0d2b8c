"""The one-line live status on stderr, and a log observer that does not garble it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from twisted.internet.task import LoopingCall
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
)
from zope.interface import provider

from .client import ConnectionState, PublisherStats, Readiness

if TYPE_CHECKING:
    from .pipeline import CapturePipeline  # imports PyAV
    from .remux import SourcePipeline

_CLEAR_LINE = "\r\x1b[K"


class PublisherView(Protocol):
    """What the status line reads of a :class:`~.client.Publisher`."""

    @property
    def stats(self) -> PublisherStats:
        """The publisher's counters."""

    @property
    def state(self) -> ConnectionState:
        """The connection state."""

    @property
    def readiness(self) -> Readiness:
        """Whether a frame would go out now."""

    @property
    def last_error(self) -> str | None:
        """Why the last attempt failed."""

    @property
    def viewers(self) -> int | None:
        """The viewer count the relay last reported."""

    @property
    def dropped(self) -> int:
        """Frames the network side dropped."""

    @property
    def viewer_report(self) -> dict[str, Any] | None:
        """The relay's latest summary of what the viewers report."""


class StatusLine:
    """fps, kbit/s, viewers, dropped frames and connection state, on one line.

    On a terminal the line is rewritten in place (``\\r``) every half second; otherwise a
    full line is written every few seconds, so that logs stay readable.
    """

    def __init__(
        self,
        reactor: Any,
        publisher: PublisherView,
        pipeline: CapturePipeline | SourcePipeline | None,
        stream: TextIO,
        *,
        interactive: bool | None = None,
        interval: float | None = None,
        streams: int = 1,
    ) -> None:
        self._reactor = reactor
        self._publisher = publisher
        self._pipeline = pipeline
        self._stream = stream
        if interactive is None:
            isatty: Callable[[], bool] | None = getattr(stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.interval = interval if interval is not None else (0.5 if interactive else 5.0)
        # A rendition set sends each source frame once per rendition: fps is per stream.
        self._streams = max(1, streams)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._last_time: float | None = None
        self._last_frames = 0
        self._last_bytes = 0
        self._shown = False

    def start(self) -> None:
        """Start updating."""
        self._last_time = self._reactor.seconds()
        self._last_frames = self._publisher.stats.frames_sent
        self._last_bytes = self._publisher.stats.bytes_sent
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        """Stop updating and leave the terminal on a fresh line."""
        if self._loop.running:
            self._loop.stop()
        if self._shown and self.interactive:
            self._stream.write("\n")
            self._stream.flush()
        self._shown = False

    def dropped(self) -> int:
        """Frames dropped because the network was behind, at the source and after."""
        at_source = self._pipeline.stats.frames_dropped if self._pipeline else 0
        return at_source + self._publisher.dropped

    def render(self) -> str:
        """The status text since the previous call (rates over that interval)."""
        now = self._reactor.seconds()
        stats = self._publisher.stats
        elapsed = max(1e-6, now - (self._last_time if self._last_time is not None else now))
        fps = (stats.frames_sent - self._last_frames) / elapsed / self._streams
        kbps = (stats.bytes_sent - self._last_bytes) * 8 / 1000 / elapsed
        self._last_time, self._last_frames, self._last_bytes = (
            now,
            stats.frames_sent,
            stats.bytes_sent,
        )
        publisher = self._publisher
        state = publisher.state.value
        if publisher.state is ConnectionState.LIVE and publisher.readiness is Readiness.CONGESTED:
            state = "live, network behind"
        elif publisher.state is ConnectionState.LIVE and publisher.readiness is Readiness.IDLE:
            state = "live, idle: nobody watches"
        elif publisher.state is not ConnectionState.LIVE and publisher.last_error:
            state = f"{state}: {publisher.last_error[:60]}"
        viewers = "-" if publisher.viewers is None else str(publisher.viewers)
        # A file or URL source says whether it remuxes or transcodes, and why.
        mode = getattr(self._pipeline, "mode", None)
        return (
            f"{fps:5.1f} fps {kbps:7.0f} kbit/s  viewers {viewers}  "
            f"dropped {self.dropped()}{viewer_report_text(publisher.viewer_report)}  [{state}]"
            + (f"  {mode}" if mode else "")
        )

    def _tick(self) -> None:
        self._write_status(self.render())

    def _write_status(self, text: str) -> None:
        if self.interactive:
            self._stream.write(_CLEAR_LINE + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        self._shown = True

    def write_log(self, text: str) -> None:
        """Write a log line without mixing it into the status line."""
        if self.interactive and self._shown:
            self._stream.write(_CLEAR_LINE)
            self._shown = False
        self._stream.write(text if text.endswith("\n") else text + "\n")
        self._stream.flush()


def viewer_report_text(report: dict[str, Any] | None) -> str:
    """What the viewers report (the relay's ``viewer-report``), for the status line:
    ``  latency p50 120 ms p95 180 ms, 0 stalls (4 reports/min)``; empty without one."""
    if not report or not report.get("reports"):
        return ""
    latency = report.get("latency_ms")
    parts = []
    if isinstance(latency, dict):
        p50, p95 = _number(latency.get("p50")), _number(latency.get("p95"))
        parts.append(f"latency p50 {p50:.0f} ms p95 {p95:.0f} ms")
    parts.append(f"{_number(report.get('stalls')):.0f} stalls")
    return f"  {', '.join(parts)} ({_number(report.get('reports')):.0f} reports/min)"


def _number(value: Any) -> float:
    # The relay's word, shown but never trusted to be well formed.
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def console_observer(
    stream: TextIO, level: LogLevel, status: StatusLine | None = None
) -> ILogObserver:
    """A log observer writing ``HH:MM:SS level message`` lines to ``stream``."""

    def format_time(when: float | None) -> str:
        """Local wall-clock time, seconds precision."""
        return time.strftime("%H:%M:%S", time.localtime(when)) if when else "-"

    @provider(ILogObserver)
    def write(event: LogEvent) -> None:
        """Format one event and write it around the status line."""
        text = eventAsText(event, includeSystem=False, formatTime=format_time)
        log_level = event.get("log_level")
        if log_level is not None and log_level is not LogLevel.info:
            time_part, _, message = text.partition(" ")
            text = f"{time_part} {log_level.name}: {message}"
        if status is not None:
            status.write_log(text)
        else:
            stream.write(text + "\n")
            stream.flush()

    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    return FilteringLogObserver(write, [predicate])
