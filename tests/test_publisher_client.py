"""The Publisher's network behaviour against an in-memory relay, with a fake clock.

The relay end is played by hand over StringTransport: it completes (or refuses) the real
Autobahn client's opening handshake, unmasks the client's frames and sends its own, so no
socket is involved and time only moves when a test advances the clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from typing import Any, cast

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from streamrelay.publisher.client import ConnectionState, Publisher, Readiness
from streamrelay.publisher.encoder import EncoderSettings, H264Encoder
from streamrelay.publisher.pipeline import CapturePipeline
from streamrelay.publisher.settings import PublisherSettings
from streamrelay.publisher.sources import TestPatternSource
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, MediaMessage, WireError, parse_media
from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.connection import HandshakeRefusal, refusal_from_response
from streamrelay.wsclient.target import RelayTarget, parse_relay_url
from tests.support.frames import FrameParser

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TOKEN = "1999999999.0123456789abcdef-very-secret"


class ThreadedMemoryReactor(MemoryReactorClock):
    """A fake reactor whose callFromThread queues calls until the test runs them, so a test
    can play a reactor thread that is behind."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self._lock = threading.Lock()

    def callFromThread(self, function: Callable[..., object], *args: object) -> None:  # noqa: N802
        with self._lock:
            self.from_threads.append((function, args))

    def run_thread_calls(self) -> int:
        with self._lock:
            calls, self.from_threads = self.from_threads, []
        for function, args in calls:
            function(*args)
        return len(calls)


class LenientStringTransport(StringTransport):
    """StringTransport that, like Twisted's real transports, accepts unregisterProducer
    with no producer (Autobahn calls it when dropping a connection)."""

    def unregisterProducer(self) -> None:  # noqa: N802
        if self.producer is not None:
            super().unregisterProducer()


class RelayEnd:
    """The relay's side of one in-memory connection."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport
        self.request_line = ""
        self.headers: dict[str, str] = {}
        self._consumed = 0
        # What the client writes after its handshake: masked frames, as a client must.
        self._parser = FrameParser(expect_masked=True)

    def _read_request(self) -> None:
        raw = self.transport.value()
        head, separator, _ = raw.partition(b"\r\n\r\n")
        assert separator, "no complete handshake request"
        self._consumed = len(head) + 4
        lines = head.decode("latin-1").split("\r\n")
        self.request_line = lines[0]
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def accept(self, subprotocol: str | None = "streamrelay.v1") -> None:
        """Answer the opening handshake with 101."""
        self._read_request()
        key = self.headers["sec-websocket-key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest()).decode()
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
        )
        if subprotocol:
            response += f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
        self.protocol.dataReceived((response + "\r\n").encode())

    def refuse(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        """Answer the opening handshake with an HTTP error, then close."""
        self._read_request()
        fields = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.protocol.dataReceived(
            f"HTTP/1.1 {status} {reason}\r\n{fields}Content-Length: 0\r\n\r\n".encode()
        )
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def frames(self) -> list[tuple[int, bytes]]:
        """New (opcode, unmasked payload) frames the client has written."""
        data = self.transport.value()
        new, self._consumed = data[self._consumed :], len(data)
        return [(frame.opcode, frame.payload) for frame in self._parser.feed(new)]

    def messages(self) -> list[dict[str, Any] | MediaMessage]:
        """New messages: JSON objects for text, parsed v1 media messages for binary."""
        result: list[dict[str, Any] | MediaMessage] = []
        for opcode, payload in self.frames():
            if opcode == 1:
                result.append(json.loads(payload))
            elif opcode == 2:
                result.append(parse_media(payload))
        return result

    def send_text(self, message: dict[str, Any]) -> None:
        payload = json.dumps(message).encode()
        assert len(payload) < 126
        self.protocol.dataReceived(bytes([0x81, len(payload)]) + payload)

    def close(self, code: int, reason: str = "") -> None:
        """Start a closing handshake from the relay, then drop the TCP connection."""
        payload = code.to_bytes(2, "big") + reason.encode()
        self.protocol.dataReceived(bytes([0x88, len(payload)]) + payload)
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def drop(self) -> None:
        """The relay vanishes without a closing handshake."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class FakeRelay:
    """Hands out in-memory connections (or refusals) to the publisher's connect attempts."""

    def __init__(self) -> None:
        self.connections: list[RelayEnd] = []
        self.refuse_tcp = False
        self.attempts = 0

    def endpoint(self, reactor: Any, target: RelayTarget, insecure: bool) -> IStreamClientEndpoint:
        relay = self

        @implementer(IStreamClientEndpoint)
        class Endpoint:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                relay.attempts += 1
                if relay.refuse_tcp:
                    return defer.fail(ConnectionRefusedError())
                protocol = factory.buildProtocol(IPv4Address("TCP", target.host, target.port))
                transport = LenientStringTransport(
                    hostAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                    peerAddress=IPv4Address("TCP", target.host, target.port),
                )
                protocol.makeConnection(transport)
                relay.connections.append(RelayEnd(protocol, transport))
                return defer.succeed(protocol)

        return Endpoint()

    @property
    def last(self) -> RelayEnd:
        return self.connections[-1]


