"""Test doubles shared by the network-free tests.

- :class:`Relay`: the real ``RelaySite`` / ``RelayChannel`` / ``StreamGate`` /
  Autobahn protocols on a :class:`~twisted.internet.task.Clock`, one
  :class:`Peer` (a ``StringTransport``) per fake TCP connection;
- :class:`LogCapture`: collects failures and critical events from the global log.

Frames and HTTP heads are written and parsed with :mod:`tests.support.frames` and
:mod:`tests.support.http`, as in every other suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from streamrelay.config import RelayConfig
from streamrelay.context import RelayContext
from streamrelay.web import RelaySite, Root
from tests.support.frames import Message, assemble, parse_frames
from tests.support.http import Response, parse_response, request_head, upgrade_headers

# The Host every fake request names (the relay does not route on it).
HOST = "relay.test"

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

    def request(self, method: str, target: str, headers: dict[str, str] | None = None) -> Response:
        """Send a request head and parse the response."""
        self.send(request_head(method, target, {"Host": HOST} if headers is None else headers))
        return self.response()

    def upgrade(
        self,
        target: str,
        extra: dict[str, str] | None = None,
        subprotocol: str | None = "streamrelay.v1",
    ) -> Response:
        """Send an opening handshake; after a 101, :meth:`messages` parses frames."""
        headers = upgrade_headers(subprotocol, host=HOST)
        headers.update(extra or {})
        return self.request("GET", target, headers)

    # -- output -------------------------------------------------------------------------

    @property
    def written(self) -> bytes:
        """Every byte the relay wrote on this connection."""
        return self.transport.value()

    def response(self) -> Response:
        """The HTTP response written so far."""
        response = parse_response(self.written, until_close=True)
        assert response is not None, f"no complete HTTP response head in {self.written[:200]!r}"
        if response.status == 101 and self._frame_offset is None:
            self._frame_offset = len(self.written) - len(response.rest)
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
    def producer(self) -> IPushProducer:
        """The producer registered on the transport (fails the test when there is none)."""
        producer = self.transport.producer
        assert producer is not None, "no producer registered on the transport"
        assert self.transport.streaming, "the registered producer is not a push producer"
        return producer

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


@implementer(ILogObserver)
class LogCapture:
    """Every event on the global log publisher while active."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    @property
    def failures(self) -> list[LogEvent]:
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
