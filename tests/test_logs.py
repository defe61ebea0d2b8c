"""The relay's log: one line per WebSocket opened and closed, structured access lines,
no token anywhere, rate limiting per kind of line, and JSON lines for log shippers."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.application import service
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from zope.interface import implementer

from streamrelay import logs
from streamrelay.logs import RateLimitedObserver, event_as_json, json_file_observer
from streamrelay.tap import RelayService
from streamrelay.tokens import make_token
from streamrelay.wire import FLAG_KEY, encode_media
from tests.fakes import LogCapture, Relay, captured_log
from tests.support.frames import binary_frame, close_frame

HOST = "relay.test"


# No test here may log an unhandled error (the ``log`` fixture checks).
pytestmark = pytest.mark.usefixtures("log")


@pytest.fixture
def limited() -> Iterator[RateLimitedObserver]:
    """The relay's shared limiter, put back to "no limit" afterwards."""
    yield logs.limited
    logs.limited.configure(0.0, 1.0, time.monotonic)


def of_kind(capture: LogCapture, kind: str) -> list[dict[str, Any]]:
    return [dict(event) for event in capture.events if event.get("kind") == kind]


# -- connection lines ---------------------------------------------------------------------


def test_one_line_when_a_websocket_opens_and_one_when_it_closes(log: LogCapture) -> None:
    """Role, stream, client, then at the close the duration, the code, who closed, whether
    the closing handshake completed, and the bytes each way."""
    relay = Relay()
    publisher = relay.publisher("cam")
    viewer = relay.viewer("cam")
    publisher.send(binary_frame(encode_media(FLAG_KEY, 1, b"k" * 500)))
    relay.clock.advance(12.5)
    relay.context.drain()  # 1001 to both
    viewer.send(close_frame(1001))
    relay.settle()
    publisher.lose()
    viewer.lose()
    opened = of_kind(log, "connection.open")
    assert [(e["role"], e["stream"]) for e in opened] == [("publisher", "cam"), ("viewer", "cam")]
    assert opened[1]["peer"] == f"127.0.0.1:{viewer.address.port}"
    shown = f"viewer opened stream=cam peer=127.0.0.1:{viewer.address.port}"
    assert formatEvent(opened[1]) == shown
    closed = {e["role"]: e for e in of_kind(log, "connection.close")}
    seen = closed["viewer"]
    assert (seen["code"], seen["by"], seen["clean"]) == (1001, "relay", True)
    assert seen["duration"] == 12.5
    assert seen["bytes_out"] > 500 and seen["bytes_in"] == len(close_frame(1001))
    gone = closed["publisher"]
    assert (gone["code"], gone["by"], gone["clean"]) == (1001, "relay", False)
    assert gone["bytes_in"] > 500
    assert formatEvent(seen).startswith(
        f"viewer closed stream=cam peer=127.0.0.1:{viewer.address.port} after 12.5s "
        "code=1001 by=relay clean=True in=8B out="
    )


def test_close_lines_say_who_closed_and_how(log: LogCapture) -> None:
    """A peer's own close (its code, by=peer), and a connection aborted after a silent
    ping (1006: no close frame, by=relay)."""
    relay = Relay.with_options(ping_interval=10, ping_timeout=5)
    leaving = relay.viewer("cam")
    leaving.send(close_frame(1000))
    leaving.lose()
    silent = relay.viewer("cam")
    relay.tick(15.1)
    assert silent.aborted
    silent.lose(aborted=True)
    closed = of_kind(log, "connection.close")
    assert [(e["code"], e["by"], e["clean"]) for e in closed] == [
        (1000, "peer", True),
        (1006, "relay", False),
    ]


def test_refused_and_failed_handshakes_log_no_connection_lines(log: LogCapture) -> None:
    """Only WebSockets that opened get an open and a close line."""
    relay = Relay()
    relay.connect().upgrade("/watch/a/b")
    relay.connect().upgrade("/watch/cam", {"Sec-WebSocket-Key": "not base64"})
    for peer in relay.peers:
        peer.lose()
    assert of_kind(log, "connection.open") == of_kind(log, "connection.close") == []


