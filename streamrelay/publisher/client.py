"""The network side of a publisher: one WebSocket to the relay, kept up for as long as needed.

:class:`Publisher` connects to ``ws(s)://HOST:PORT/publish/{stream}`` offering the
``streamrelay.v1`` subprotocol, sends what it is given (meta, CONFIG, frames) and reconnects
with exponential backoff and full jitter whenever the relay goes away or refuses. After every
(re)connect it sends the latest meta and CONFIG again, then only frames from the next KEY on,
and asks the application for that KEY through ``on_keyframe_request``.

Backpressure uses public Twisted APIs only: the publisher registers a push producer on the
WebSocket's transport, so Twisted tells it when its write buffer is over its bound. While
paused, messages wait in a bounded outbox; above ``queue_high_water_bytes`` :attr:`readiness`
says CONGESTED (an encoder should drop raw frames then); a frame that would take the outbox
over ``queue_limit_bytes`` is dropped, with every frame after it until the next KEY.

All methods run in the reactor thread, except the ``*_threadsafe`` ones and
:attr:`readiness`, which any thread may use.
"""

from __future__ import annotations

import enum
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectionResponse
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .backoff import Backoff
from .wire import (
    FLAG_CONFIG,
    FLAG_KEY,
    MAX_META_BYTES,
    SUBPROTOCOL,
    WireFormatError,
    encode_control,
    now_us,
    pack_media_message,
    parse_control,
)

_log = Logger()

CLOSE_REPLACED: Final = 4409
DEFAULT_URL: Final = "ws://127.0.0.1:8080/publish/demo"
USER_AGENT: Final = "streamrelay-publish/0.1"


class ConnectionState(enum.Enum):
    """Where the publisher's connection stands."""

    IDLE = "idle"
    CONNECTING = "connecting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    STOPPED = "stopped"


class Readiness(enum.Enum):
    """Whether a new frame would go out now (see :attr:`Publisher.readiness`)."""

    READY = "ready"
    CONGESTED = "congested"
    OFFLINE = "offline"


@dataclass
class PublisherStats:
    """Counters since the publisher was created (reactor thread)."""

    connects: int = 0
    messages_sent: int = 0
    bytes_sent: int = 0
    frames_sent: int = 0
    keyframes_sent: int = 0
    configs_sent: int = 0
    frames_dropped: int = 0
    keyframe_requests: int = 0


@dataclass(frozen=True, slots=True)
class RelayTarget:
    """A parsed relay URL."""

    url: str
    secure: bool
    host: str
    port: int

    @property
    def display_url(self) -> str:
        """The URL without query or credentials, safe to print."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_relay_url(url: str) -> RelayTarget:
    """Validate a ``ws://`` or ``wss://`` URL (``http(s)://`` is accepted and converted)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss"):
        raise ValueError(f"relay URL must start with ws:// or wss://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"relay URL has no host: {url!r}")
    if parts.fragment:
        raise ValueError("relay URL must not have a #fragment")
    try:
        port = parts.port or (443 if scheme == "wss" else 80)
    except ValueError:
        raise ValueError(f"relay URL has a bad port: {url!r}") from None
    path = parts.path or "/"
    normalized = urlunsplit((scheme, parts.netloc, path, parts.query, ""))
    return RelayTarget(normalized, scheme == "wss", parts.hostname, port)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClientTLS:
    """TLS without certificate verification (``--insecure``), still sending SNI."""

    def __init__(self, hostname: str) -> None:
        from OpenSSL import SSL
        from twisted.internet.ssl import CertificateOptions

        self._ssl = SSL
        self._hostname = hostname
        self._context = CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol: object) -> Any:  # noqa: N802 (interface)
        """Make an OpenSSL connection object for one TLS client connection."""
        connection = self._ssl.Connection(self._context, None)
        if not (isIPAddress(self._hostname) or isIPv6Address(self._hostname)):
            connection.set_tlsext_host_name(self._hostname.encode("idna"))
        connection.set_app_data(tlsProtocol)
        return connection


def default_endpoint(
    reactor: Any, target: RelayTarget, insecure: bool = False, timeout: float = 10.0
) -> IStreamClientEndpoint:
    """A TCP (and for wss://, TLS) endpoint to the relay; certificates are verified
    against the system trust store unless ``insecure``."""
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, target.host, target.port, timeout=timeout
    )
    if target.secure:
        from twisted.internet.ssl import optionsForClientTLS

        creator: Any = (
            _UnverifiedClientTLS(target.host) if insecure else optionsForClientTLS(target.host)
        )
        endpoint = wrapClientTLS(creator, endpoint)
    return endpoint