class Recorder:
    """Collects the publisher's callbacks."""

    def __init__(self) -> None:
        self.keyframe_requests = 0
        self.viewers: list[int] = []
        self.states: list[ConnectionState] = []

    def keyframe(self) -> None:
        self.keyframe_requests += 1


@pytest.fixture
def log_events() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


def make_publisher(
    reactor: MemoryReactorClock,
    relay: FakeRelay,
    recorder: Recorder | None = None,
    backoff: Backoff | None = None,
    **settings: Any,
) -> Publisher:
    recorder = recorder or Recorder()
    publisher = Publisher(
        PublisherSettings(
            "ws://relay.test:8080/publish/demo?note=x",
            ping_interval=0,
            ping_timeout=0,
            open_timeout=0,
            **settings,
        ),
        reactor=reactor,
        backoff=backoff or Backoff(uniform=lambda: 1.0),
        endpoint_factory=relay.endpoint,
    )
    publisher.on_keyframe_request = recorder.keyframe
    publisher.on_viewers = recorder.viewers.append
    publisher.on_state_change = recorder.states.append
    return publisher


def connected_publisher(
    **options: Any,
) -> tuple[Publisher, FakeRelay, Recorder, ThreadedMemoryReactor]:
    reactor = ThreadedMemoryReactor()
    relay = FakeRelay()
    recorder = Recorder()
    publisher = make_publisher(reactor, relay, recorder, **options)
    publisher.start()
    relay.last.accept()
    assert publisher.connected
    return publisher, relay, recorder, reactor


META = {"codec": "avc1.42C01F", "width": 1280, "height": 720, "fps": 30}
CONFIG = b"\x00\x00\x00\x01\x67\x42\xc0\x1f\x00\x00\x00\x01\x68\xce\x3c\x80"


def test_handshake_offers_v1_and_sends_the_token_only_in_the_header(
    log_events: list[LogEvent],
) -> None:
    """The opening handshake targets the stream path with the v1 subprotocol and a Bearer
    token, and no log event, even at debug level, contains the token."""
    import txaio

    txaio.set_global_log_level("debug")  # type: ignore[attr-defined]
    try:
        publisher, relay, _, _ = connected_publisher(token=TOKEN)
    finally:
        txaio.set_global_log_level("info")  # type: ignore[attr-defined]
    assert relay.last.request_line == "GET /publish/demo?note=x HTTP/1.1"
    assert relay.last.headers["sec-websocket-protocol"] == "streamrelay.v1"
    assert relay.last.headers["authorization"] == f"Bearer {TOKEN}"
    assert "origin" not in relay.last.headers  # a desktop client sends no Origin
    publisher.send_meta(META)
    assert log_events
    for event in log_events:
        assert TOKEN not in formatEvent(event)
        assert TOKEN not in repr(event)
    assert publisher.target.display_url == "ws://relay.test:8080/publish/demo"


