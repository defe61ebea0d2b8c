"""The twisted.web side: one port, one ``Site``, every HTTP refusal.

- :class:`RelayChannel` is ``Site.protocol``: it owns the connection's slot in the
  limits, bounds the request head (431), bounds the opening handshake from the TCP accept
  however slowly bytes trickle in, and after the upgrade forwards bytes to the WebSocket
  protocol (public transport APIs only, so every reactor works, IOCP included).
- :class:`StreamGate` answers ``/publish/{stream}``, ``/watch/{stream}`` and ``/echo``:
  it refuses in the HTTP handshake, before any WebSocket exists, in the documented order
  (404, 400, 426, [431 in the channel], 503, 403, 401, 409), then hands the connection to
  Autobahn.
- Small resources serve ``/healthz``, ``/api/streams``, the index page and the player.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import time
import weakref
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from autobahn.util import wildcards2patterns
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ISSLTransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import NOT_DONE_YET

from streamrelay import wire
from streamrelay.config import RelayConfig
from streamrelay.limits import ConnectionLimiter, ConnectionSlot, HandshakeRateLimiter, Refusal
from streamrelay.names import is_valid_stream_name
from streamrelay.protocol import (
    EchoProtocol,
    PublisherProtocol,
    RelayProtocol,
    ViewerProtocol,
    configure_factory,
)
from streamrelay.streams import StreamRegistry
from streamrelay.tokens import TokenError, verify_token

_log = Logger()

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_REASONS = {
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Content Too Large",
    426: b"Upgrade Required",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@dataclass
class RelayContext:
    """Everything the web layer and the protocols share."""

    config: RelayConfig
    clock: IReactorTime
    registry: StreamRegistry
    limiter: ConnectionLimiter
    handshake_rate: HandshakeRateLimiter
    connections: set[RelayChannel] = field(default_factory=set)
    shutting_down: bool = False
    publisher_factory: WebSocketServerFactory | None = None
    viewer_factory: WebSocketServerFactory | None = None
    echo_factory: WebSocketServerFactory | None = None

    @classmethod
    def create(cls, config: RelayConfig, clock: IReactorTime) -> RelayContext:
        """Build the registry, limiters and one WebSocket factory per endpoint."""

        def prepare(payload: bytes, is_binary: bool) -> Any:
            assert context.viewer_factory is not None
            return context.viewer_factory.prepareMessage(
                payload, isBinary=is_binary, doNotCompress=True
            )

        context = cls(
            config=config,
            clock=clock,
            registry=StreamRegistry(config, clock, prepare),
            limiter=ConnectionLimiter(config.max_connections, config.max_connections_per_ip),
            handshake_rate=HandshakeRateLimiter(
                clock, config.max_handshakes_per_ip, config.handshake_burst
            ),
        )
        context.publisher_factory = _factory(context, PublisherProtocol, config.max_message_bytes)
        context.viewer_factory = _factory(
            context, ViewerProtocol, wire.MAX_VIEWER_MESSAGE_BYTES
        )
        context.echo_factory = _factory(
            context, EchoProtocol, config.max_message_bytes, compression=True
        )
        return context

    def drain(self) -> Deferred[None]:
        """Graceful stop: refuse new handshakes, close every connection (1001 for
        WebSockets), abort stragglers after the close timeout; fires when all are gone."""
        self.shutting_down = True
        done: Deferred[None] = Deferred()
        for channel in list(self.connections):
            channel.shut_down()

        def check() -> None:
            if not self.connections and not done.called:
                done.callback(None)

        def abort_stragglers() -> None:
            for channel in list(self.connections):
                channel.abort()
            check()
            if not done.called:
                # An abort is reported on the next reactor turn at the latest.
                self.clock.callLater(0.5, lambda: None if done.called else done.callback(None))

        poller = _Poller(self.clock, 0.05, check)
        deadline = self.clock.callLater(self.config.close_timeout, abort_stragglers)

        def finished(result: None) -> None:
            poller.stop()
            if deadline.active():
                deadline.cancel()

        done.addCallback(finished)
        check()
        return done


class _Poller:
    def __init__(self, clock: IReactorTime, interval: float, action: Any) -> None:
        self._clock = clock
        self._interval = interval
        self._action = action
        self._call: IDelayedCall | None = clock.callLater(interval, self._tick)

    def _tick(self) -> None:
        self._call = self._clock.callLater(self._interval, self._tick)
        self._action()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


def _factory(
    context: RelayContext, protocol: type[RelayProtocol], max_bytes: int, compression: bool = False
) -> WebSocketServerFactory:
    factory = WebSocketServerFactory()
    factory.protocol = protocol
    configure_factory(factory, context, max_bytes, compression=compression)
    return factory


# -- addresses ---------------------------------------------------------------------------


def peer_host(address: object) -> str:
    """The key the per-address limits use: the IP, or ``unix`` for unix sockets."""
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host
    return "unix"


def is_loopback(address: object) -> bool:
    """True for 127.0.0.0/8, ::1, ::ffff:127.0.0.0/104 and unix sockets."""
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        try:
            ip = ipaddress.ip_address(address.host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback
    return False


# Headers a reverse proxy adds: their presence means the loopback peer is a proxy.
_FORWARDING_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")


def is_direct_loopback(request: server.Request) -> bool:
    """A loopback peer whose request was not forwarded by a proxy on the same host."""
    headers = request.requestHeaders
    if any(headers.hasHeader(name) for name in _FORWARDING_HEADERS):
        return False
    return is_loopback(request.getClientAddress())


# -- the HTTP channel --------------------------------------------------------------------


def _raw_response(status: int, reason: str, retry_after: int | None = None) -> bytes:
    body = reason.encode("utf-8") + b"\n"
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    if retry_after is not None:
        lines.append(b"Retry-After: %d" % retry_after)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# Every channel and WebSocket protocol ever built, held weakly: leak accounting for
# /api/internals (an instance still listed after its connection ended is a leak).
LIVE_OBJECTS: weakref.WeakSet[object] = weakref.WeakSet()


class RelayChannel(http.HTTPChannel):
    """``Site.protocol``: limits, request-head bounds, the handshake deadline and the
    WebSocket upgrade."""

    context: RelayContext
    transport: Any

    def __init__(self) -> None:
        super().__init__()
        LIVE_OBJECTS.add(self)
        self.slot: ConnectionSlot | None = None
        self.refusal: Refusal | None = None
        self.upgraded: RelayProtocol | None = None
        self._deadline: IDelayedCall | None = None
        self._lingering: IDelayedCall | None = None
        self._refused = False
        self._in_request = False
        self._close_after_response = False
        self._head_bytes = 0
        self._head_lines = 0

    def connectionMade(self) -> None:
        """Take a slot in the limits (or remember why not) and start the deadline."""
        config = self.context.config
        self.MAX_LENGTH = config.max_header_line_bytes
        admitted = self.context.limiter.acquire(peer_host(self.transport.getPeer()))
        if isinstance(admitted, Refusal):
            self.refusal = admitted
        else:
            self.slot = admitted
        self.context.connections.add(self)
        super().connectionMade()
        self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self._deadline is None:
            self._deadline = self.callLater(
                self.context.config.handshake_timeout, self._deadline_passed
            )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        _log.info("Request head not received in time from {peer}: aborting",
                  peer=self.transport.getPeer())
        self.abort()

    # -- request head bounds -----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Forward to the WebSocket after the upgrade; otherwise parse HTTP."""
        if self.upgraded is not None:
            self.upgraded.dataReceived(data)
            return
        if self._refused:
            return
        if not self._in_request:
            self._arm_deadline()
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        """Bytes after the request head: the WebSocket's once upgraded."""
        if self.upgraded is not None:
            self.upgraded.dataReceived(data)
            return
        if self._refused:
            return
        super().rawDataReceived(data)

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

    def allHeadersReceived(self) -> None:
        """Refuse request bodies: no endpoint takes one, and they would be buffered."""
        request = self.requests[-1]
        headers = request.requestHeaders
        length = headers.getRawHeaders(b"content-length", [b"0"])[0]
        if headers.hasHeader(b"transfer-encoding") or length.strip() not in (b"0", b""):
            self.refuse(413, "request bodies are not accepted")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        """The request head is complete: the deadline is met."""
        self._cancel_deadline()
        self._head_bytes = 0
        self._head_lines = 0
        self._in_request = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        """Close after refusals; otherwise allow the next keep-alive request."""
        self._in_request = False
        if self._close_after_response:
            self.persistent = False
        super().requestDone(request)

    def close_after_response(self) -> None:
        """Do not keep this connection alive after the current response."""
        self._close_after_response = True

    def refuse(self, status: int, reason: str, retry_after: int | None = None) -> None:
        """Answer straight on the transport and close without resetting the peer."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        self.transport.write(_raw_response(status, reason, retry_after))
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

    # -- upgrade and teardown --------------------------------------------------------

    def upgrade(self, protocol: RelayProtocol) -> None:
        """Give the connection to a WebSocket protocol; this channel only forwards now."""
        self._cancel_deadline()
        self.setTimeout(None)
        self.upgraded = protocol
        # HTTPChannel registered itself as the transport's producer: make room for ours.
        self.transport.unregisterProducer()
        protocol.makeConnection(self.transport)

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
        """Release the slot and every timer; tell the WebSocket, if any."""
        self._cancel_deadline()
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()
        self._lingering = None
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        self.context.connections.discard(self)
        try:
            super().connectionLost(reason)
        finally:
            upgraded, self.upgraded = self.upgraded, None
            if upgraded is not None:
                upgraded.connectionLost(reason)


def _redacted_path(uri: bytes) -> str:
    # Tokens travel in the query string: the access log keeps only the path.
    return uri.split(b"?", 1)[0].split(b"#", 1)[0].decode("utf-8", "replace")


def access_log_line(timestamp: str, request: server.Request) -> str:
    """Combined log format with the query strings of the URI and the Referer removed."""
    referer = request.getHeader("referer")
    agent = request.getHeader("user-agent") or ""
    client = request.getClientAddress()
    host = getattr(client, "host", "-")
    method = request.method.decode("ascii", "replace")
    path = _redacted_path(request.uri)
    version = request.clientproto.decode("ascii", "replace")
    shown_referer = _redacted_path(referer.encode()) if referer else "-"
    shown_agent = agent.replace('"', "'")[:200]
    return (
        f'"{host}" - - {timestamp} "{method} {path} {version}" {request.code} '
        f'{request.sentLength or "-"} "{shown_referer}" "{shown_agent}"'
    )


class RelayRequest(server.Request):
    """A request whose description in log lines never shows the query (tokens)."""

    def __repr__(self) -> str:
        """Method and path only."""
        method = self.method.decode("ascii", "replace") if self.method else "?"
        path = _redacted_path(self.uri) if self.uri else "?"
        return f"<RelayRequest method={method} path={path}>"


class RelaySite(server.Site):
    """The relay's ``Site``: its channels share the :class:`RelayContext`."""

    protocol = RelayChannel  # type: ignore[assignment]
    requestFactory = RelayRequest

    def __init__(self, context: RelayContext, root: resource.Resource) -> None:
        # The reactor given here times every channel (HTTPFactory sets channel.callLater).
        super().__init__(
            root,
            logFormatter=access_log_line,
            reactor=context.clock,
            timeout=max(30, int(context.config.handshake_timeout)),
        )
        self.context = context

    def buildProtocol(self, addr: Any) -> Any:
        """Every channel knows the shared context."""
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.context = self.context
        return channel


