"""The HTTP channel: :class:`RelayChannel` is the relay ``Site``'s protocol, one per TCP
connection.

It owns the connection's slot in the limits, bounds the request head (431), refuses
request bodies (413) and malformed heads (400) with the relay's own plain answers,
bounds the opening handshake from the TCP accept however slowly bytes trickle in, and
after the WebSocket upgrade forwards bytes to the protocol (public transport APIs only,
so every reactor works, IOCP included).  It writes the one line logged when its WebSocket
opens and the one when it closes (role, stream, client, duration, close code, bytes),
and counts both, and every refusal, for ``/metrics``.  A connection's first read is
offered to :mod:`streamrelay.upgrade` (through the site) first: a WebSocket opening
handshake is answered from its head there, without twisted.web.

With ``--trust-proxy``, the per-address connection limit can only know the client once
the request head has arrived: until then the connection counts towards the global
limit alone, and each request head moves its slot to the client it names.

(Over 400 lines: the channel is one state machine -- limits, head bounds, deadline,
refusals, upgrade and the open/close lines -- whose hooks into twisted.web's
``HTTPChannel`` read best together; the head-only upgrade and the refusal answers live
in :mod:`streamrelay.upgrade` and :mod:`streamrelay.answers`.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.error import ConnectionAborted
from twisted.internet.interfaces import IAddress, IDelayedCall, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server

from streamrelay import wire
from streamrelay.addresses import describe_address
from streamrelay.answers import REASONS as REASONS  # re-exported for resources
from streamrelay.answers import raw_answer
from streamrelay.context import RelayContext
from streamrelay.deadlines import Deadlines
from streamrelay.limits import ConnectionSlot, Refusal
from streamrelay.logs import limited, relay_logger
from streamrelay.peers import peer_host
from streamrelay.protocol import RelayProtocol

_log = relay_logger(__name__)

# The lines logged when a WebSocket opens and closes (each format string is a kind for
# the log's rate limit: logs.limited).
_OPENED = "{role} opened stream={stream} peer={peer}"
_OPENED_VIA = _OPENED + " via={via}"
_CLOSE_TAIL = (
    " after {duration:.1f}s code={code} by={by} clean={clean} in={bytes_in}B out={bytes_out}B"
)
_CLOSED = "{role} closed stream={stream} peer={peer}" + _CLOSE_TAIL
_CLOSED_VIA = "{role} closed stream={stream} peer={peer} via={via}" + _CLOSE_TAIL


@dataclass
class WebSocketRecord:
    """What the channel remembers of its open WebSocket, for the line logged at close."""

    role: str
    stream: str
    peer: str  # the client, as the gate judged it
    via: str | None  # the TCP peer, when a trusted proxy forwarded the client
    opened_at: float


def close_outcome(protocol: Any, reason: Failure) -> tuple[int | None, str, bool]:
    """How a WebSocket ended, from Autobahn's record and the loss ``reason``: the close
    code of whoever closed first (None: no close frame at all, which RFC 6455 reports as
    1006), who that was (``relay`` or ``peer``; without close frames, the relay when it
    aborted or dropped the connection), and whether the closing handshake completed."""
    by_relay = bool(getattr(protocol, "closedByMe", False))
    local = getattr(protocol, "localCloseCode", None)
    remote = getattr(protocol, "remoteCloseCode", None)
    code = local if by_relay else remote
    if not by_relay and remote is None:
        by_relay = bool(getattr(protocol, "droppedByMe", False)) or bool(
            reason.check(ConnectionAborted)
        )
    return code, "relay" if by_relay else "peer", bool(getattr(protocol, "wasClean", False))


def channel_of(request: server.Request) -> RelayChannel | None:
    """The relay channel a request arrived on (None on any other transport)."""
    channel = request.channel
    return channel if isinstance(channel, RelayChannel) else None


class RelayChannel(http.HTTPChannel):
    """``Site.protocol``: limits, request-head bounds, the handshake deadline and the
    WebSocket upgrade."""

    context: RelayContext
    transport: Any
    site: Any  # set by the Site that builds the channel (RelaySite)

    def __init__(self) -> None:
        super().__init__()
        self.slot: ConnectionSlot | None = None
        self.refusal: Refusal | None = None
        self.upgraded: RelayProtocol | None = None
        self.websocket: WebSocketRecord | None = None
        # Bytes read after the upgrade (the close line reports them).
        self.bytes_in = 0
        # When the current request began: the accept, or the end of the previous one.
        self.request_began = 0.0
        self._deadline: IDelayedCall | None = None
        self._lingering: IDelayedCall | None = None
        self._refused = False
        self._in_request = False
        self._close_after_response = False
        self._head_bytes = 0
        self._head_lines = 0
        # The connection's first read may be answered from the head (streamrelay.upgrade).
        self._first_read = True
        # The site's shared handshake deadlines (None: a callLater of our own), and
        # twisted.web's idle timeout, held back until twisted.web parses a request.
        self._deadlines: Deadlines | None = None
        self._web_timeout: int | None = None

    def connectionMade(self) -> None:
        """Take a slot in the limits (or remember why not) and start the deadline."""
        config = self.context.config
        self.MAX_LENGTH = config.max_header_line_bytes
        self.request_began = self.context.clock.seconds()
        # The TCP peer, asked once (each getPeer() builds a new address object).
        self.peer_address: IAddress = self.transport.getPeer()
        key = peer_host(self.peer_address)
        if config.trust_proxy:
            # The client is known once the head arrives (moved_to_client).
            key = f"pending connection {id(self)}"
        admitted = self.context.limiter.acquire(key)
        if isinstance(admitted, Refusal):
            self.refusal = admitted
        else:
            self.slot = admitted
        self.context.connection_opened(self)
        self._deadlines = getattr(self.site, "handshake_deadlines", None)
        # twisted.web's set-up (TCP_NODELAY, its idle timer, itself as the transport's
        # producer) waits until it has a request to parse: most connections are
        # WebSockets answered from their head, or refused from it.  The handshake
        # deadline covers the connection until then.
        self._web_timeout, self.timeOut = self.timeOut, None
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadlines is not None:
            self._deadlines.arm(self, self._deadline_passed)
        elif self._deadline is None:
            self._deadline = self.callLater(
                self.context.config.handshake_timeout, self._deadline_passed
            )

    def _cancel_deadline(self) -> None:
        if self._deadlines is not None:
            self._deadlines.disarm(self)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _start_web(self) -> None:
        # twisted.web parses from now on: its connection set-up, idle timeout included,
        # applies as it always did.
        self.timeOut, self._web_timeout = self._web_timeout, None
        super().connectionMade()

    def _deadline_passed(self) -> None:
        self._deadline = None
        _log.info("Request head not received in time from {peer}: aborting",
                  peer=self.transport.getPeer())
        self.abort()

    # -- the request head ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Forward to the WebSocket after the upgrade; otherwise parse HTTP."""
        if self._passed_on(data):
            return
        if self._first_read:
            self._first_read = False
            upgrade_from_head = getattr(self.site, "upgrade_from_head", None)
            if upgrade_from_head is not None and upgrade_from_head(self, data):
                return
            self._start_web()
        if not self._in_request:
            self._arm_deadline()
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        """Bytes after the request head: the WebSocket's once upgraded."""
        if self._passed_on(data):
            return
        super().rawDataReceived(data)

    def _passed_on(self, data: bytes) -> bool:
        # True when ``data`` is not for twisted.web: the WebSocket's once upgraded
        # (counted and handed over), or dropped after a refusal.
        if self.upgraded is not None:
            self.bytes_in += len(data)
            self.upgraded.dataReceived(data)
            return True
        return self._refused

    def lineReceived(self, line: bytes) -> None:
        """Bound the request head: 431 rather than twisted.web's bare 400."""
        if self._refused:
            return
        config = self.context.config
        self._head_bytes += len(line) + 2
        if line:  # the blank line that ends the head is not a header line
            self._head_lines += 1
        if self._head_bytes > config.max_header_bytes:
            self.refuse(431, "request headers too large")
            return
        # The request line is not a header line.
        if self._head_lines > config.max_header_lines + 1:
            self.refuse(431, "too many request header lines")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request or header line over the bound, possibly with no end."""
        self.refuse(431, "request header line too long")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's one answer to a head it cannot parse (request line, header,
        Content-Length or Transfer-Encoding): give it as our own refusals are given, so
        that the answer survives the unread input and nothing after it is parsed."""
        self.refuse(400, "malformed request")

    def allHeadersReceived(self) -> None:
        """Refuse request bodies: no endpoint takes one, and they would be buffered.

        twisted.web has parsed the framing by now: ``length`` is the Content-Length
        (leading zeros and all), None for chunked, 0 when there is neither.  Any
        Transfer-Encoding announces a body coding, even ``identity``."""
        request = self.requests[-1]
        if request.requestHeaders.hasHeader(b"transfer-encoding") or self.length != 0:
            self.refuse(413, "request bodies are not accepted")
            return
        super().allHeadersReceived()

    def head_received(self) -> None:
        """A whole request head has arrived (twisted.web's, or one answered straight
        from the head): the deadline is met."""
        self._cancel_deadline()
        self._head_bytes = 0
        self._head_lines = 0
        self._in_request = True

    def allContentReceived(self) -> None:
        """The request head is complete: the deadline is met.  Nothing is served after
        a refusal (twisted.web calls this at once for a head that announced no length)."""
        if self._refused:
            return
        self.head_received()
        if self.context.config.trust_proxy and self.requests:
            self._move_to_client(self.requests[-1].getClientAddress())
        super().allContentReceived()

    def _move_to_client(self, client: IAddress) -> None:
        """Count this connection towards the client the request names (a proxy's
        connection may carry several clients' requests in turn)."""
        key = peer_host(client)
        if self.slot is None or self.slot.address == key:
            return
        self.slot.release()
        self.slot = None
        admitted = self.context.limiter.acquire(key)
        if isinstance(admitted, Refusal):
            self.refusal = admitted
        else:
            self.slot = admitted

    def requestDone(self, request: http.Request) -> None:
        """Close after refusals; otherwise allow the next keep-alive request."""
        self._in_request = False
        self.request_began = self.context.clock.seconds()
        if self._close_after_response:
            self.persistent = False
        super().requestDone(request)

    # -- refusals ------------------------------------------------------------------------

    def close_after_response(self) -> None:
        """Do not keep this connection alive after the current response."""
        self._close_after_response = True

    def refuse(
        self,
        status: int,
        reason: str,
        retry_after: int | None = None,
        request: Any = None,
        drained: bool = False,
    ) -> None:
        """Answer straight on the transport and close without resetting the peer; a
        ``request`` answered this way (:mod:`streamrelay.upgrade`) is access-logged.

        ``drained``: everything the peer sent has been read, and it is a client that
        waits for the answer (a WebSocket handshake): closing cannot reset it, so the
        connection closes at once rather than lingering."""
        if self._refused:
            return
        self._refused = True
        self.context.metrics.refused(status)
        self._cancel_deadline()
        self.setTimeout(None)
        self.transport.write(raw_answer(status, reason, retry_after))
        if request is not None:
            request.code = status
            request.sentLength = len(reason.encode("utf-8")) + 1  # the body, as twisted.web
            self.site.log(request)
        if drained:
            self.transport.loseConnection()
        else:
            self._linger()

    def _linger(self) -> None:
        # Closing with unread input makes the kernel send RST, which can destroy the
        # response in flight: half-close, keep reading (and discarding) for a while.
        if ISSLTransport.providedBy(self.transport):
            # Under TLS a half-close would skip close_notify: close the TLS session.
            self.transport.loseConnection()
        else:
            try:
                self.transport.loseWriteConnection()
            except (AttributeError, NotImplementedError):
                self.transport.loseConnection()
        self._lingering = self.callLater(self.context.config.close_timeout, self.abort)

    # -- upgrade and teardown ------------------------------------------------------------

    def upgrade(self, protocol: RelayProtocol) -> None:
        """Give the connection to a WebSocket protocol; this channel only forwards now."""
        self._cancel_deadline()
        self.setTimeout(None)
        self.upgraded = protocol
        # HTTPChannel registered itself as the transport's producer: make room for ours.
        self.transport.unregisterProducer()
        # The request that asked for the upgrade is answered by the WebSocket: keeping
        # it (its headers and body buffer, ~2 KB) for the connection's life serves nothing.
        self.requests.clear()
        protocol.makeConnection(self.transport)

    def websocket_opened(self, protocol: RelayProtocol, client: IAddress) -> None:
        """The handshake succeeded: log the opening line and count it."""
        now = self.context.clock.seconds()
        peer = self.peer_address
        shown = describe_address(client)
        via = describe_address(peer) if client != peer else None
        record = WebSocketRecord(protocol.role.label, protocol.stream_name, shown, via, now)
        self.websocket = record
        self.context.metrics.opened(record.role, now - self.request_began)
        line = _OPENED_VIA if via else _OPENED
        if limited.over_rate(__name__, line):
            return  # counted as suppressed; a handshake storm formats nothing
        _log.info(
            line,
            kind="connection.open",
            role=record.role,
            stream=record.stream,
            peer=record.peer,
            via=via,
        )

    def _websocket_closed(self, protocol: RelayProtocol, reason: Failure) -> None:
        """Log the closing line and count it (once: the record is dropped)."""
        record, self.websocket = self.websocket, None
        if record is None:
            return
        code, by, clean = close_outcome(protocol, reason)
        stats = getattr(protocol, "trafficStats", None)
        bytes_out = 0
        if stats is not None:
            bytes_out = stats.outgoingOctetsWireLevel + stats.preopenOutgoingOctetsWireLevel
        duration = max(0.0, self.context.clock.seconds() - record.opened_at)
        self.context.metrics.closed(record.role, code)
        line = _CLOSED_VIA if record.via else _CLOSED
        if limited.over_rate(__name__, line):
            return
        _log.info(
            line,
            kind="connection.close",
            role=record.role,
            stream=record.stream,
            peer=record.peer,
            via=record.via,
            duration=round(duration, 3),
            code=code if code is not None else 1006,
            by=by,
            clean=clean,
            bytes_in=self.bytes_in,
            bytes_out=bytes_out,
        )

    def shut_down(self) -> None:
        """Server stopping: 1001 for WebSockets, close idle HTTP connections."""
        if self.upgraded is not None:
            self.upgraded.close_with(wire.CLOSE_GOING_AWAY, "server shutting down")
        elif not self._in_request:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the TCP connection now."""
        if self.transport is not None:
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Release the slot and every timer; tell the WebSocket, if any; then the
        context, last, since the graceful stop may complete with this connection."""
        self._cancel_deadline()
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        self._lingering = None
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        try:
            super().connectionLost(reason)
        finally:
            upgraded, self.upgraded = self.upgraded, None
            try:
                if upgraded is not None:
                    try:
                        upgraded.connectionLost(reason)
                    finally:
                        self._websocket_closed(upgraded, reason)
            finally:
                self.context.connection_closed(self)