def test_bad_urls_and_tokens_are_refused() -> None:
    """Only ws/wss (or http/https, converted) URLs with a host; tokens must be one line."""
    assert parse_relay_url("https://relay/publish/a").url == "wss://relay/publish/a"
    assert parse_relay_url("ws://[::1]:9000/publish/a").port == 9000
    for bad in ("ftp://relay/publish/a", "ws:///publish/a", "ws://relay:99999/x", "ws://r/#f"):
        with pytest.raises(ValueError):
            parse_relay_url(bad)
    with pytest.raises(ValueError):
        PublisherSettings("ws://relay/publish/a", token="abc\r\nX-Evil: 1")


def test_settings_are_checked_once_and_keep_secrets_out_of_their_repr() -> None:
    """The settings record parses the URL when made, refuses bounds that cannot work, and
    its repr (safe to log) shows neither the token nor the URL's credentials or query."""
    settings = PublisherSettings(
        "http://user:hunter2@relay.test/publish/a?key=query-secret", token=TOKEN
    )
    assert settings.target.url == "ws://user:hunter2@relay.test/publish/a?key=query-secret"
    assert settings.target.display_url == "ws://relay.test/publish/a"
    assert settings.queue_low_water_bytes == settings.queue_high_water_bytes // 4
    for text in (repr(settings), repr(settings.target)):
        assert TOKEN not in text and "hunter2" not in text and "query-secret" not in text
    for bad in (
        {"token": ""},
        {"queue_high_water_bytes": 0},
        {"queue_high_water_bytes": 2048, "queue_limit_bytes": 1024},
        {"max_pending_threadsafe_calls": 0},
        {"url": "ws:///no-host"},
    ):
        with pytest.raises(ValueError):
            PublisherSettings(**bad)  # type: ignore[arg-type]


def test_sends_meta_config_then_frames_from_a_key_on() -> None:
    """Once open: meta, then CONFIG, then frames starting at a KEY (deltas before the first
    KEY are not sent), each with a valid header carrying its timestamp."""
    publisher, relay, recorder, _ = connected_publisher()
    assert recorder.keyframe_requests == 1  # a new connection asks for a KEY at once
    publisher.send_meta(META)
    publisher.send_config(CONFIG, 10)
    assert publisher.send_frame(b"delta-before-key", key=False, capture_time_us=11) is False
    assert publisher.send_frame(b"key", key=True, capture_time_us=12) is True
    assert publisher.send_frame(b"delta", key=False, capture_time_us=13) is True
    messages = relay.last.messages()
    assert messages == [
        {"type": "meta", **META},
        MediaMessage.build(FLAG_CONFIG, 10, CONFIG),
        MediaMessage.build(FLAG_KEY, 12, b"key"),
        MediaMessage.build(0, 13, b"delta"),
    ]
    stats = publisher.stats
    assert (stats.frames_sent, stats.keyframes_sent, stats.configs_sent) == (2, 1, 1)
    assert publisher.dropped == 0


def test_frames_after_the_relay_starts_closing_are_not_sent_and_raise_nothing() -> None:
    """Between the relay's close frame (1001 when it shuts down) and the connection
    being reported lost, the encoder's frames are not written (Autobahn would raise
    "Attempt to send on a closed protocol" from the reactor thread) and nothing breaks."""
    publisher, relay, _, _ = connected_publisher()
    publisher.send_config(CONFIG, 10)
    assert publisher.send_frame(b"key", key=True, capture_time_us=12) is True
    payload = (1001).to_bytes(2, "big") + b"going away"
    relay.last.protocol.dataReceived(bytes([0x88, len(payload)]) + payload)
    sent = publisher.stats.frames_sent
    publisher.send_frame(b"delta", key=False, capture_time_us=13)
    publisher.send_meta(META)
    assert publisher.stats.frames_sent == sent
    assert not any(
        isinstance(message, MediaMessage) and message.capture_time_us == 13
        for message in relay.last.messages()
    )
    relay.last.drop()


