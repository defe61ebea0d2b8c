"""Test doubles shared by the network-free tests.

- WebSocket framing for the client side (masked frames built by hand) and a parser for
  what the server writes (unmasked frames), so the tests depend on no client library;
- :class:`Relay`: the real ``RelaySite`` / ``RelayChannel`` / ``StreamGate`` /
  Autobahn protocols on a :class:`~twisted.internet.task.Clock`, one
  :class:`Peer` (a ``StringTransport``) per fake TCP connection;
- :class:`LogCapture`: collects failures and critical events from the global log;
- the hypothesis settings profiles (``HYPOTHESIS_PROFILE=dev|ci|thorough``).
"""

from __future__ import annotations

import base64
import json
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from streamrelay.config import RelayConfig
from streamrelay.context import RelayContext
from streamrelay.web import RelaySite, Root

# -- hypothesis profiles -------------------------------------------------------------------

settings.register_profile(
    "ci",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=10000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- WebSocket framing ----------------------------------------------------------------------

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

MASK = b"\x37\xfa\x21\x3d"


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    mask: bytes = MASK,
    claimed_length: int | None = None,
) -> bytes:
    """One client-to-server frame (masked unless told otherwise).  ``claimed_length``
    writes a length field that differs from the payload actually appended."""
    length = len(payload) if claimed_length is None else claimed_length
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not masked:
        return head + payload
    body = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    return head + mask + body


def binary(payload: bytes) -> bytes:
    """A whole binary message in one frame."""
    return client_frame(OP_BINARY, payload)


def text(value: Any) -> bytes:
    """A whole text message in one frame; dicts are JSON-encoded, str UTF-8 encoded."""
    if isinstance(value, dict):
        value = json.dumps(value)
    if isinstance(value, str):
        value = value.encode("utf-8")
    return client_frame(OP_TEXT, value)


def close_frame(code: int | None = 1000, reason: bytes = b"") -> bytes:
    """A client close frame."""
    payload = b"" if code is None else struct.pack("!H", code) + reason
    return client_frame(OP_CLOSE, payload)


@dataclass
class Frame:
    """One frame as the server wrote it."""

    opcode: int
    fin: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """The status code of a close frame."""
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """Split server-to-client bytes into frames; return them and any incomplete tail.
    Server frames must not be masked: a masked one fails the test."""
    frames: list[Frame] = []
    position = 0
    while len(data) - position >= 2:
        first, second = data[position], data[position + 1]
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        header = 2
        if length == 126:
            if len(data) - position < 4:
                break
            length = struct.unpack("!H", data[position + 2 : position + 4])[0]
            header = 4
        elif length == 127:
            if len(data) - position < 10:
                break
            length = struct.unpack("!Q", data[position + 2 : position + 10])[0]
            header = 10
        if len(data) - position < header + length:
            break
        payload = data[position + header : position + header + length]
        frames.append(Frame(first & 0x0F, bool(first & 0x80), payload))
        position += header + length
    return frames, data[position:]


@dataclass
class Message:
    """One whole server message: ``kind`` is ``text``, ``binary``, ``close``, ``ping`` or
    ``pong``."""

    kind: str
    payload: bytes

    @property
    def json(self) -> Any:
        """The text message decoded as JSON."""
        assert self.kind == "text", self
        return json.loads(self.payload)

    @property
    def close_code(self) -> int | None:
        """The status code of a close message."""
        assert self.kind == "close", self
        return int(struct.unpack("!H", self.payload[:2])[0]) if len(self.payload) >= 2 else None


_KINDS = {OP_TEXT: "text", OP_BINARY: "binary", OP_CLOSE: "close", OP_PING: "ping", OP_PONG: "pong"}


def assemble(frames: list[Frame]) -> list[Message]:
    """Join fragmented data frames into messages (control frames stand alone)."""
    messages: list[Message] = []
    pending: tuple[int, list[bytes]] | None = None
    for frame in frames:
        if frame.opcode >= 8:
            messages.append(Message(_KINDS[frame.opcode], frame.payload))
            continue
        if frame.opcode != OP_CONTINUATION:
            assert pending is None, "new data message inside a fragmented one"
            pending = (frame.opcode, [])
        assert pending is not None, "continuation frame outside a message"
        pending[1].append(frame.payload)
        if frame.fin:
            messages.append(Message(_KINDS[pending[0]], b"".join(pending[1])))
            pending = None
    return messages


# -- HTTP -----------------------------------------------------------------------------------


@dataclass
class Response:
    """An HTTP response head and body as written by the server."""

    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """A response header by case-insensitive name."""
        return self.headers.get(name.lower())