def test_no_token_reaches_any_log_event(log: LogCapture) -> None:
    """Tokens in the query string or the Authorization header never reach a log event,
    access lines included."""
    publish_secret, view_secret = b"p" * 32, b"v" * 32
    relay = Relay.with_options(publish_secret=publish_secret, view_secret=view_secret)
    relay.site.startFactory()
    try:
        expires = int(time.time()) + 3600
        view = make_token(view_secret, "view", "cam", expires)
        publish = make_token(publish_secret, "publish", "cam", expires)
        relay.publisher("cam", extra={"Authorization": f"Bearer {publish}"})
        viewer = relay.open(f"/watch/cam?token={view}")
        relay.connect().upgrade(f"/watch/cam?token={view}x")  # 401
        relay.connect().request(
            "GET", f"/view/cam?token={view}", {"Host": HOST, "Referer": f"http://x/?token={view}"}
        )
        viewer.lose()
    finally:
        relay.site.stopFactory()
    everything = "\n".join(repr(event) + formatEvent(event) for event in log.events)
    assert "connection.open" in everything and "http.access" in everything
    for secret in (view, publish, view.split(".")[1], publish.split(".")[1]):
        assert secret not in everything


def test_access_lines_are_structured(log: LogCapture) -> None:
    """Plain requests get one access line with fields, path without its query."""
    relay = Relay()
    relay.site.startFactory()
    try:
        relay.connect().request("GET", "/healthz?x=1", {"Host": HOST, "User-Agent": 'a"b'})
    finally:
        relay.site.stopFactory()
    (line,) = of_kind(log, "http.access")
    assert (line["method"], line["path"], line["status"], line["client"]) == (
        "GET", "/healthz", 200, "127.0.0.1"
    )
    assert formatEvent(line) == '"127.0.0.1" - - "GET /healthz HTTP/1.1" 200 3 "-" "a\'b"'


# -- rate limiting --------------------------------------------------------------------------


@implementer(ILogObserver)
class _Downstream:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def _emit(observer: RateLimitedObserver, text: str, level: LogLevel = LogLevel.info) -> None:
    Logger(namespace="tests.storm", observer=observer).emit(level, text, value=1)


def test_each_kind_is_limited_to_its_burst_then_its_rate() -> None:
    """A burst passes, then lines are counted; when the bucket refills, a summary of the
    count comes before the next line of that kind.  Other kinds are not affected."""
    clock = Clock()
    downstream = _Downstream()
    limiter = RateLimitedObserver(downstream)
    limiter.configure(10.0, 100.0, clock.seconds)
    for _ in range(250):
        _emit(limiter, "bad client {value}")
    _emit(limiter, "another kind {value}")
    assert len(downstream.events) == 101
    assert limiter.suppressed == 150
    clock.advance(0.1)
    _emit(limiter, "bad client {value}")
    summary, line = downstream.events[-2:]
    assert summary["kind"] == "log.suppressed" and summary["suppressed"] == 150
    assert summary["log_level"] == LogLevel.warn
    assert "150 log lines like 'bad client {value}'" in formatEvent(summary)
    assert line["log_format"] == "bad client {value}"
    assert limiter.suppressed == 0