def test_viewers_and_keyframe_requests_reach_the_callbacks() -> None:
    """viewers updates the count and calls on_viewers; keyframe-request calls
    on_keyframe_request; unknown or malformed messages are ignored."""
    publisher, relay, recorder, _ = connected_publisher()
    relay.last.send_text({"type": "viewers", "count": 3})
    relay.last.send_text({"type": "viewers", "count": "many"})
    relay.last.send_text({"type": "keyframe-request"})
    relay.last.send_text({"type": "something-new"})
    assert publisher.viewers == 3
    assert recorder.viewers == [3]
    assert recorder.keyframe_requests == 2
    assert publisher.stats.keyframe_requests == 1


def test_reconnect_backoff_grows_with_full_jitter_within_bounds() -> None:
    """While the relay refuses connections, each delay is uniform in [0, ceiling], the
    ceiling doubling from 0.5 s up to the 30 s cap; jitter makes the delays vary."""
    reactor = ThreadedMemoryReactor()
    relay = FakeRelay()
    relay.refuse_tcp = True
    draws = iter([1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 1.0, 1.0, 0.1, 1.0, 1.0, 1.0])
    publisher = make_publisher(reactor, relay, backoff=Backoff(uniform=lambda: next(draws)))
    publisher.start()
    delays = []
    for _ in range(11):
        (call,) = reactor.getDelayedCalls()
        delays.append(call.getTime() - reactor.seconds())
        reactor.advance(delays[-1])
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    factors = [1.0, 0.5, 1.0, 0.25, 1.0, 1.0, 1.0, 1.0, 0.1, 1.0, 1.0]
    assert delays == pytest.approx([c * f for c, f in zip(ceilings, factors, strict=True)])
    assert relay.attempts == 12
    assert publisher.state is ConnectionState.RECONNECTING
    assert "refused" in (publisher.last_error or "")

    # With a real random source every delay stays in bounds and they are not all equal.
    backoff = Backoff()
    real = []
    for attempt in range(200):
        ceiling = backoff.ceiling()
        assert ceiling == min(30.0, 0.5 * 2**attempt)
        delay = backoff.next_delay()
        assert 0 <= delay <= ceiling
        real.append(delay)
    assert len(set(real[-50:])) > 40


def test_reconnect_resends_meta_and_config_and_waits_for_a_key() -> None:
    """After the relay goes away the publisher reconnects; the new session gets meta and the
    latest CONFIG again, a keyframe is requested, and only a KEY restarts the frames."""
    publisher, relay, recorder, reactor = connected_publisher()
    publisher.send_meta(META)
    publisher.send_config(CONFIG, 1)
    publisher.send_frame(b"key", key=True, capture_time_us=2)
    relay.last.messages()
    relay.last.drop()
    assert publisher.state is ConnectionState.RECONNECTING
    assert publisher.readiness is Readiness.OFFLINE
    assert publisher.send_frame(b"lost", key=False) is False
    reactor.advance(0.5)
    assert len(relay.connections) == 2
    relay.last.accept()
    assert publisher.connected
    assert recorder.keyframe_requests == 2
    publisher.send_frame(b"delta", key=False, capture_time_us=5)
    publisher.send_frame(b"key2", key=True, capture_time_us=6)
    messages = relay.last.messages()
    assert messages[0] == {"type": "meta", **META}
    assert isinstance(messages[1], MediaMessage) and messages[1].flags == FLAG_CONFIG
    assert messages[1].payload == CONFIG
    assert messages[2:] == [MediaMessage.build(FLAG_KEY, 6, b"key2")]
    assert recorder.states == [
        ConnectionState.CONNECTING,
        ConnectionState.LIVE,
        ConnectionState.RECONNECTING,
        ConnectionState.CONNECTING,
        ConnectionState.LIVE,
    ]