# -- resources ---------------------------------------------------------------------------


def _plain(
    request: server.Request, status: int, text: str, retry_after: int | None = None
) -> bytes:
    request.setResponseCode(status, _REASONS.get(status))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    if retry_after is not None:
        request.setHeader(b"retry-after", b"%d" % retry_after)
    return text.encode("utf-8") + b"\n"


def _postpath(request: server.Request) -> list[bytes]:
    return request.postpath or []


def _channel(request: server.Request) -> RelayChannel | None:
    channel = request.channel
    return channel if isinstance(channel, RelayChannel) else None


class _HttpResource(resource.Resource):
    """A plain HTTP resource: refused (503) on a connection over the limits."""

    isLeaf = True

    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        self.context = context

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        """Apply the connection refusal, then serve GET and HEAD."""
        channel = _channel(request)
        if channel is not None and channel.refusal is not None:
            channel.close_after_response()
            refusal = channel.refusal
            return _plain(request, refusal.status, refusal.reason, refusal.retry_after)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _plain(request, 405, "method not allowed")
        body = self.serve(request)
        if request.method == b"HEAD":
            request.setHeader(b"content-length", b"%d" % len(body))
            return b""
        return body

    def serve(self, request: server.Request) -> bytes:
        """Answer the request (subclass hook)."""
        raise NotImplementedError


