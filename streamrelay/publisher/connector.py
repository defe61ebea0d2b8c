"""Keeps one WebSocket to the relay up, from :meth:`Connector.start` to the stop.

The connector connects, explains every failure once, reconnects with exponential backoff
and full jitter, and closes cleanly on stop. Its lifecycle is the state machine of
:mod:`.state`; the connector carries out the machine's actions and turns the events of
each connection into the machine's inputs, ignoring connections it has given up on.
What goes over the open connection is the publisher's business: the connector hands it
the session and the relay's messages through :class:`SessionHooks`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from streamrelay.wire import CLOSE_NORMAL, CLOSE_PUBLISHER_REPLACED
from streamrelay.wsclient.backoff import Backoff
from streamrelay.wsclient.connection import RelayClientFactory, RelayConnection
from streamrelay.wsclient.endpoint import EndpointFactory

from .connection import make_factory
from .settings import PublisherSettings
from .state import LIFECYCLE, ConnectionState

_log = Logger()


@dataclass(frozen=True, slots=True)
class SessionHooks:
    """Where the connector reports the open session's events (reactor thread)."""

    opened: Callable[[RelayConnection], None]
    closed: Callable[[], None]
    message: Callable[[bytes, bool], None]
    paused: Callable[[], None]
    resumed: Callable[[], None]