def test_backoff_resets_only_after_a_connection_that_held() -> None:
    """A connection that stayed up for stable_after seconds resets the backoff; one the
    relay drops at once does not, so a relay that accepts and drops is not hammered."""
    publisher, relay, _, reactor = connected_publisher(stable_after=5.0)
    relay.last.drop()  # at once: attempt counter keeps growing
    reactor.advance(0.5)
    relay.last.accept()
    relay.last.drop()
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() - reactor.seconds() == pytest.approx(1.0)
    reactor.advance(1.0)
    relay.last.accept()
    reactor.advance(6.0)
    relay.last.drop()
    (call,) = reactor.getDelayedCalls()
    assert call.getTime() - reactor.seconds() == pytest.approx(0.5)


def test_refused_handshake_is_retried_and_explained() -> None:
    """An HTTP 401 from the relay is reported (with a token hint) and retried later."""
    reactor = ThreadedMemoryReactor()
    relay = FakeRelay()
    publisher = make_publisher(reactor, relay)
    publisher.start()
    relay.last.refuse(401, "Unauthorized")
    assert publisher.state is ConnectionState.RECONNECTING
    assert "401" in (publisher.last_error or "") and "token" in (publisher.last_error or "")
    reactor.advance(0.5)
    assert len(relay.connections) == 2


@pytest.mark.parametrize(
    ("status", "reason", "headers", "explanation"),
    [
        (
            503,
            "Service Unavailable",
            {"Retry-After": "7"},
            "relay refused the connection: 503 Service Unavailable "
            "(the relay is at a limit or shutting down; it asks to retry after 7 s)",
        ),
        (
            409,
            "Conflict",
            {},
            "relay refused the connection: 409 Conflict (the stream has a publisher "
            "and the relay does not let another take it over)",
        ),
        (
            403,
            "Forbidden",
            {},
            "relay refused the connection: 403 Forbidden (check --token / STREAMRELAY_TOKEN)",
        ),
        # The status comes from the status line, whatever the reason phrase says.
        (
            400,
            "upgrade failed [401]: Unauthorized",
            {},
            "relay refused the connection: 400 upgrade failed [401]: Unauthorized",
        ),
    ],
)
def test_refusals_are_read_from_the_http_response_and_explained(
    status: int, reason: str, headers: dict[str, str], explanation: str
) -> None:
    """The status and Retry-After of the relay's non-101 answer are read from the
    response Autobahn parsed, and explained once; the publisher retries after its own
    backoff."""
    reactor = ThreadedMemoryReactor()
    relay = FakeRelay()
    publisher = make_publisher(reactor, relay)
    publisher.start()
    relay.last.refuse(status, reason, headers)
    assert publisher.last_error == explanation
    assert relay.last.protocol.refusal.status == status
    assert publisher.state is ConnectionState.RECONNECTING
    reactor.advance(0.5)
    assert len(relay.connections) == 2