class NotFound(_HttpResource):
    """404 for every unknown path, before any other refusal (the documented order)."""

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """Say it plainly; close afterwards when the connection is over the limits."""
        channel = _channel(request)
        if channel is not None and channel.refusal is not None:
            channel.close_after_response()
        return self.serve(request)

    def serve(self, request: server.Request) -> bytes:
        """Say it plainly."""
        return _plain(request, 404, "not found")


class Health(_HttpResource):
    """``/healthz``: 200 ``ok``, 503 while shutting down."""

    def serve(self, request: server.Request) -> bytes:
        """Report liveness."""
        if self.context.shutting_down:
            return _plain(request, 503, "shutting down", retry_after=5)
        return _plain(request, 200, "ok")


class StreamsApi(_HttpResource):
    """``/api/streams``: streams with a publisher or viewers, and connection counts."""

    def serve(self, request: server.Request) -> bytes:
        """Describe the relay's streams as JSON."""
        loopback = is_direct_loopback(request)
        if self.context.config.view_secret is not None and not loopback:
            return _plain(request, 403, "stream list is only available from loopback")
        registry = self.context.registry
        body = {
            "streams": registry.describe(show_peers=loopback),
            "connections": {
                "publishers": registry.publisher_count,
                "viewers": registry.viewer_count,
                "total": self.context.limiter.total,
            },
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8")


class Internals(_HttpResource):
    """``/api/internals`` (loopback only): live object counts for leak accounting."""

    def serve(self, request: server.Request) -> bytes:
        """Count live channels and protocols after a full collection."""
        if not is_direct_loopback(request):
            return _plain(request, 403, "loopback only")
        gc.collect()
        counts: dict[str, int] = {}
        for item in list(LIVE_OBJECTS):
            name = type(item).__name__
            counts[name] = counts.get(name, 0) + 1
        context = self.context
        body = {
            "objects": counts,
            "streams": len(context.registry.streams),
            "connections": len(context.connections),
            "limiter": {
                "total": context.limiter.total,
                "addresses": context.limiter.tracked_addresses,
                "refused": context.limiter.refused,
            },
            "handshake_rate": {
                "addresses": context.handshake_rate.tracked_addresses,
                "refused": context.handshake_rate.refused,
            },
            "buffered_bytes": context.registry.budget.total,
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode("utf-8")


_CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".png": b"image/png",
    ".ico": b"image/x-icon",
    ".json": b"application/json",
    ".txt": b"text/plain; charset=utf-8",
}


def load_static_files() -> dict[str, bytes]:
    """Read the packaged pages into memory once, before the reactor runs (no file I/O
    on the reactor thread)."""
    files: dict[str, bytes] = {}
    folder = resources.files("streamrelay").joinpath("static")
    if folder.is_dir():
        for entry in folder.iterdir():
            if entry.is_file() and "." + entry.name.rsplit(".", 1)[-1] in _CONTENT_TYPES:
                files[entry.name] = entry.read_bytes()
    return files


class StaticPage(_HttpResource):
    """A packaged file served from memory with its content type and a strict CSP."""

    def __init__(self, context: RelayContext, files: dict[str, bytes], name: str | None) -> None:
        super().__init__(context)
        self._files = files
        self._name = name

    def serve(self, request: server.Request) -> bytes:
        """Serve ``name`` (fixed) or the file named by the single path segment."""
        name = self._name
        if name is None:
            if len(_postpath(request)) != 1:
                return _plain(request, 404, "not found")
            name = _postpath(request)[0].decode("utf-8", "replace")
        elif _postpath(request) not in ([], [b""]) and name == "index.html":
            return _plain(request, 404, "not found")
        content = self._files.get(name)
        if content is None:
            return _plain(request, 404, "not found")
        extension = "." + name.rsplit(".", 1)[-1]
        request.setHeader(b"content-type", _CONTENT_TYPES[extension])
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY.encode())
        request.setHeader(b"x-content-type-options", b"nosniff")
        # The player's URL may carry ?token=: never let it leave in a Referer.
        request.setHeader(b"referrer-policy", b"no-referrer")
        request.setHeader(b"cache-control", b"no-cache")
        return content


