"""A Python viewer client for streamrelay: watch a stream from Python as a browser does,
to record it, analyse it, or relay it on (an edge relay pulls its upstream with it).

It speaks wire protocol v1 through the one codec (:mod:`streamrelay.wire`), connects to
``/watch/NAME`` (or ``/relay/NAME`` with a relay token), keeps the connection alive with
its own pings, and reconnects with exponential backoff and full jitter until stopped.
What arrives goes to a :class:`StreamListener`; override the methods you need::

    from twisted.internet import reactor
    from streamrelay.client import ClientSettings, StreamClient, StreamListener

    class Recorder(StreamListener):
        def __init__(self, path):
            self.out = open(path, "wb")

        def media(self, message):                 # a MediaMessage, header included
            self.out.write(len(message.data).to_bytes(4, "big") + message.data)

        def dropped(self, count):                 # the relay skipped to the next KEY
            print("lost", count, "messages")

    client = StreamClient(ClientSettings("ws://127.0.0.1:8080/watch/cam"), Recorder("cam.bin"),
                          reactor)
    client.start()
    reactor.run()

The listener hears :meth:`~StreamListener.status` (``live`` or not) at every connection
and change, :meth:`~StreamListener.meta` with the raw bytes and the parsed object,
:meth:`~StreamListener.media` per message in the publisher's order, and
:meth:`~StreamListener.dropped` before the messages that resume after a gap.  Everything
runs in the reactor thread; every timer runs on the reactor given (a ``Clock`` in tests).

(Over 400 lines: one connection's lifecycle -- connect, open, parse, ping, close, retry
-- and its settings read best together; the connection protocol, its factory, the
backoff and the endpoints are the publisher's, reused.)
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from streamrelay import wire
from streamrelay.liveness import Liveness
from streamrelay.logs import relay_logger
from streamrelay.wire import MediaMessage, WireError
from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.connection import RelayClientFactory, RelayConnection
from streamrelay.wsclient.endpoint import EndpointFactory, default_endpoint
from streamrelay.wsclient.target import RelayTarget, parse_relay_url

# Through the relay's log rate limit: an edge's pulls retry a dead upstream forever.
_log = relay_logger(__name__)

# A relay that refused the credentials (401/403: a wrong secret or token) will not change
# its mind soon: retry after this, plus the usual jitter, not within a second.
AUTH_RETRY_SECONDS: Final = 30.0

USER_AGENT: Final = "streamrelay-client/0.1"
DEFAULT_MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024


class ClientState(enum.Enum):
    """Where a :class:`StreamClient` stands."""

    IDLE = "idle"
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSING = "closing"  # it broke the protocol: closing, to try again
    WAITING = "waiting"  # for the next attempt
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where to watch and how.

    ``url`` is one URL or several, tried in turn (one per attempt). ``token`` goes out as
    ``Authorization: Bearer ...`` (neither it nor the URLs are in the ``repr``).  Times are
    in seconds: pings every ``ping_interval`` and a connection with no sign of life for
    ``ping_timeout`` after one is dropped (0 turns pings off); TCP plus the opening
    handshake must finish within ``open_timeout``, a closing handshake within
    ``close_timeout``.  Retries wait uniform(0, min(``retry_max``, ``retry_initial`` *
    2**attempt)), from the shortest again after a connection that held for
    ``stable_after``.  A message over ``max_message_bytes`` closes the connection (1009).
    """

    url: str | tuple[str, ...] = field(repr=False)
    token: str | None = field(default=None, repr=False)
    insecure: bool = False
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    open_timeout: float = 10.0
    close_timeout: float = 2.0
    retry_initial: float = 0.5
    retry_max: float = 30.0
    stable_after: float = 5.0
    reconnect: bool = True
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    targets: tuple[RelayTarget, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        urls = (self.url,) if isinstance(self.url, str) else tuple(self.url)
        if not urls:
            raise ValueError("need at least one URL")
        if self.token is not None and (not self.token or any(c in self.token for c in "\r\n\0")):
            raise ValueError("token must be non-empty and single-line")
        if not 0 < self.retry_initial <= self.retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")
        object.__setattr__(self, "targets", tuple(parse_relay_url(url) for url in urls))


class StreamListener:
    """What a :class:`StreamClient` reports; every method does nothing by default."""

    def opened(self, client: StreamClient) -> None:
        """A connection is open (the relay's ``status`` follows)."""

    def status(self, live: bool) -> None:
        """The stream is live (a publisher feeds it) or offline; heard at every status
        message.  The client's :attr:`~StreamClient.publisher_idle`, set before, tells
        whether a live stream's publisher idles on demand (``"publisher": "idle"``)."""

    def meta(self, raw: bytes, meta: dict[str, Any]) -> None:
        """The stream's metadata: the message as it came, and parsed."""

    def media(self, message: MediaMessage) -> None:
        """One media message, in the publisher's order."""

    def dropped(self, count: int) -> None:
        """``count`` messages were dropped; the next media starts at a CONFIG or KEY."""

    def audio_dropped(self, count: int) -> None:
        """``count`` audio messages were dropped (``{"type": "dropped", "audio": N}``,
        only on connections that take audio); audio resumes with the next one."""

    def text(self, message: dict[str, Any]) -> None:
        """Any other text message (for types a later version may add)."""

    def closed(self, why: str) -> None:
        """The open connection ended; another attempt follows unless stopped."""


@dataclass(slots=True)
class ClientStats:
    """Counts since the client was made."""

    connects: int = 0
    messages: int = 0
    bytes: int = 0
    keyframes: int = 0
    dropped: int = 0
    audio_dropped: int = 0


class _WatchConnection(RelayConnection):
    """The publisher's connection protocol, reporting every byte as a sign of life."""

    factory: _WatchFactory

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        """Any byte from the relay proves it is alive."""
        self.factory.listener.heard(self)
        super().dataReceived(data)


class _WatchFactory(RelayClientFactory):
    protocol = _WatchConnection  # type: ignore[assignment]
    listener: StreamClient


class StreamClient:
    """Watches one stream and keeps watching: see the module docstring.

    ``token_source`` (called per attempt with the URL) replaces ``settings.token``: an
    edge mints a fresh relay token for each connection.  ``next_url`` (called per
    attempt) replaces the turn-by-turn choice among ``settings.url``.
    """

    def __init__(
        self,
        settings: ClientSettings,
        listener: StreamListener,
        reactor: Any,
        *,
        backoff: Backoff | None = None,
        endpoint_factory: EndpointFactory = default_endpoint,
        token_source: Callable[[str], str | None] | None = None,
        next_url: Callable[[], str] | None = None,
    ) -> None:
        self.settings = settings
        self.listener = listener
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self._backoff = backoff or Backoff(settings.retry_initial, settings.retry_max)
        self._endpoint_factory = endpoint_factory
        self._token_source = token_source
        self._next_url = next_url
        self._attempt = 0
        self.state = ClientState.IDLE
        self.stats = ClientStats()
        self.live = False
        # The latest status said "publisher": "idle" (publishing on demand, nobody
        # watching): live, but no media until the publisher wakes.
        self.publisher_idle = False
        self.last_error: str | None = None
        self.target: RelayTarget = settings.targets[0]
        self.opened_at: float | None = None
        # The current attempt: its factory (events from any other are stale), the connect
        # in flight until TCP is up, then its connection; the session once open.
        self._factory: _WatchFactory | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._connection: _WatchConnection | None = None
        self.session: _WatchConnection | None = None
        self._last_heard = 0.0
        self._timer: IDelayedCall | None = None  # open deadline, retry, close deadline
        self._liveness: Liveness | None = None
        self._stopped: list[defer.Deferred[None]] = []
        # Why this client closed the current connection itself (a broken message).
        self._broken: str | None = None
        # Failed attempts in a row and the last reason logged: a retry is logged when the
        # reason changes, not at every attempt.
        self.failures = 0
        self._logged_why: str | None = None

    # -- the API --------------------------------------------------------------------------

    @property
    def display_url(self) -> str:
        """The current URL without query or credentials, safe to log."""
        return self.target.display_url

    def start(self) -> None:
        """Start connecting (and reconnecting, until :meth:`stop`)."""
        if self.state is not ClientState.IDLE:
            raise RuntimeError(f"cannot start a client that is {self.state.value}")
        self._connect()

    def stop(self, reason: str = "stopped") -> defer.Deferred[None]:
        """Close with 1000 and stop reconnecting; fires once the connection is gone."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self.state in (ClientState.STOPPED, ClientState.IDLE):
            self.state = ClientState.STOPPED
            waiter.callback(None)
            return waiter
        self._stopped.append(waiter)
        if self.state is ClientState.STOPPING:
            return waiter
        self.state = ClientState.STOPPING
        self._cancel_timer()
        self._cancel_pings()
        if self.session is not None:
            self.session.sendClose(code=wire.CLOSE_NORMAL, reason=reason[:100])
            self._timer = self._clock.callLater(self.settings.close_timeout, self._abort)
        elif self._connection is not None:
            self._abort()
        elif self._connecting is not None:
            self._connecting.cancel()
        else:
            self._finish()
        return waiter

    def send_json(self, message: dict[str, Any]) -> bool:
        """Send a text message now; False when no connection is open."""
        session = self.session
        if session is None or self.state is not ClientState.OPEN:
            return False
        session.sendMessage(wire.encode_text(message), isBinary=False)
        return True

    def request_keyframe(self) -> bool:
        """Ask for a keyframe (the relay rate-limits, and never loses, requests)."""
        return self.send_json({"type": "keyframe-request"})

    def describe(self) -> dict[str, Any]:
        """State, URL, counts: for an API answer."""
        since = None
        if self.opened_at is not None and self.state is ClientState.OPEN:
            moment = datetime.datetime.fromtimestamp(self.opened_at, datetime.timezone.utc)
            since = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
        return {
            "url": self.display_url,
            "state": self.state.value,
            "live": self.live,
            "publisher_idle": self.publisher_idle,
            "since": since,
            "connects": self.stats.connects,
            "last_error": self.last_error,
        }

    # -- connecting -------------------------------------------------------------------------

    def _pick_target(self) -> RelayTarget:
        if self._next_url is not None:
            return parse_relay_url(self._next_url())
        targets = self.settings.targets
        target = targets[self._attempt % len(targets)]
        self._attempt += 1
        return target

    def _connect(self) -> None:
        self.state = ClientState.CONNECTING
        try:
            target = self.target = self._pick_target()
            token = self._token_source(target.url) if self._token_source else self.settings.token
            factory = self._make_factory(target, token)
            endpoint = self._endpoint_factory(self._reactor, target, self.settings.insecure)
        except Exception:
            # Runs in a retry timer: an exception escaping would leave the client
            # CONNECTING for good.  (The message names no token: it may be the culprit.)
            _log.failure("{url}: cannot prepare a connection attempt", url=self.display_url)
            self._retry("cannot prepare a connection attempt", held=False)
            return
        self._factory = factory
        self._timer = self._clock.callLater(self.settings.open_timeout, self._open_timed_out)
        attempt = endpoint.connect(factory)
        if self._factory is factory and self._connection is None:
            self._connecting = attempt
        attempt.addErrback(self._connect_failed, factory)

    def _make_factory(self, target: RelayTarget, token: str | None) -> _WatchFactory:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        factory = _WatchFactory(
            self,
            target.url,
            protocols=[wire.SUBPROTOCOL],
            headers=headers,
            useragent=USER_AGENT,
            reactor=self._reactor,
        )
        limit = self.settings.max_message_bytes
        factory.setProtocolOptions(
            # Every timer runs on the injected reactor (ours); Autobahn's are off.
            autoPingInterval=0,
            autoPingTimeout=0,
            openHandshakeTimeout=0,
            closeHandshakeTimeout=0,
            serverConnectionDropTimeout=0,
            maxMessagePayloadSize=limit,
            maxFramePayloadSize=limit,
            autoFragmentSize=0,
        )
        return factory

    def _connect_failed(self, failure: Failure, factory: _WatchFactory) -> None:
        if factory is not self._factory or self._connection is not None:
            return
        self._connecting = None
        self._factory = None
        self._cancel_timer()
        if self.state is ClientState.STOPPING:
            self._finish()
            return
        error = failure.getErrorMessage() or repr(failure.value)
        self._retry(f"cannot connect: {error}", held=False)

    def _open_timed_out(self) -> None:
        self._timer = None
        if self._connection is not None:
            self._abort()
        elif self._connecting is not None:
            self._connecting.cancel()

    # -- reports from the connection (publisher.connection.ConnectionListener) ------------

    def connection_made(self, connection: RelayConnection) -> None:
        """TCP is up: follow this attempt's connection."""
        if connection.factory is not self._factory or self._connection is not None:
            connection.dropConnection(abort=True)
            return
        assert isinstance(connection, _WatchConnection)
        self._connection = connection
        self._connecting = None
        if self.state is ClientState.STOPPING:
            self._abort()

    def connection_opened(self, connection: RelayConnection) -> None:
        """The relay accepted the handshake: the connection becomes the session."""
        if connection is not self._connection:
            return
        if self.state is ClientState.STOPPING:
            connection.sendClose(code=wire.CLOSE_NORMAL)
            return
        self._cancel_timer()
        self.session = self._connection
        self.state = ClientState.OPEN
        self.opened_at = self._clock.seconds()
        self._last_heard = self._clock.seconds()
        self.stats.connects += 1
        self.last_error = None
        _log.info("{url}: watching", url=self.display_url, failures=self.failures)
        self.failures = 0
        self._logged_why = None
        self._schedule_ping()
        self.listener.opened(self)

    def heard(self, connection: RelayConnection) -> None:
        """Bytes from the relay: it is alive."""
        if connection is self._connection:
            self._last_heard = self._clock.seconds()

    def message_received(self, connection: RelayConnection, payload: bytes, binary: bool) -> None:
        """Parse and report one message of the session."""
        if connection is not self.session or self.state is not ClientState.OPEN:
            return
        if binary:
            try:
                message = wire.parse_media(payload)
            except WireError as error:
                self._close_broken(connection, str(error))
                return
            self.stats.messages += 1
            self.stats.bytes += message.size
            self.stats.keyframes += message.is_key
            self.listener.media(message)
            return
        try:
            parsed = wire.parse_text(payload)
        except WireError:
            return  # the relay sends standard JSON objects only: nothing to act on
        kind = parsed.get("type")
        if kind == "status" and parsed.get("state") in ("live", "offline"):
            self.live = parsed["state"] == "live"
            self.publisher_idle = self.live and parsed.get("publisher") == "idle"
            self.listener.status(self.live)
        elif kind == "meta":
            self.listener.meta(payload, parsed)
        elif kind == "dropped" and _count(parsed.get("messages")) is not None:
            count = int(parsed["messages"])
            self.stats.dropped += count
            self.listener.dropped(count)
        elif kind == "dropped" and _count(parsed.get("audio")) is not None:
            count = int(parsed["audio"])
            self.stats.audio_dropped += count
            self.listener.audio_dropped(count)
        else:
            self.listener.text(parsed)

    def _close_broken(self, connection: RelayConnection, reason: str) -> None:
        # 1007 is a protocol code, which Autobahn's sendClose refuses from applications:
        # send the frame itself, and bound the closing handshake as stop() does.
        _log.warn("{url}: {reason}: closing", url=self.display_url, reason=reason)
        self.state = ClientState.CLOSING  # no more messages are taken from it
        self._broken = reason
        connection.sendCloseFrame(
            code=wire.CLOSE_INVALID_PAYLOAD, reasonUtf8=reason.encode()[:123], isReply=False
        )
        self._cancel_pings()
        self._timer = self._clock.callLater(self.settings.close_timeout, self._abort)

    def transport_paused(self, connection: RelayConnection) -> None:
        """Nothing to hold back: a viewer sends only a few small messages."""

    def transport_resumed(self, connection: RelayConnection) -> None:
        """Write progress is a sign of life."""
        if connection is self._connection:
            self._last_heard = self._clock.seconds()

    def connection_closed(self, connection: RelayConnection, code: int | None, detail: str) -> None:
        """The connection ended: report it and, unless stopping, try again."""
        if connection is not self._connection:
            return
        was_open = connection is self.session
        self._connection = None
        self._factory = None
        self.session = None
        self._cancel_pings()
        self._cancel_timer()
        if was_open:
            self.live = False
            self.publisher_idle = False
        broken, self._broken = self._broken, None
        if connection.refusal is not None:
            why = connection.refusal.explain()
        elif broken is not None:
            why = f"closed with {wire.CLOSE_INVALID_PAYLOAD}: {broken}"
        elif was_open:
            why = f"connection closed ({code}{': ' + detail if detail else ''})"
        else:
            why = f"handshake failed ({detail or 'connection lost'})"
        if was_open:
            self.listener.closed(why)
        if self.state is ClientState.STOPPING:
            self._finish()
            return
        opened_at = self.opened_at or 0.0
        held = was_open and self._clock.seconds() - opened_at >= self.settings.stable_after
        asked = connection.refusal.retry_after if connection.refusal is not None else None
        if connection.refusal is not None and connection.refusal.status in (401, 403):
            asked = max(asked or 0, int(AUTH_RETRY_SECONDS))
        self._retry(why, held, asked)

    # -- retrying and stopping ----------------------------------------------------------------

    def _retry(self, why: str, held: bool, retry_after: int | None = None) -> None:
        self.last_error = why
        if not self.settings.reconnect:
            _log.info("{url}: {why}; not reconnecting", url=self.display_url, why=why)
            self.state = ClientState.STOPPING
            self._finish()
            return
        if held:
            self._backoff.reset()
        delay = self._backoff.next_delay()
        if retry_after is not None:
            # A refusal said when there is room; the jitter still spreads the clients.
            delay += retry_after
        self.failures += 1
        if why != self._logged_why:
            self._logged_why = why
            _log.info(
                "{url}: {why}; retrying in {delay:.2f} s (attempt {failures})",
                url=self.display_url,
                why=why,
                delay=delay,
                failures=self.failures,
            )
        self.state = ClientState.WAITING
        self._timer = self._clock.callLater(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._timer = None
        self._connect()

    def _abort(self) -> None:
        self._timer = None
        connection = self._connection
        if connection is None:
            return
        transport: Any = connection.transport
        if transport is not None and hasattr(transport, "abortConnection"):
            transport.abortConnection()
        else:
            connection.dropConnection(abort=True)

    def _finish(self) -> None:
        self._cancel_timer()
        self._cancel_pings()
        self.state = ClientState.STOPPED
        waiters, self._stopped = self._stopped, []
        for waiter in waiters:
            waiter.callback(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- liveness: pings on the injected clock ------------------------------------------

    def _schedule_ping(self) -> None:
        settings = self.settings
        self._liveness = Liveness(
            self._clock,
            settings.ping_interval,
            settings.ping_timeout,
            lambda: self._last_heard,
            self._send_ping,
            self._silent,
        )
        self._liveness.start()

    def _send_ping(self) -> bool:
        session = self.session
        if session is None or self.state is not ClientState.OPEN:
            return False
        session.sendPing()
        return True

    def _silent(self) -> None:
        _log.info("{url}: silent after ping: dropping the connection", url=self.display_url)
        self._abort()

    def _cancel_pings(self) -> None:
        if self._liveness is not None:
            self._liveness.stop()
        self._liveness = None


def _count(value: object) -> int | None:
    """A non-negative whole number, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


__all__ = [
    "ClientSettings",
    "ClientState",
    "ClientStats",
    "StreamClient",
    "StreamListener",
]