def test_refusal_from_response_reads_the_status_line_and_retry_after() -> None:
    """101 is no refusal; Retry-After counts only in delta-seconds; an over-long reason
    phrase is cut; a response Autobahn could not parse yields nothing."""
    assert refusal_from_response("HTTP/1.1 503 Service Unavailable", {"retry-after": "30"}) == (
        HandshakeRefusal(503, "Service Unavailable", 30)
    )
    assert refusal_from_response("HTTP/1.1 101 Switching Protocols", {}) is None
    assert refusal_from_response(None, {}) is None
    assert refusal_from_response("garbage", {}) is None
    assert refusal_from_response("HTTP/1.1 2xx Odd", {}) is None
    dated = refusal_from_response("HTTP/1.1 503", {"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert dated == HandshakeRefusal(503, "", None)
    assert dated.explain() == (
        "relay refused the connection: 503 (the relay is at a limit or shutting down)"
    )
    long = refusal_from_response("HTTP/1.1 418 " + "x" * 500, {})
    assert long is not None and long.reason == "x" * 100
    assert long.explain() == "relay refused the connection: 418 " + "x" * 100


def test_failures_are_explained_without_autobahn_wrappers() -> None:
    """A relay that drops the handshake, and one that closes an open session, are
    explained in Autobahn's own words, without its "closed uncleanly (...)" wrapper."""
    reactor = ThreadedMemoryReactor()
    relay = FakeRelay()
    publisher = make_publisher(reactor, relay)
    publisher.start()
    relay.last.drop()
    error = publisher.last_error or ""
    assert error.startswith("handshake failed (") and "uncleanly" not in error
    assert "peer dropped the TCP connection" in error
    reactor.advance(0.5)
    relay.last.accept()
    assert publisher.last_error is None
    relay.last.close(1001, "relay restarting")
    assert publisher.last_error == "connection closed (1001: relay restarting)"


def test_a_capture_time_out_of_range_is_refused_and_nothing_goes_out() -> None:
    """send_frame builds a checked header: a capture time outside 64 unsigned bits raises
    WireError, sends nothing and leaves the publisher waiting for its KEY."""
    publisher, relay, _, _ = connected_publisher()
    for bad in (-1, 2**64):
        with pytest.raises(WireError):
            publisher.send_frame(b"key", key=True, capture_time_us=bad)
    assert relay.last.messages() == [] and publisher.stats.frames_sent == 0
    assert publisher.send_frame(b"d", key=False, capture_time_us=1) is False
    assert publisher.send_frame(b"key", key=True, capture_time_us=2**64 - 1) is True
    assert relay.last.messages() == [MediaMessage.build(FLAG_KEY, 2**64 - 1, b"key")]


def test_replaced_publisher_stops_instead_of_fighting_back() -> None:
    """Close code 4409 (a newer publisher took the stream) stops this one for good."""
    publisher, relay, _, reactor = connected_publisher()
    stopped: list[str] = []
    publisher.when_stopped().addCallback(stopped.append)
    relay.last.close(4409, "replaced")
    assert publisher.state is ConnectionState.STOPPED
    assert stopped and "replaced" in stopped[0]
    assert reactor.getDelayedCalls() == []


def test_stop_closes_cleanly_and_does_not_reconnect() -> None:
    """stop() sends a 1000 close frame, fires when the connection is gone, and schedules
    no reconnect; stopping while waiting to retry fires at once."""
    publisher, relay, _, reactor = connected_publisher()
    done: list[str] = []
    publisher.stop("bye").addCallback(done.append)
    frames = relay.last.frames()
    assert frames[-1][0] == 8 and frames[-1][1][:2] == (1000).to_bytes(2, "big")
    assert not done
    relay.last.drop()
    assert done == ["bye"]
    assert publisher.state is ConnectionState.STOPPED
    assert all(not call.active() for call in reactor.getDelayedCalls())

    reactor2 = ThreadedMemoryReactor()
    relay2 = FakeRelay()
    relay2.refuse_tcp = True
    waiting = make_publisher(reactor2, relay2)
    waiting.start()
    assert waiting.state is ConnectionState.RECONNECTING
    done2: list[str] = []
    waiting.stop().addCallback(done2.append)
    assert done2 and reactor2.getDelayedCalls() == []


def test_stop_aborts_a_relay_that_never_answers_the_close() -> None:
    """If the relay ignores the closing handshake the connection is aborted after the close
    timeout, and the stop still completes."""
    publisher, relay, _, reactor = connected_publisher(close_timeout=2.0)
    done: list[str] = []
    publisher.stop().addCallback(done.append)
    reactor.advance(3.0)
    assert relay.last.transport.disconnecting
    relay.last.drop()
    assert done


def test_backpressure_queues_then_signals_congestion_then_drops_until_key() -> None:
    """When the transport pauses, messages wait in the outbox; past the high-water mark the
    publisher reports CONGESTED; a frame past the limit is dropped along with every delta
    until the next KEY; when the transport drains, the backlog goes out in order, a keyframe
    is requested and the publisher is READY again."""
    publisher, relay, recorder, _ = connected_publisher(
        queue_high_water_bytes=1000, queue_limit_bytes=3000
    )
    publisher.send_frame(b"K" * 100, key=True, capture_time_us=1)
    assert len(relay.last.messages()) == 1
    producer = relay.last.transport.producer
    assert producer is not None and relay.last.transport.streaming
    producer.pauseProducing()
    assert publisher.readiness is Readiness.READY
    sent = [publisher.send_frame(b"d" * 500, key=False, capture_time_us=2 + i) for i in range(5)]
    assert sent == [True] * 5
    assert relay.last.messages() == []  # nothing written while paused
    assert publisher.readiness is Readiness.CONGESTED
    assert publisher.send_frame(b"d" * 500, key=False, capture_time_us=7) is False  # over limit
    assert publisher.send_frame(b"d" * 10, key=False, capture_time_us=8) is False  # until a KEY
    assert publisher.dropped == 2
    requests_before = recorder.keyframe_requests
    producer.resumeProducing()
    backlog = relay.last.messages()
    assert [m.capture_time_us for m in backlog if isinstance(m, MediaMessage)] == [2, 3, 4, 5, 6]
    assert publisher.readiness is Readiness.READY
    assert recorder.keyframe_requests == requests_before + 1
    assert publisher.send_frame(b"d", key=False, capture_time_us=9) is False
    assert publisher.send_frame(b"K", key=True, capture_time_us=10) is True
    assert publisher.send_frame(b"d", key=False, capture_time_us=11) is True
    assert [m.capture_time_us for m in relay.last.messages() if isinstance(m, MediaMessage)] == [
        10,
        11,
    ]


def test_threadsafe_handoff_is_bounded_and_drops_until_a_key() -> None:
    """Frames handed over from another thread wait for the reactor at most
    max_pending_threadsafe_calls deep: past that they are dropped (and so are deltas until a
    KEY), readiness says CONGESTED, and a keyframe is requested."""
    publisher, relay, recorder, reactor = connected_publisher(max_pending_threadsafe_calls=3)
    results = [
        publisher.send_frame_threadsafe(b"f", key=i == 0, capture_time_us=i) for i in range(5)
    ]
    assert results == [True, True, True, False, False]
    assert publisher.readiness is Readiness.CONGESTED
    assert publisher.dropped == 2
    requests_before = recorder.keyframe_requests
    reactor.run_thread_calls()
    assert recorder.keyframe_requests == requests_before + 1
    assert publisher.readiness is Readiness.READY
    assert publisher.send_frame_threadsafe(b"d", key=False, capture_time_us=10) is False
    assert publisher.send_frame_threadsafe(b"k", key=True, capture_time_us=11) is True
    reactor.run_thread_calls()
    stamps = [m.capture_time_us for m in relay.last.messages() if isinstance(m, MediaMessage)]
    assert stamps == [0, 1, 2, 11]


def small_encoder(keyint: int) -> H264Encoder:
    """A real libx264 encoder of 160x96 at 30 fps, a KEY every ``keyint`` frames."""
    return H264Encoder(
        EncoderSettings(
            width=160,
            height=96,
            fps=Fraction(30),
            bitrate=200_000,
            keyframe_interval_frames=keyint,
            preset="ultrafast",
        )
    )


def make_pipeline(
    sink: Any, reactor: Any, keyint: int = 1000
) -> tuple[CapturePipeline, H264Encoder]:
    encoder = small_encoder(keyint)
    source = TestPatternSource(160, 96)
    return CapturePipeline(source, encoder, sink, reactor=reactor, fps=Fraction(30)), encoder


def test_pipeline_drops_raw_frames_at_the_source_while_the_reactor_is_behind() -> None:
    """With the reactor not draining the handoff, the pipeline encodes only until the
    bound, then drops raw frames without encoding them; when the reactor catches up the next
    encoded frame is a KEY and the relay sees a decodable sequence."""
    publisher, relay, _, reactor = connected_publisher(max_pending_threadsafe_calls=4)
    pipeline, _ = make_pipeline(publisher, reactor)
    publisher.on_keyframe_request = pipeline.request_keyframe
    force = True
    for index in range(10):
        force = pipeline.run_once(index, index / 30, force)
    assert pipeline.stats.frames_encoded == 4
    assert pipeline.stats.frames_dropped == 6
    reactor.run_thread_calls()
    for index in range(10, 13):
        force = pipeline.run_once(index, index / 30, force)
    reactor.run_thread_calls()
    media = [m for m in relay.last.messages() if isinstance(m, MediaMessage)]
    assert [m.flags for m in media] == [FLAG_CONFIG, FLAG_KEY, 0, 0, 0, FLAG_KEY, 0, 0]


def test_pipeline_thread_against_a_stalled_reactor_stays_bounded() -> None:
    """The real capture thread at 120 fps against a reactor that never runs: the handoff
    never exceeds its bound, dropped frames are counted, and stop() ends the thread."""
    publisher, _, _, reactor = connected_publisher(max_pending_threadsafe_calls=5)
    encoder = H264Encoder(EncoderSettings(width=160, height=96, preset="ultrafast"))
    pipeline = CapturePipeline(
        TestPatternSource(160, 96), encoder, publisher, reactor=reactor, fps=Fraction(120)
    )
    pipeline.start()
    try:
        deadline = time.monotonic() + 5
        while pipeline.stats.frames_dropped < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        pipeline.stop()
        assert pipeline.join(5)
    assert pipeline.stats.frames_dropped >= 20
    assert pipeline.stats.frames_encoded == 5
    frame_calls = [c for c in reactor.from_threads if c[0].__name__ == "_deliver_frame"]
    assert len(frame_calls) == 5


class FakeSink:
    """A sink whose readiness the test sets, recording what it is given."""

    def __init__(self) -> None:
        self.readiness = Readiness.READY
        self.accept = True
        self.received: list[tuple[str, Any]] = []

    def send_meta_threadsafe(self, meta: Any) -> None:
        self.received.append(("meta", meta))

    def send_config_threadsafe(self, payload: bytes, capture_time_us: int | None = None) -> None:
        self.received.append(("config", payload))

    def send_frame_threadsafe(
        self, payload: bytes, *, key: bool, capture_time_us: int | None = None
    ) -> bool:
        self.received.append(("key" if key else "delta", payload))
        return self.accept


def test_pipeline_forces_a_keyframe_after_drops_offline_refusals_and_requests() -> None:
    """Meta and CONFIG precede the first KEY; after congestion drops, an offline spell, a
    refused handoff or a keyframe request, the next encoded frame is a KEY; offline frames
    are not counted as drops."""
    sink = FakeSink()
    pipeline, _ = make_pipeline(sink, ThreadedMemoryReactor())
    index = 0
    force = True

    def step(readiness: Readiness = Readiness.READY) -> list[str]:
        nonlocal index, force
        sink.readiness = readiness
        sink.received.clear()
        force = pipeline.run_once(index, index / 30, force)
        index += 1
        return [kind for kind, _ in sink.received]

    assert step() == ["meta", "config", "key"]
    assert step() == ["delta"]
    assert step(Readiness.CONGESTED) == []
    assert step() == ["key"]
    assert step(Readiness.OFFLINE) == []
    assert step() == ["key"]
    sink.accept = False
    assert step() == ["delta"]
    sink.accept = True
    assert step() == ["key"]
    assert step() == ["delta"]
    pipeline.request_keyframe()
    assert step() == ["key"]
    assert pipeline.stats.frames_dropped == 1
    assert pipeline.stats.frames_offline == 1