class PlayerPage(StaticPage):
    """``/view/{stream}``: the player page, for a valid stream name."""

    def __init__(self, context: RelayContext, files: dict[str, bytes]) -> None:
        super().__init__(context, files, "player.html")

    def serve(self, request: server.Request) -> bytes:
        """Check the stream name, then serve the player."""
        if len(_postpath(request)) != 1:
            return _plain(request, 404, "not found")
        if not is_valid_stream_name(_postpath(request)[0].decode("utf-8", "replace")):
            return _plain(request, 400, "invalid stream name")
        request.postpath = []
        return super().serve(request)


def _origin_allowed(origin: str, patterns: list[Any], null_listed: bool) -> bool:
    if origin == "null":
        return null_listed
    return any(pattern.match(origin) for pattern in patterns)


class StreamGate(resource.Resource):
    """The WebSocket endpoints: every refusal in the HTTP handshake, then Autobahn."""

    isLeaf = True

    def __init__(self, context: RelayContext, role: str) -> None:
        super().__init__()
        self.context = context
        self.role = role
        config = context.config
        origins = list(config.publish_origins if role == "publish" else config.view_origins)
        self._origin_patterns = wildcards2patterns([o for o in origins if o != "null"])
        self._null_origin_allowed = "null" in origins

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        """Refuse with a status and reason, or upgrade to a WebSocket."""
        channel = _channel(request)
        name = ""
        segments = _postpath(request)
        if self.role == "echo":
            if segments not in ([], [b""]):
                return self._refuse(request, Refusal(404, "not found"))
        else:
            if len(segments) != 1 or not segments[0]:
                return self._refuse(request, Refusal(404, "not found"))
            name = segments[0].decode("utf-8", "replace")
            if not is_valid_stream_name(name):
                return self._refuse(request, Refusal(400, "invalid stream name"))
        upgrade = (request.getHeader("upgrade") or "").lower()
        if request.method != b"GET" or upgrade != "websocket":
            request.setHeader(b"upgrade", b"websocket")
            return self._refuse(request, Refusal(426, "this is a WebSocket endpoint"))
        refusal = self._admission(request, channel, name)
        if refusal is not None:
            return self._refuse(request, refusal)
        assert channel is not None
        self._hand_over(request, channel, name)
        return NOT_DONE_YET

    def _admission(
        self, request: server.Request, channel: RelayChannel | None, name: str
    ) -> Refusal | None:
        context = self.context
        address = request.getClientAddress()
        if context.shutting_down:
            return Refusal(503, "server shutting down", retry_after=5)
        if channel is None:
            return Refusal(503, "unsupported transport", retry_after=5)
        if channel.refusal is not None:
            return channel.refusal
        refusal = context.handshake_rate.allow(peer_host(address))
        if refusal is not None:
            return refusal
        later: Refusal | None = None
        if self.role == "publish":
            later = context.registry.check_publisher(name)
        elif self.role == "watch":
            later = context.registry.check_viewer(name, peer_host(address))
        if later is not None and later.status == 503:
            return later
        origin = request.getHeader("origin")
        if origin is not None and self.role != "echo":
            if not _origin_allowed(origin, self._origin_patterns, self._null_origin_allowed):
                return Refusal(403, "origin not allowed")
        secret = (
            context.config.publish_secret if self.role == "publish" else
            context.config.view_secret if self.role == "watch" else None
        )
        if self.role == "publish" and secret is None and not is_direct_loopback(request):
            return Refusal(403, "publishing is only allowed from loopback without a secret")
        if secret is not None:
            token = self._token(request)
            if token is None:
                return Refusal(401, "token required")
            role = "publish" if self.role == "publish" else "view"
            try:
                verify_token(secret, token, role, name, time.time())
            except TokenError as error:
                return Refusal(401, str(error))
        return later

    @staticmethod
    def _token(request: server.Request) -> str | None:
        authorization = request.getHeader("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        values = request.args.get(b"token")
        if values:
            return values[0].decode("utf-8", "replace")
        return None

    def _refuse(self, request: server.Request, refusal: Refusal) -> bytes:
        channel = _channel(request)
        if channel is not None:
            channel.close_after_response()
        return _plain(request, refusal.status, refusal.reason, refusal.retry_after)

    def _hand_over(self, request: server.Request, channel: RelayChannel, name: str) -> None:
        context = self.context
        factory = {
            "publish": context.publisher_factory,
            "watch": context.viewer_factory,
            "echo": context.echo_factory,
        }[self.role]
        assert factory is not None
        protocol: Any = factory.buildProtocol(request.getClientAddress())
        LIVE_OBJECTS.add(protocol)
        protocol.context = context
        protocol.stream_name = name
        channel.upgrade(protocol)
        # Autobahn parses the handshake itself: replay the head twisted.web consumed,
        # without the query string, which may carry a token.
        head = [request.method + b" " + request.path + b" HTTP/1.1"]
        for header_name, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                head.append(header_name + b": " + value)
        protocol.dataReceived(b"\r\n".join(head) + b"\r\n\r\n")


class Root(resource.Resource):
    """Routes the first path segment to its resource."""

    def __init__(self, context: RelayContext, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.context = context
        files = load_static_files() if files is None else files
        self._not_found = NotFound(context)
        self._routes: dict[bytes, resource.Resource] = {
            b"": StaticPage(context, files, "index.html"),
            b"healthz": Health(context),
            b"static": StaticPage(context, files, None),
            b"view": PlayerPage(context, files),
            b"publish": StreamGate(context, "publish"),
            b"watch": StreamGate(context, "watch"),
        }
        if context.config.echo:
            self._routes[b"echo"] = StreamGate(context, "echo")
        self._api = _ApiFolder(context)

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        """Pick the resource for the first segment; 404 for anything unknown."""
        if path == b"api":
            return self._api
        return self._routes.get(path, self._not_found)

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """Requests for ``/`` are routed by ``getChildWithDefault``; this is a fallback."""
        return self._not_found.render(request)  # type: ignore[return-value]


class _ApiFolder(resource.Resource):
    def __init__(self, context: RelayContext) -> None:
        super().__init__()
        self._children: dict[bytes, resource.Resource] = {
            b"streams": StreamsApi(context),
            b"internals": Internals(context),
        }
        self._not_found = NotFound(context)

    def render(self, request: server.Request) -> bytes:  # type: ignore[override]
        """``/api`` itself is not a resource."""
        return self._not_found.render(request)  # type: ignore[return-value]

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        child = self._children.get(path)
        if child is not None and _postpath(request) in ([], [b""]):
            return child
        return self._not_found