def parse_response(data: bytes) -> tuple[Response, bytes]:
    """Parse one HTTP response; return it and the bytes after it (WebSocket frames after
    a 101).  The body is delimited by Content-Length when there is one."""
    head, separator, rest = data.partition(b"\r\n\r\n")
    assert separator, f"no complete HTTP response head in {data[:200]!r}"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if status == 101:
        return Response(status, headers, b""), rest
    length = int(headers.get("content-length", len(rest)))
    return Response(status, headers, rest[:length]), rest[length:]


def websocket_key() -> bytes:
    """A fresh Sec-WebSocket-Key."""
    return base64.b64encode(os.urandom(16))


def upgrade_headers(subprotocol: str | None = "streamrelay.v1") -> dict[str, str]:
    """The headers of a valid WebSocket opening handshake."""
    headers = {
        "Host": "relay.test",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": websocket_key().decode(),
        "Sec-WebSocket-Version": "13",
    }
    if subprotocol is not None:
        headers["Sec-WebSocket-Protocol"] = subprotocol
    return headers


def request_bytes(method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 request head."""
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in (headers if headers is not None else {"Host": "relay.test"}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- transports and the relay harness -------------------------------------------------------


@implementer(ITCPTransport)
class FakeTransport(StringTransport):
    """A ``StringTransport`` that behaves like a real TCP transport where the relay
    relies on it: unregistering with no producer registered is allowed, and the TCP
    options and half-close are recorded."""

    def __init__(self, *arguments: Any, **keywords: Any) -> None:
        super().__init__(*arguments, **keywords)
        self.write_closed = False
        self.keepalive = False
        self.nodelay = False

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def getTcpNoDelay(self) -> bool:
        return self.nodelay

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getTcpKeepAlive(self) -> bool:
        return self.keepalive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.keepalive = enabled

    def sendFileDescriptor(self, descriptor: int) -> None:
        raise NotImplementedError

    @property
    def aborted(self) -> bool:
        """True once ``abortConnection`` was called."""
        return self.disconnected


class Peer:
    """One fake TCP connection to the relay: bytes in, everything written recorded."""

    def __init__(self, relay: Relay, address: IPv4Address | IPv6Address) -> None:
        self.relay = relay
        self.address = address
        self.channel: Any = relay.site.buildProtocol(address)
        self.transport = FakeTransport(peerAddress=address)
        self.lost = False
        self._frame_offset: int | None = None
        self._consumed_messages = 0
        self.channel.makeConnection(self.transport)

    # -- input --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Deliver bytes from the peer (ignored once the connection is gone)."""
        if not self.lost:
            self.channel.dataReceived(data)

    def request(
        self, method: str, target: str, headers: dict[str, str] | None = None
    ) -> Response:
        """Send a request head and parse the response."""
        self.send(request_bytes(method, target, headers))
        return self.response()

    def upgrade(
        self,
        target: str,
        extra: dict[str, str] | None = None,
        subprotocol: str | None = "streamrelay.v1",
    ) -> Response:
        """Send an opening handshake; after a 101, :meth:`messages` parses frames."""
        headers = upgrade_headers(subprotocol)
        headers.update(extra or {})
        return self.request("GET", target, headers)

    # -- output -------------------------------------------------------------------------

    @property
    def written(self) -> bytes:
        """Every byte the relay wrote on this connection."""
        return self.transport.value()

    def response(self) -> Response:
        """The HTTP response written so far."""
        response, rest = parse_response(self.written)
        if response.status == 101 and self._frame_offset is None:
            self._frame_offset = len(self.written) - len(rest)
        return response

    def all_messages(self) -> list[Message]:
        """Every complete WebSocket message written since the 101."""
        if self._frame_offset is None:
            self.response()
        assert self._frame_offset is not None, "not upgraded"
        frames, _tail = parse_frames(self.written[self._frame_offset :])
        return assemble(frames)

    def messages(self, kinds: tuple[str, ...] = ("text", "binary", "close")) -> list[Message]:
        """Messages not returned before (pings and pongs left out by default)."""
        every = self.all_messages()
        fresh = every[self._consumed_messages :]
        self._consumed_messages = len(every)
        return [message for message in fresh if message.kind in kinds]

    def json_messages(self) -> list[Any]:
        """New text messages, decoded."""
        return [message.json for message in self.messages(("text",))]

    def close_codes(self) -> list[int | None]:
        """Codes of every close frame written since the 101."""
        return [m.close_code for m in self.all_messages() if m.kind == "close"]

    # -- connection state ---------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        """The relay aborted the TCP connection."""
        return self.transport.aborted

    @property
    def closing(self) -> bool:
        """The relay asked for the TCP connection to end (close, half-close or abort)."""
        return self.transport.disconnecting or self.transport.write_closed

    def lose(self, aborted: bool = False) -> None:
        """Report the connection as gone, as the reactor would."""
        if self.lost:
            return
        self.lost = True
        reason = ConnectionAborted() if aborted else ConnectionDone()
        self.channel.connectionLost(Failure(reason))

    @property
    def protocol(self) -> Any:
        """The WebSocket protocol after the upgrade (or None)."""
        return self.channel.upgraded


@dataclass
class Relay:
    """The relay's web site on a ``Clock``, with fake connections."""

    config: RelayConfig = field(default_factory=RelayConfig)
    clock: Clock = field(default_factory=Clock)
    files: dict[str, bytes] = field(
        default_factory=lambda: {"index.html": b"<html>index</html>", "player.html": b"<p>"}
    )

    def __post_init__(self) -> None:
        self.context = RelayContext.create(self.config, self.clock)
        self.site = RelaySite(self.context, Root(self.context, files=self.files))
        self.peers: list[Peer] = []
        self._next_port = 40000

    @classmethod
    def with_options(cls, **overrides: Any) -> Relay:
        """A relay whose config differs from the defaults by ``overrides``."""
        return cls(config=RelayConfig(**overrides))

    def connect(self, host: str = "127.0.0.1", port: int | None = None) -> Peer:
        """Open a fake TCP connection from ``host``."""
        if port is None:
            self._next_port += 1
            port = self._next_port
        address: IPv4Address | IPv6Address
        if ":" in host:
            address = IPv6Address("TCP", host, port)
        else:
            address = IPv4Address("TCP", host, port)
        peer = Peer(self, address)
        self.peers.append(peer)
        return peer

    def open(
        self,
        target: str,
        extra: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        subprotocol: str | None = "streamrelay.v1",
    ) -> Peer:
        """Connect and complete a WebSocket handshake (fails the test unless 101)."""
        peer = self.connect(host)
        response = peer.upgrade(target, extra, subprotocol)
        assert response.status == 101, (response.status, response.body)
        return peer

    def publisher(self, name: str = "cam", **keywords: Any) -> Peer:
        """An open publisher of ``name``."""
        return self.open(f"/publish/{name}", **keywords)

    def viewer(self, name: str = "cam", **keywords: Any) -> Peer:
        """An open viewer of ``name``."""
        return self.open(f"/watch/{name}", **keywords)

    def tick(self, seconds: float, step: float = 0.05) -> None:
        """Advance the clock in small steps, as a reactor would (``Clock.advance`` runs
        every due call at the final time, so timers chained inside a jump drift)."""
        target = self.clock.seconds() + seconds
        while self.clock.seconds() + step < target:
            self.clock.advance(step)
        self.clock.advance(max(0.0, target - self.clock.seconds()))

    def turn(self) -> bool:
        """Run the calls due now, as one reactor turn does: unlike ``Clock.advance(0)``,
        a ``callLater(0)`` made meanwhile waits for the next turn.  False when none was
        due."""
        clock = self.clock
        due = [call for call in clock.calls if call.getTime() <= clock.seconds()]
        for call in due:
            if call.active():
                clock.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)
        return bool(due)

    def turns(self, limit: int = 100_000) -> int:
        """Run reactor turns until no call is due now; how many ran."""
        count = 0
        while self.turn():
            count += 1
            assert count < limit, "calls due now keep coming"
        return count

    def settle(self) -> None:
        """Report every connection the relay closed or aborted as lost (the reactor
        would do so on its next turn)."""
        for peer in list(self.peers):
            if (peer.transport.disconnecting or peer.aborted) and not peer.lost:
                peer.lose(aborted=peer.aborted)

    def disconnect_all(self) -> None:
        """Every peer goes away."""
        for peer in list(self.peers):
            peer.lose()

    def assert_idle(self) -> None:
        """The registry, the limits and the budget are back to their idle state."""
        context = self.context
        assert context.registry.streams == {}
        assert context.registry.budget.total == 0
        assert context.limiter.total == 0
        assert context.limiter.tracked_addresses == 0
        assert context.connections == set()
        assert not [call for call in self.clock.getDelayedCalls() if call.active()], [
            call for call in self.clock.getDelayedCalls()
        ]


# -- log capture ----------------------------------------------------------------------------


class LogCapture:
    """Every event on the global log publisher while active."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Events carrying a failure, or at level error/critical."""
        bad = []
        for event in self.events:
            level = getattr(event.get("log_level"), "name", "")
            if "log_failure" in event or level in ("error", "critical") or event.get("isError"):
                bad.append(event)
        return bad

    def describe_failures(self) -> str:
        """A readable summary of the failures, for assertion messages."""
        lines = []
        for event in self.failures:
            failure = event.get("log_failure")
            lines.append(
                f"{event.get('log_format')!r}: "
                + (failure.getTraceback() if failure is not None else repr(event))
            )
        return "\n".join(lines)


@contextmanager
def captured_log() -> Iterator[LogCapture]:
    """Collect global log events for the duration of the block."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    try:
        yield capture
    finally:
        globalLogPublisher.removeObserver(capture)
