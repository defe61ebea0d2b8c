"""What every connection shares: the settings, the clock, the streams, the admission
limits, the set of open connections and the graceful stop.

This module sits below the protocols and the web layer and imports neither: the
connections it tracks are anything with ``shut_down`` and ``abort``
(:class:`Connection`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Protocol

from autobahn.websocket.protocol import PreparedMessage
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from streamrelay.config import RelayConfig
from streamrelay.limits import ConnectionLimiter, HandshakeRateLimiter
from streamrelay.metrics import RelayMetrics
from streamrelay.streams import StreamRegistry

# After the stragglers are aborted, each reports its loss on the next reactor turn at the
# latest; the stop does not wait longer than this for a report that never comes.
ABORT_GRACE_SECONDS = 0.5


class Connection(Protocol):
    """What the graceful stop needs from an open connection."""

    def shut_down(self) -> None:
        """Begin closing (1001 for a WebSocket)."""

    def abort(self) -> None:
        """Drop the TCP connection now."""


def prepare_frame(payload: bytes, is_binary: bool) -> PreparedMessage:
    """Frame a message once for all its viewers, as a server does (unmasked) and never
    compressed (media endpoints refuse compression)."""
    return PreparedMessage(payload, is_binary, False, True)


@dataclass(eq=False)
class RelayContext:
    """Everything the web layer and the protocols share."""

    config: RelayConfig
    clock: IReactorTime
    registry: StreamRegistry
    limiter: ConnectionLimiter
    handshake_rate: HandshakeRateLimiter
    connections: set[Connection] = field(default_factory=set)
    shutting_down: bool = False
    # The relay's Prometheus registry and the events counted as they happen.
    metrics: RelayMetrics = field(default_factory=RelayMetrics, repr=False)
    # Every channel and WebSocket protocol built, held weakly, for /api/internals (see
    # track): an instance still listed after its connection ended is a leak.
    live_objects: weakref.WeakSet[object] = field(default_factory=weakref.WeakSet)
    # Connections closed for going over their inbound budget: {role: {reason: count}}.
    over_budget: dict[str, dict[str, int]] = field(default_factory=dict)
    _drain_waiters: list[Deferred[None]] = field(default_factory=list, repr=False)
    _drain_deadline: IDelayedCall | None = field(default=None, repr=False)
    _drain_grace: IDelayedCall | None = field(default=None, repr=False)

    @classmethod
    def create(cls, config: RelayConfig, clock: IReactorTime) -> RelayContext:
        """Build the stream registry and the admission limits for ``config``."""
        return cls(
            config=config,
            clock=clock,
            registry=StreamRegistry(config, clock, prepare_frame),
            limiter=ConnectionLimiter(config.max_connections, config.max_connections_per_ip),
            handshake_rate=HandshakeRateLimiter(
                clock, config.max_handshakes_per_ip, config.handshake_burst
            ),
        )

    def track(self, item: object) -> None:
        """Count ``item`` in ``/api/internals`` while it lives.  Only with
        ``--api-internals``: each entry is a weak reference (~0.1 KB), otherwise spent
        on every connection for a page nobody can ask for."""
        if self.config.api_internals:
            self.live_objects.add(item)

    # -- open connections --------------------------------------------------------------

    def connection_opened(self, connection: Connection) -> None:
        """Count ``connection`` as open until :meth:`connection_closed`."""
        self.connections.add(connection)

    def connection_closed(self, connection: Connection) -> None:
        """``connection`` is gone; the graceful stop completes with the last one."""
        self.connections.discard(connection)
        if self._drain_waiters and not self.connections:
            self._drained()

    # -- graceful stop -----------------------------------------------------------------

    def drain(self) -> Deferred[None]:
        """Graceful stop: refuse new handshakes, close every connection (1001 for
        WebSockets), abort stragglers after the close timeout; fires when all are gone."""
        self.shutting_down = True
        done: Deferred[None] = Deferred()
        self._drain_waiters.append(done)
        if self._drain_deadline is None and self._drain_grace is None:
            self._drain_deadline = self.clock.callLater(
                self.config.close_timeout, self._abort_stragglers
            )
        for connection in list(self.connections):
            connection.shut_down()
        if not self.connections and self._drain_waiters:
            self._drained()
        return done

    def _abort_stragglers(self) -> None:
        self._drain_deadline = None
        for connection in list(self.connections):
            connection.abort()
        if self._drain_waiters:
            self._drain_grace = self.clock.callLater(ABORT_GRACE_SECONDS, self._drained)

    def _drained(self) -> None:
        for call in (self._drain_deadline, self._drain_grace):
            if call is not None and call.active():
                call.cancel()
        self._drain_deadline = self._drain_grace = None
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)
