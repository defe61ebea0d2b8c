"""The live status line and the console log observer."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, LogPublisher

from streamrelay.publisher.client import (
    ConnectionState,
    Publisher,
    handshake_refusal,
    short_close_reason,
)
from streamrelay.publisher.status import StatusLine, console_observer


class FakePipelineStats:
    frames_dropped = 4


class FakePipeline:
    stats = FakePipelineStats()


def make_status(interactive: bool) -> tuple[StatusLine, Publisher, Clock, io.StringIO]:
    clock = Clock()
    publisher = Publisher("ws://127.0.0.1:1/publish/s", reactor=clock)
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
    publisher._set_state(ConnectionState.LIVE)
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
    publisher._set_state(ConnectionState.RECONNECTING)
    status.start()
    clock.advance(4.9)
    assert stream.getvalue() == ""
    clock.advance(0.1)
    line = stream.getvalue()
    assert line.endswith("\n") and "\r" not in line
    assert "viewers -" in line and "[reconnecting: cannot connect: refused]" in line
    status.stop()


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


def test_close_reasons_are_made_readable() -> None:
    """Refusal statuses are picked out of Autobahn's reason text, and its 'closed uncleanly'
    wrapper is removed."""
    reason = 'connection was closed uncleanly ("WebSocket connection upgrade failed [503]: Busy")'
    assert handshake_refusal(reason) == (503, "Busy")
    assert handshake_refusal("peer went away") is None
    assert short_close_reason(reason) == "WebSocket connection upgrade failed [503]: Busy"
    assert short_close_reason("going away") == "going away"
    assert short_close_reason(None) == ""