def test_over_rate_answers_without_taking_a_token_and_counts_what_it_stops() -> None:
    """over_rate() is False while a line would pass (and takes nothing from the bucket),
    True once the kind is over its rate, counting the line as suppressed for the
    summary; kinds never logged and an unconfigured limiter are never over."""
    clock = Clock()
    downstream = _Downstream()
    limiter = RateLimitedObserver(downstream)
    assert not limiter.over_rate("tests.storm", "x {value}")
    limiter.configure(1.0, 3.0, clock.seconds)
    assert not limiter.over_rate("tests.storm", "x {value}")
    for _ in range(3):
        assert not limiter.over_rate("tests.storm", "x {value}")
        _emit(limiter, "x {value}")
    assert len(downstream.events) == 3
    assert limiter.over_rate("tests.storm", "x {value}")
    assert limiter.over_rate("tests.storm", "x {value}")
    assert limiter.suppressed == 2
    assert not limiter.over_rate("tests.storm", "other {value}")
    clock.advance(1.0)
    assert not limiter.over_rate("tests.storm", "x {value}")
    _emit(limiter, "x {value}")
    summary = downstream.events[-2]
    assert summary["kind"] == "log.suppressed" and summary["suppressed"] == 2


def test_errors_are_never_suppressed() -> None:
    """Tracebacks and errors always get through."""
    downstream = _Downstream()
    limiter = RateLimitedObserver(downstream)
    limiter.configure(1.0, 1.0, Clock().seconds)
    for _ in range(20):
        _emit(limiter, "boom", LogLevel.error)
        _emit(limiter, "boom", LogLevel.critical)
    assert len(downstream.events) == 40


def test_flush_summarises_and_forgets_refilled_kinds() -> None:
    """flush() writes one summary per kind with suppressed lines, nothing otherwise."""
    clock = Clock()
    downstream = _Downstream()
    limiter = RateLimitedObserver(downstream)
    limiter.configure(1.0, 2.0, clock.seconds)
    for _ in range(5):
        _emit(limiter, "a {value}")
        _emit(limiter, "b {value}")
    limiter.flush()
    summaries = [e for e in downstream.events if e.get("kind") == "log.suppressed"]
    assert sorted((e["line"], e["suppressed"]) for e in summaries) == [
        ("a {value}", 3), ("b {value}", 3)
    ]
    count = len(downstream.events)
    limiter.flush()
    assert len(downstream.events) == count


def test_no_limit_until_configured() -> None:
    """A fresh limiter (and the relay's before its service configures it) passes all."""
    downstream = _Downstream()
    limiter = RateLimitedObserver(downstream)
    for _ in range(1000):
        _emit(limiter, "x {value}")
    assert len(downstream.events) == 1000


def test_a_storm_of_bad_clients_is_bounded_in_the_log(
    log: LogCapture, limited: RateLimitedObserver
) -> None:
    """500 refused handshakes and 300 viewers opening and closing in one second: each
    kind of line (access, open, close) stays within its burst, and the summaries say how
    many were left out."""
    relay = Relay.with_options(max_handshakes_per_ip=1000.0, handshake_burst=2000)
    limited.configure(10.0, 100.0, relay.clock.seconds)
    relay.site.startFactory()
    try:
        for _ in range(500):
            refused = relay.connect()
            refused.upgrade("/watch/a/b")
            refused.lose()
        for _ in range(300):
            viewer = relay.viewer("cam")
            viewer.send(close_frame(1000))
            viewer.lose()
        limited.flush()
    finally:
        relay.site.stopFactory()
    for kind in ("http.access", "connection.open", "connection.close"):
        assert len(of_kind(log, kind)) == 100, kind
    suppressed = {e["line"]: e["suppressed"] for e in of_kind(log, "log.suppressed")}
    assert sorted(suppressed.values()) == [200, 200, 400], suppressed
    assert [line for line in suppressed if "token" in line] == []
    assert len(log.events) <= 3 * 100 + 3 + 10


# -- JSON lines -----------------------------------------------------------------------------