class Connector:
    """One publisher's connection lifecycle (see the module docstring).

    The reactor-thread API is :meth:`start`, :meth:`stop`, :meth:`when_stopped`,
    :attr:`state`, :attr:`session` and :attr:`last_error`. The rest are the connection's
    reports (:class:`~.connection.ConnectionListener`) and the machine's actions
    (:class:`~.state.LifecycleCore`).
    """

    def __init__(
        self,
        settings: PublisherSettings,
        hooks: SessionHooks,
        *,
        reactor: IReactorTime,
        backoff: Backoff,
        endpoint_factory: EndpointFactory,
    ) -> None:
        self.settings = settings
        self._hooks = hooks
        self._reactor = reactor
        self._backoff = backoff
        self._endpoint_factory = endpoint_factory
        self.state = ConnectionState.IDLE
        self.on_state_change: Callable[[ConnectionState], None] | None = None
        self.last_error: str | None = None
        # The open connection, between the relay's 101 and the connection's end.
        self.session: RelayConnection | None = None
        self._opened_at = 0.0
        # The current attempt: its factory (events of any other are stale), the connect
        # in flight until TCP is up, then the connection until it ends.
        self._factory: RelayClientFactory | None = None
        self._connecting: defer.Deferred[Any] | None = None
        self._connection: RelayConnection | None = None
        # The retry delay while waiting, the close deadline while stopping.
        self._timer: IDelayedCall | None = None
        self._stop_reason: str | None = None
        self._stopped_waiters: list[defer.Deferred[str]] = []
        self._machine = LIFECYCLE(self)

    # -- the reactor-thread API ----------------------------------------------------------

    def start(self) -> None:
        """Start connecting (and keep reconnecting until :meth:`stop`)."""
        if self.state is not ConnectionState.IDLE:
            raise RuntimeError(f"cannot start a publisher that is {self.state.value}")
        self._machine.start()

    def stop(self, reason: str) -> defer.Deferred[str]:
        """Close cleanly and stop reconnecting; the Deferred fires with the stop reason."""
        waiter = self.when_stopped()
        self._machine.stop(reason)
        return waiter

    def when_stopped(self) -> defer.Deferred[str]:
        """A Deferred that fires with the reason once stopped for good."""
        if self.state is ConnectionState.STOPPED:
            return defer.succeed(self._stop_reason or "stopped")
        waiter: defer.Deferred[str] = defer.Deferred()
        self._stopped_waiters.append(waiter)
        return waiter

    # -- reports from the connection (ConnectionListener) --------------------------------

    def connection_made(self, connection: RelayConnection) -> None:
        """TCP is up: the attempt's connection is now the one to follow."""
        if connection.factory is not self._factory or self._connection is not None:
            connection.dropConnection(abort=True)
            return
        self._connection = connection
        self._connecting = None
        self._machine.tcp_connected()

    def connection_opened(self, connection: RelayConnection) -> None:
        """The relay accepted the handshake."""
        if connection is self._connection:
            self._machine.opened()

    def connection_closed(self, connection: RelayConnection, code: int | None, detail: str) -> None:
        """The connection ended: say why, and whether it held long enough to count."""
        if connection is not self._connection:
            return
        was_open = connection is self.session
        self._connection = None
        self._factory = None
        if code == CLOSE_PUBLISHER_REPLACED and not self.settings.reconnect_when_replaced:
            self._machine.replaced("replaced by a newer publisher of the same stream")
            return
        if connection.refusal is not None:
            why = connection.refusal.explain()
        elif was_open:
            why = f"connection closed ({code}{': ' + detail if detail else ''})"
        else:
            detail = detail or "connection lost"
            if "certificate verify failed" in detail:
                detail += "; --insecure accepts a self-signed test certificate"
            why = f"handshake failed ({detail})"
        held = was_open and self._reactor.seconds() - self._opened_at >= self.settings.stable_after
        self._machine.closed(why, held)

    def message_received(self, connection: RelayConnection, payload: bytes, binary: bool) -> None:
        """Pass the session's messages on."""
        if connection is self.session:
            self._hooks.message(payload, binary)

    def transport_paused(self, connection: RelayConnection) -> None:
        """Pass the session's backpressure on."""
        if connection is self.session:
            self._hooks.paused()

    def transport_resumed(self, connection: RelayConnection) -> None:
        """Pass the session's backpressure on."""
        if connection is self.session:
            self._hooks.resumed()

    # -- the machine's actions (LifecycleCore) -------------------------------------------

    def show(self, state: ConnectionState) -> None:
        """Publish a state change."""
        if state is self.state:
            return
        self.state = state
        if self.on_state_change is not None:
            self.on_state_change(state)

    def note_stop(self, reason: str) -> None:
        """Keep the first stop reason."""
        if self._stop_reason is None:
            self._stop_reason = reason

    def connect(self) -> None:
        """Start a connection attempt through a fresh factory."""
        factory = make_factory(self, self.settings, self._reactor)
        self._factory = factory
        endpoint = self._endpoint_factory(
            self._reactor, self.settings.target, self.settings.insecure
        )
        attempt = endpoint.connect(factory)
        if self._factory is factory and self._connection is None:
            self._connecting = attempt
        attempt.addErrback(self._connect_failed, factory)

    def cancel_connect(self) -> None:
        """Cancel the attempt in flight; its failure then completes the stop."""
        if self._connecting is not None:
            self._connecting.cancel()

    def drop_connection(self) -> None:
        """Abort the connection whose handshake is still running."""
        if self._connection is not None:
            self._connection.dropConnection(abort=True)

    def go_live(self) -> None:
        """The open connection becomes the session."""
        session = self._connection
        assert session is not None
        self.session = session
        self._opened_at = self._reactor.seconds()
        self.last_error = None
        _log.info(
            "{url}: connected (subprotocol {subprotocol})",
            url=self.settings.target.display_url,
            subprotocol=session.negotiated_subprotocol or "none: v1",
        )
        self._hooks.opened(session)

    def close_session(self) -> None:
        """Send a 1000 close; abort the connection if the relay does not finish the
        closing handshake in time."""
        connection = self._connection
        if connection is None:
            return
        connection.sendClose(code=CLOSE_NORMAL, reason=(self._stop_reason or "")[:100])
        self._timer = self._reactor.callLater(
            self.settings.close_timeout + 1.0, self._abort_stalled, connection
        )

    def end_session(self) -> None:
        """Forget the session, if there was one."""
        if self.session is not None:
            self.session = None
            self._hooks.closed()

    def schedule_retry(self, why: str, held: bool) -> None:
        """Report ``why``, then connect again after the backoff delay (reset first if the
        connection held, so that a relay that accepts and drops at once is not hammered)."""
        self.last_error = why
        if held:
            self._backoff.reset()
        delay = self._backoff.next_delay()
        _log.info(
            "{url}: {why}; retrying in {delay:.1f} s",
            url=self.settings.target.display_url,
            why=why,
            delay=delay,
        )
        self._timer = self._reactor.callLater(delay, self._retry_due)

    def give_up(self, why: str) -> None:
        """Report a replacement, which ends the publisher."""
        self.last_error = why
        _log.error("{url}: {why}; stopping", url=self.settings.target.display_url, why=why)

    def finish(self) -> None:
        """Cancel what is pending and fire the waiters with the stop reason."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._factory = None
        reason = self._stop_reason or "stopped"
        waiters, self._stopped_waiters = self._stopped_waiters, []
        for waiter in waiters:
            waiter.callback(reason)

    # -- internals -------------------------------------------------------------------------

    def _connect_failed(self, failure: Failure, factory: RelayClientFactory) -> None:
        if factory is not self._factory or self._connection is not None:
            return
        self._connecting = None
        self._factory = None
        error = failure.getErrorMessage() or repr(failure.value)
        self._machine.connect_failed(f"cannot connect: {error}")

    def _retry_due(self) -> None:
        self._timer = None
        self._machine.retry_due()

    def _abort_stalled(self, connection: RelayConnection) -> None:
        self._timer = None
        _log.warn("relay did not finish the closing handshake; aborting the connection")
        transport: Any = connection.transport
        if transport is not None:
            transport.abortConnection()


__all__ = ["Connector", "SessionHooks"]
