"""The live status line and the console log observer."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher

from streamrelay.publisher.client import ConnectionState, PublisherStats, Readiness
from streamrelay.publisher.status import StatusLine, console_observer


class FakePipelineStats:
    frames_dropped = 4


class FakePipeline:
    stats = FakePipelineStats()


@dataclass
class FakePublisher:
    """What the status line reads of a publisher, set by the test."""

    stats: PublisherStats = field(default_factory=PublisherStats)
    state: ConnectionState = ConnectionState.IDLE
    readiness: Readiness = Readiness.OFFLINE
    last_error: str | None = None
    viewers: int | None = None
    viewer_report: dict[str, Any] | None = None

    @property
    def dropped(self) -> int:
        return self.stats.frames_dropped


def make_status(interactive: bool) -> tuple[StatusLine, FakePublisher, Clock, io.StringIO]:
    clock = Clock()
    publisher = FakePublisher()
    stream = io.StringIO()
    pipeline: Any = FakePipeline()
    status = StatusLine(clock, publisher, pipeline, stream, interactive=interactive)
    return status, publisher, clock, stream


def test_status_line_shows_rates_viewers_drops_and_state() -> None:
    """fps and kbit/s are rates over the last interval; viewers, dropped (source plus
    network) and the connection state are shown; a TTY gets one line rewritten with \\r."""
    status, publisher, clock, stream = make_status(interactive=True)
    status.start()
    publisher.stats.frames_sent += 15
    publisher.stats.bytes_sent += 62_500
    publisher.stats.frames_dropped += 1
    publisher.viewers = 2
    publisher.state = ConnectionState.LIVE
    clock.advance(0.5)
    text = stream.getvalue()
    assert text.startswith("\r\x1b[K")
    assert "30.0 fps" in text and "1000 kbit/s" in text
    assert "viewers 2" in text and "dropped 5" in text and "[live]" in text
    assert "\n" not in text
    status.write_log("12:00:00 a log line")
    assert stream.getvalue().endswith("\r\x1b[K12:00:00 a log line\n")
    status.stop()


def test_status_lines_are_spaced_out_when_not_a_terminal() -> None:
    """Without a TTY a whole line is written every five seconds, never a bare \\r; the state
    shows why the publisher is not live."""
    status, publisher, clock, stream = make_status(interactive=False)
    assert status.interval == 5.0
    publisher.last_error = "cannot connect: refused"
    publisher.state = ConnectionState.RECONNECTING
    status.start()
    clock.advance(4.9)
    assert stream.getvalue() == ""
    clock.advance(0.1)
    line = stream.getvalue()
    assert line.endswith("\n") and "\r" not in line
    assert "viewers -" in line and "[reconnecting: cannot connect: refused]" in line
    status.stop()


def test_a_live_publisher_behind_on_the_network_says_so() -> None:
    """LIVE but CONGESTED shows as "live, network behind"; the last error is not shown
    while live."""
    status, publisher, _, _ = make_status(interactive=False)
    publisher.state = ConnectionState.LIVE
    publisher.readiness = Readiness.CONGESTED
    publisher.last_error = "old trouble"
    assert status.render().endswith("[live, network behind]")
    publisher.readiness = Readiness.READY
    assert status.render().endswith("[live]")


def test_console_observer_filters_by_level_and_marks_warnings() -> None:
    """Log events below the level are dropped; warnings and errors are labelled."""
    stream = io.StringIO()
    publisher = LogPublisher(console_observer(stream, LogLevel.info))
    log = Logger(observer=publisher)
    log.debug("hidden {x}", x=1)
    log.info("shown {x}", x=2)
    log.warn("careful")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" shown 2")
    assert " warn: careful" in lines[1]