def test_json_lines_are_flat_objects_with_the_event_fields() -> None:
    """time, level, namespace, message, then the fields; values JSON cannot hold become
    text; one line per event."""
    out = io.StringIO()
    observer = json_file_observer(out)
    Logger(namespace="tests.json", observer=observer).info(
        "viewer closed stream={stream} after {duration:.1f}s",
        stream="cam",
        duration=1.25,
        odd=float("nan"),
        nested={"a": [1, b"x", object]},
    )
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["message"] == "viewer closed stream=cam after 1.2s"
    assert (record["level"], record["namespace"]) == ("info", "tests.json")
    assert record["time"].endswith("Z") and "T" in record["time"]
    assert (record["stream"], record["duration"], record["odd"]) == ("cam", 1.25, "nan")
    assert record["nested"]["a"][:2] == [1, "x"]
    assert not [key for key in record if key.startswith("log_")]


def test_json_lines_carry_tracebacks_and_legacy_events() -> None:
    """A failure's traceback is a field (the line stays one line); events from the legacy
    log API render their message."""
    try:
        raise ValueError("broken")
    except ValueError:
        failure = Failure()
    text = event_as_json(
        {"log_format": "it failed", "log_level": LogLevel.critical, "log_failure": failure,
         "log_namespace": "x", "log_time": 0.0}
    )
    assert text.count("\n") == 1
    record = json.loads(text)
    assert "ValueError: broken" in record["traceback"]
    with captured_log() as capture:
        legacy_log.msg("old style", system="x")
    (legacy,) = capture.events
    record = json.loads(event_as_json(legacy))
    assert record["message"] == "old style"
    assert not {"system", "isError", "format"} & set(record)


def test_json_logs_option_gives_the_application_a_json_observer() -> None:
    """--json-logs: the relay's service sets the application's ILogObserver (which twistd
    and the console script log to); without it, none."""
    for json_logs in (True, False):
        relay = Relay.with_options(json_logs=json_logs)
        application = service.Application("streamrelay")
        RelayService(relay.context).setServiceParent(application)
        observer = application.getComponent(ILogObserver, None)
        assert (observer is not None) == json_logs
        if observer is not None:
            assert observer.formatEvent is event_as_json


def test_the_limit_holds_while_the_service_runs(
    log: LogCapture, limited: RateLimitedObserver
) -> None:
    """The relay's LogLimitService turns the limit on at start, writes the summaries on
    its timer, and lifts the limit (after a last summary) when stopped."""
    clock = Clock()
    limiter_service = logs.LogLimitService(1.0, 5.0, clock)
    limiter_service.startService()
    storm = Logger(namespace="tests.storm", observer=limited)
    for _ in range(20):
        storm.info("storm line")
    assert len([e for e in log.events if e.get("log_format") == "storm line"]) == 5
    clock.advance(logs.FLUSH_SECONDS)
    (summary,) = of_kind(log, "log.suppressed")
    assert summary["suppressed"] == 15
    for _ in range(8):  # the bucket refilled meanwhile: 5 more get through
        storm.info("storm line")
    limiter_service.stopService()
    assert [e["suppressed"] for e in of_kind(log, "log.suppressed")] == [15, 3]
    for _ in range(50):
        storm.info("storm line")
    assert len([e for e in log.events if e.get("log_format") == "storm line"]) == 5 + 5 + 50


def test_autobahn_lines_go_through_the_limit(
    log: LogCapture, limited: RateLimitedObserver
) -> None:
    """Autobahn logs two lines per handshake it fails, quoting the peer: a storm of bad
    keys is limited like the relay's own lines."""
    relay = Relay.with_options(max_handshakes_per_ip=1000.0, handshake_burst=2000)
    limited.configure(10.0, 100.0, relay.clock.seconds)
    for _ in range(300):
        peer = relay.connect()
        assert peer.upgrade("/watch/cam", {"Sec-WebSocket-Key": "x" * 30}).status == 400
        peer.lose()
    autobahn = [e for e in log.events
                if str(e.get("log_namespace", "")).startswith("autobahn")]
    assert 0 < len(autobahn) <= 2 * 100
    limited.flush()
    assert sum(e["suppressed"] for e in of_kind(log, "log.suppressed")) >= 400