EndpointFactory = Callable[[Any, RelayTarget, bool], IStreamClientEndpoint]


@implementer(IPushProducer)
class _FlowControl:
    """Registered on the WebSocket transport: relays Twisted's pause/resume to the publisher."""

    def __init__(self, publisher: Publisher, session: _PublisherProtocol) -> None:
        self._publisher = publisher
        self._session = session

    def pauseProducing(self) -> None:  # noqa: N802 (interface)
        """The transport's buffer is over its bound: hold messages back."""
        self._publisher._transport_paused(self._session)

    def resumeProducing(self) -> None:  # noqa: N802 (interface)
        """The transport's buffer has drained: send what waits."""
        self._publisher._transport_resumed(self._session)

    def stopProducing(self) -> None:  # noqa: N802 (interface)
        """The connection is going away; the close callback does the clean-up."""


class _PublisherProtocol(WebSocketClientProtocol):
    """The Autobahn client protocol: forwards events to its :class:`Publisher`."""

    # Autobahn logs the raw opening handshake, Authorization header included, at debug
    # level. A logger pinned at error keeps the token out of every log whatever level the
    # application sets globally for txaio, and drops Autobahn's chatter about failed
    # handshakes, which the publisher reports itself, once, with the retry delay.
    # (txaio sets make_logger up at run time, hence the ignore.)
    log = txaio.make_logger(level="error")  # type: ignore[attr-defined]

    factory: _PublisherFactory

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        """Register with the publisher first: the handshake may complete at any time now."""
        self.factory.publisher._tcp_connected(self)
        super().connectionMade()

    def onConnect(self, response: ConnectionResponse) -> None:  # noqa: N802 (Autobahn API)
        """Note the negotiated subprotocol (none means v1 too)."""
        self.negotiated_subprotocol = response.protocol

    def onOpen(self) -> None:  # noqa: N802 (Autobahn API)
        """Register for backpressure and hand the open session to the publisher."""
        transport: Any = self.transport
        transport.registerProducer(_FlowControl(self.factory.publisher, self), True)
        self.factory.publisher._session_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        """Pass relay messages to the publisher."""
        self.factory.publisher._message_received(self, payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        """Tell the publisher, which decides about reconnecting."""
        self.factory.publisher._session_closed(self, wasClean, code, reason)


class _PublisherFactory(WebSocketClientFactory):
    protocol = _PublisherProtocol  # type: ignore[assignment]  # Autobahn's is untyped
    noisy = False  # one factory per attempt: "Starting factory" on each would be noise

    def __init__(self, publisher: Publisher, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.publisher = publisher


_STATUS_IN_REASON = re.compile(r"upgrade failed \[(\d{3})\]: ?([^\"')]*)")


_UNCLEAN_WRAPPER = re.compile(r"^connection was closed uncleanly \((.*)\)$", re.DOTALL)


def handshake_refusal(reason: str | None) -> tuple[int, str] | None:
    """The HTTP status and reason with which the relay refused a handshake, if it did."""
    match = _STATUS_IN_REASON.search(reason or "")
    return (int(match.group(1)), match.group(2)) if match else None


def short_close_reason(reason: str | None) -> str:
    """Autobahn's close reason without its "closed uncleanly (...)" wrapper and quotes."""
    text = (reason or "").strip()
    match = _UNCLEAN_WRAPPER.match(text)
    if match:
        text = match.group(1).strip().strip("\"'")
    return text


class Publisher:
    """Publishes one stream to a relay; see the module docstring for the behaviour.

    ``token`` goes out as ``Authorization: Bearer ...`` and is never logged.
    ``on_viewers(count)`` runs when the relay reports the viewer count;
    ``on_keyframe_request()`` when the next frame should be a KEY (the relay asked, the
    connection (re)opened, or frames were dropped); ``on_state_change(state)`` on every
    :class:`ConnectionState` change. They run in the reactor thread.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        reactor: Any = None,
        insecure: bool = False,
        backoff: Backoff | None = None,
        on_viewers: Callable[[int], None] | None = None,
        on_keyframe_request: Callable[[], None] | None = None,
        on_state_change: Callable[[ConnectionState], None] | None = None,
        queue_high_water_bytes: int = 256 * 1024,
        queue_limit_bytes: int = 1024 * 1024,
        max_pending_threadsafe_calls: int = 8,
        ping_interval: float = 10.0,
        ping_timeout: float = 10.0,
        open_timeout: float = 10.0,
        close_timeout: float = 2.0,
        stable_after: float = 5.0,
        reconnect_when_replaced: bool = False,
        endpoint_factory: EndpointFactory | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if token is not None and (not token or any(c in token for c in "\r\n\0")):
            raise ValueError("token must be non-empty and single-line")
        if not 0 < queue_high_water_bytes <= queue_limit_bytes:
            raise ValueError("need 0 < queue_high_water_bytes <= queue_limit_bytes")
        self.target = parse_relay_url(url)
        self._reactor: IReactorTime = reactor
        self._token = token
        self._insecure = insecure
        self._backoff = backoff or Backoff()
        self.on_viewers = on_viewers
        self.on_keyframe_request = on_keyframe_request
        self.on_state_change = on_state_change
        self._high_water = queue_high_water_bytes
        self._low_water = queue_high_water_bytes // 4
        self._queue_limit = queue_limit_bytes
        self._max_pending_calls = max_pending_threadsafe_calls
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._stable_after = stable_after
        self._reconnect_when_replaced = reconnect_when_replaced
        self._endpoint_factory: EndpointFactory = endpoint_factory or default_endpoint

        self.stats = PublisherStats()
        self.viewers: int | None = None
        self.last_error: str | None = None
        self._state = ConnectionState.IDLE
        self._stopping = False
        self._stop_reason: str | None = None
        self._stopped_waiters: list[defer.Deferred[str]] = []

        self._connect_attempt: defer.Deferred[Any] | None = None
        self._handshaking: _PublisherProtocol | None = None
        self._session: _PublisherProtocol | None = None
        self._opened_at = 0.0
        self._retry_call: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None

        self._meta: dict[str, Any] | None = None
        self._config: bytes | None = None
        self._outbox: deque[tuple[bytes, bool, str]] = deque()
        self._outbox_bytes = 0
        self._paused = False
        self._congested = False
        self._awaiting_key = True
        self._dropping_until_key = False
        self._keyframe_needed = False

        # Read by other threads: single attribute reads and writes, atomic in CPython.
        self._readiness = Readiness.OFFLINE
        self._pending_lock = threading.Lock()
        self._pending_calls = 0
        self._threadsafe_dropping = False
        self._threadsafe_drops = 0

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """The current :class:`ConnectionState`."""
        return self._state

    @property
    def connected(self) -> bool:
        """True while the WebSocket is open."""
        return self._state is ConnectionState.LIVE

    @property
    def readiness(self) -> Readiness:
        """READY, CONGESTED or OFFLINE: whether to encode the next frame. Any thread.

        An encoder should skip raw frames unless READY (and make the next one it encodes a
        KEY), rather than encode frames that cannot go out.
        """
        readiness = self._readiness
        if readiness is Readiness.READY and self._pending_calls >= self._max_pending_calls:
            return Readiness.CONGESTED
        return readiness

    @property
    def dropped(self) -> int:
        """Frames dropped because the network was behind (both threads' counts)."""
        return self.stats.frames_dropped + self._threadsafe_drops

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting in the outbox for the transport to drain."""
        return self._outbox_bytes

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        self._state = state
        if self.on_state_change is not None:
            self.on_state_change(state)

    def _update_readiness(self) -> None:
        if self._outbox_bytes >= self._high_water:
            self._congested = True
        elif self._outbox_bytes <= self._low_water:
            self._congested = False
        if self._session is None:
            self._readiness = Readiness.OFFLINE
        elif self._congested:
            self._readiness = Readiness.CONGESTED
        else:
            self._readiness = Readiness.READY

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (and keep reconnecting until :meth:`stop`)."""
        if self._state is not ConnectionState.IDLE:
            raise RuntimeError(f"cannot start a publisher that is {self._state.value}")
        self._connect()

    def stop(self, reason: str = "publisher stopped") -> defer.Deferred[str]:
        """Close the connection cleanly and stop reconnecting.

        Returns a Deferred that fires (with the stop reason) once the connection is closed;
        an unresponsive relay is cut off after the close timeout.
        """
        waiter = self.when_stopped()
        if self._state is ConnectionState.STOPPED or self._stopping:
            return waiter
        self._stopping = True
        self._stop_reason = reason
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._session is not None:
            session = self._session
            session.sendClose(code=1000, reason=reason[:100])
            self._abort_call = self._reactor.callLater(
                self._close_timeout + 1.0, self._abort, session
            )
        elif self._handshaking is not None:
            self._handshaking.dropConnection(abort=True)
        elif self._connect_attempt is not None:
            self._connect_attempt.cancel()
        else:
            self._finish(reason)
        return waiter

    def when_stopped(self) -> defer.Deferred[str]:
        """A Deferred that fires with the reason once the publisher has stopped for good
        (after :meth:`stop`, or when a newer publisher replaced this one)."""
        waiter: defer.Deferred[str] = defer.Deferred()
        if self._state is ConnectionState.STOPPED:
            waiter.callback(self._stop_reason or "stopped")
        else:
            self._stopped_waiters.append(waiter)
        return waiter

    def _abort(self, session: _PublisherProtocol) -> None:
        self._abort_call = None
        _log.warn("relay did not finish the closing handshake; aborting the connection")
        transport: Any = session.transport
        if transport is not None:
            transport.abortConnection()

    def _finish(self, reason: str) -> None:
        self._stop_reason = reason
        self._stopping = True
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        self._set_state(ConnectionState.STOPPED)
        waiters, self._stopped_waiters = self._stopped_waiters, []
        for waiter in waiters:
            waiter.callback(reason)

    def _connect(self) -> None:
        self._retry_call = None
        self._set_state(ConnectionState.CONNECTING)
        factory = self._make_factory()
        endpoint = self._endpoint_factory(self._reactor, self.target, self._insecure)
        attempt = endpoint.connect(factory)
        self._connect_attempt = attempt
        attempt.addCallbacks(self._connect_succeeded, self._connect_failed)

    def _make_factory(self) -> _PublisherFactory:
        headers = {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        factory = _PublisherFactory(
            self,
            self.target.url,
            protocols=[SUBPROTOCOL],
            headers=headers,
            useragent=USER_AGENT,
            reactor=self._reactor,
        )
        factory.setProtocolOptions(
            autoPingInterval=self._ping_interval,
            autoPingTimeout=self._ping_timeout,
            openHandshakeTimeout=self._open_timeout,
            closeHandshakeTimeout=self._close_timeout,
            # The relay only sends small JSON messages.
            maxMessagePayloadSize=1024 * 1024,
            maxFramePayloadSize=1024 * 1024,
            # Frames go out whole: a video frame split in fragments gains nothing.
            autoFragmentSize=0,
        )
        return factory

    def _connect_succeeded(self, session: _PublisherProtocol) -> None:
        self._connect_attempt = None

    def _tcp_connected(self, session: _PublisherProtocol) -> None:
        self._handshaking = session

    def _connect_failed(self, failure: Failure) -> None:
        self._connect_attempt = None
        if self._stopping:
            self._finish(self._stop_reason or "stopped")
            return
        self.last_error = failure.getErrorMessage() or repr(failure.value)
        self._schedule_retry(f"cannot connect: {self.last_error}")

    def _schedule_retry(self, why: str) -> None:
        delay = self._backoff.next_delay()
        _log.info(
            "{url}: {why}; retrying in {delay:.1f} s",
            url=self.target.display_url,
            why=why,
            delay=delay,
        )
        self._set_state(ConnectionState.RECONNECTING)
        self._retry_call = self._reactor.callLater(delay, self._connect)

    # -- session events (called by the protocol) -----------------------------------------

    def _session_opened(self, session: _PublisherProtocol) -> None:
        if session is not self._handshaking:
            return
        self._handshaking = None
        self._session = session
        self._opened_at = self._reactor.seconds()
        self.stats.connects += 1
        self.last_error = None
        self._outbox.clear()
        self._outbox_bytes = 0
        self._paused = False
        self._congested = False
        self._awaiting_key = True
        self._dropping_until_key = False
        self._keyframe_needed = False
        self._update_readiness()
        self._set_state(ConnectionState.LIVE)
        _log.info(
            "{url}: connected (subprotocol {subprotocol})",
            url=self.target.display_url,
            subprotocol=getattr(session, "negotiated_subprotocol", None) or "none: v1",
        )
        if self._stopping:
            session.sendClose(code=1000, reason=self._stop_reason or "publisher stopped")
            return
        if self._meta is not None:
            self._transmit(encode_control(self._meta), False, "text")
        if self._config is not None:
            self._transmit(pack_media_message(FLAG_CONFIG, now_us(), self._config), True, "config")
        # A new connection starts at a KEY: ask for one now rather than wait a whole GOP.
        self._request_keyframe()

    def _session_closed(
        self, session: _PublisherProtocol, was_clean: bool, code: int | None, reason: str | None
    ) -> None:
        was_open = session is self._session
        if not was_open and session is not self._handshaking:
            return
        self._handshaking = None
        self._session = None
        self.viewers = None
        self._outbox.clear()
        self._outbox_bytes = 0
        self._paused = False
        self._update_readiness()
        if self._stopping:
            self._finish(self._stop_reason or "stopped")
            return
        if code == CLOSE_REPLACED and not self._reconnect_when_replaced:
            self.last_error = "replaced by a newer publisher of the same stream"
            _log.error("{url}: {why}; stopping", url=self.target.display_url, why=self.last_error)
            self._finish(self.last_error)
            return
        refusal = handshake_refusal(reason)
        if refusal is not None:
            status, text = refusal
            hint = " (check --token / STREAMRELAY_TOKEN)" if status in (401, 403) else ""
            why = f"relay refused the connection: {status} {text}{hint}"
        elif was_open:
            detail = short_close_reason(reason)
            why = f"connection closed ({code}{': ' + detail if detail else ''})"
        else:
            detail = short_close_reason(reason) or "connection lost"
            if "certificate verify failed" in detail:
                detail += "; --insecure accepts a self-signed test certificate"
            why = f"handshake failed ({detail})"
        self.last_error = why
        if was_open and self._reactor.seconds() - self._opened_at >= self._stable_after:
            self._backoff.reset()
        self._schedule_retry(why)

    def _message_received(
        self, session: _PublisherProtocol, payload: bytes, is_binary: bool
    ) -> None:
        if session is not self._session:
            return
        if is_binary:
            _log.debug("ignoring a binary message from the relay")
            return
        try:
            message = parse_control(payload)
        except WireFormatError as error:
            _log.warn("ignoring a bad message from the relay: {error}", error=error)
            return
        kind = message.get("type")
        if kind == "viewers":
            count = message.get("count")
            if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
                self.viewers = count
                if self.on_viewers is not None:
                    self.on_viewers(count)
        elif kind == "keyframe-request":
            self.stats.keyframe_requests += 1
            self._request_keyframe()

    def _request_keyframe(self) -> None:
        self._keyframe_needed = False
        if self.on_keyframe_request is not None:
            self.on_keyframe_request()

    # -- flow control ------------------------------------------------------------------

    def _transport_paused(self, session: _PublisherProtocol) -> None:
        if session is self._session:
            self._paused = True

    def _transport_resumed(self, session: _PublisherProtocol) -> None:
        if session is self._session:
            self._paused = False
            self._flush()

    def _transmit(self, payload: bytes, is_binary: bool, kind: str) -> None:
        if self._paused or self._outbox:
            self._outbox.append((payload, is_binary, kind))
            self._outbox_bytes += len(payload)
            self._update_readiness()
        else:
            self._write(payload, is_binary, kind)

    def _write(self, payload: bytes, is_binary: bool, kind: str) -> None:
        assert self._session is not None
        self._session.sendMessage(payload, isBinary=is_binary)
        stats = self.stats
        stats.messages_sent += 1
        stats.bytes_sent += len(payload)
        if kind == "config":
            stats.configs_sent += 1
        elif kind in ("key", "delta"):
            stats.frames_sent += 1
            if kind == "key":
                stats.keyframes_sent += 1

    def _flush(self) -> None:
        # Each write may pause the transport again, synchronously: check before each one.
        while self._outbox and not self._paused and self._session is not None:
            payload, is_binary, kind = self._outbox.popleft()
            self._outbox_bytes -= len(payload)
            self._write(payload, is_binary, kind)
        self._update_readiness()
        if self._keyframe_needed and not self._outbox and not self._paused:
            self._request_keyframe()

    # -- sending (reactor thread) ------------------------------------------------------

    def send_meta(self, meta: Mapping[str, Any]) -> None:
        """Send a ``meta`` message now (if connected) and after every reconnect.

        ``meta`` should hold ``codec``, ``width``, ``height`` and ``fps``; ``type`` is set
        to ``"meta"``.
        """
        message = {"type": "meta", **{k: v for k, v in meta.items() if k != "type"}}
        encoded = encode_control(message)
        if len(encoded) > MAX_META_BYTES:
            raise ValueError(f"meta is {len(encoded)} bytes; the limit is {MAX_META_BYTES}")
        self._meta = message
        if self._session is not None:
            self._transmit(encoded, False, "text")

    def send_config(self, payload: bytes, timestamp_us: int | None = None) -> None:
        """Send a CONFIG (for H.264: Annex-B SPS+PPS) now and after every reconnect."""
        self._config = bytes(payload)
        if self._session is not None:
            stamp = now_us() if timestamp_us is None else timestamp_us
            self._transmit(pack_media_message(FLAG_CONFIG, stamp, self._config), True, "config")

    def send_frame(self, payload: bytes, *, key: bool, timestamp_us: int | None = None) -> bool:
        """Send one frame (for H.264: an Annex-B access unit); True if it was sent or queued.

        False when it cannot go out: not connected, waiting for a KEY after a (re)connect
        or a drop (only a KEY resumes), or the outbox is full (the frame is dropped and a
        keyframe is requested once the network has caught up).
        """
        if self._session is None:
            return False
        if self._awaiting_key and not key:
            if self._dropping_until_key:
                self.stats.frames_dropped += 1
            return False
        stamp = now_us() if timestamp_us is None else timestamp_us
        message = pack_media_message(FLAG_KEY if key else 0, stamp, payload)
        backlogged = self._paused or bool(self._outbox)
        if backlogged and self._outbox_bytes + len(message) > self._queue_limit:
            self.stats.frames_dropped += 1
            if not self._dropping_until_key:
                _log.warn(
                    "network behind: dropping frames until the next keyframe "
                    "({queued} bytes queued)",
                    queued=self._outbox_bytes,
                )
            self._awaiting_key = True
            self._dropping_until_key = True
            self._keyframe_needed = True
            return False
        self._awaiting_key = False
        self._dropping_until_key = False
        self._transmit(message, True, "key" if key else "delta")
        return True

    # -- sending (any thread) ----------------------------------------------------------

    def send_meta_threadsafe(self, meta: Mapping[str, Any]) -> None:
        """:meth:`send_meta` from any thread."""
        self._reactor_call(self.send_meta, dict(meta))

    def send_config_threadsafe(self, payload: bytes, timestamp_us: int | None = None) -> None:
        """:meth:`send_config` from any thread (the timestamp defaults to the call time)."""
        stamp = now_us() if timestamp_us is None else timestamp_us
        self._reactor_call(self.send_config, bytes(payload), stamp)

    def send_frame_threadsafe(
        self, payload: bytes, *, key: bool, timestamp_us: int | None = None
    ) -> bool:
        """:meth:`send_frame` from one producer thread; False if dropped at the handoff.

        At most ``max_pending_threadsafe_calls`` frames wait for the reactor thread; past
        that a frame is dropped here, and so is every frame after it until a KEY, so the
        stream stays decodable; a keyframe is then requested through
        ``on_keyframe_request``. Check :attr:`readiness` before encoding to drop raw frames
        instead of encoded ones.
        """
        stamp = now_us() if timestamp_us is None else timestamp_us
        if self._threadsafe_dropping and not key:
            self._threadsafe_drops += 1
            return False
        with self._pending_lock:
            full = self._pending_calls >= self._max_pending_calls
            if not full:
                self._pending_calls += 1
        if full:
            self._threadsafe_drops += 1
            if not self._threadsafe_dropping:
                self._threadsafe_dropping = True
                self._reactor_call(self._request_keyframe)
            return False
        self._threadsafe_dropping = False
        self._reactor_call(self._deliver_frame, bytes(payload), key, stamp)
        return True

    def stop_threadsafe(self, reason: str = "publisher stopped") -> None:
        """:meth:`stop` from any thread."""
        self._reactor_call(self.stop, reason)

    def _deliver_frame(self, payload: bytes, key: bool, timestamp_us: int) -> None:
        with self._pending_lock:
            self._pending_calls -= 1
        self.send_frame(payload, key=key, timestamp_us=timestamp_us)

    def _reactor_call(self, function: Callable[..., object], *args: object) -> None:
        reactor: Any = self._reactor
        reactor.callFromThread(function, *args)


__all__ = [
    "DEFAULT_URL",
    "ConnectionState",
    "Publisher",
    "PublisherStats",
    "Readiness",
    "RelayTarget",
    "default_endpoint",
    "handshake_refusal",
    "parse_relay_url",
    "short_close_reason",
]
