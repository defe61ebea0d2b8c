"""One WebSocket connection to the relay, on Autobahn: the protocol, its factory, and
what a refused opening handshake said.

The protocol decides nothing: it reports every event to its :class:`ConnectionListener`
(the publisher's connector, or the relay's viewer client), naming itself, so that the
listener can ignore a connection it has already given up on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.types import ConnectionResponse
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

_STATUS: Final = re.compile(r"[0-9]{3}")
_SECONDS: Final = re.compile(r"[0-9]{1,9}")
_MAX_REASON: Final = 100  # the relay's words go into logs and the status line

_HINTS: Final = {
    401: "check --token / STREAMRELAY_TOKEN",
    403: "check --token / STREAMRELAY_TOKEN",
    409: "the stream has a publisher and the relay does not let another take it over",
    503: "the relay is at a limit or shutting down",
}


@dataclass(frozen=True, slots=True)
class HandshakeRefusal:
    """The HTTP answer with which the relay refused the WebSocket upgrade."""

    status: int
    reason: str
    retry_after: int | None = None

    def explain(self) -> str:
        """One line for the log and the status line: the status and what to do about it."""
        hints = [_HINTS[self.status]] if self.status in _HINTS else []
        if self.retry_after is not None:
            hints.append(f"it asks to retry after {self.retry_after} s")
        text = f"relay refused the connection: {self.status} {self.reason}".rstrip()
        return f"{text} ({'; '.join(hints)})" if hints else text


def refusal_from_response(
    status_line: str | None, headers: Mapping[str, str]
) -> HandshakeRefusal | None:
    """The refusal an opening-handshake response carries: its status, unless 101.

    ``headers`` are keyed in lower case, as Autobahn keeps them.
    """
    parts = (status_line or "").split(None, 2)
    if len(parts) < 2 or not _STATUS.fullmatch(parts[1]) or parts[1] == "101":
        return None
    reason = parts[2][:_MAX_REASON] if len(parts) > 2 else ""
    retry_after = headers.get("retry-after", "").strip()
    return HandshakeRefusal(
        int(parts[1]), reason, int(retry_after) if _SECONDS.fullmatch(retry_after) else None
    )


class ConnectionListener(Protocol):
    """What a :class:`RelayConnection` reports to (all in the reactor thread)."""

    def connection_made(self, connection: RelayConnection) -> None:
        """TCP (and TLS, if any) is up; the opening handshake starts."""

    def connection_opened(self, connection: RelayConnection) -> None:
        """The relay accepted the opening handshake."""

    def connection_closed(self, connection: RelayConnection, code: int | None, detail: str) -> None:
        """The connection is gone; ``detail`` is the close reason or what went wrong."""

    def message_received(self, connection: RelayConnection, payload: bytes, binary: bool) -> None:
        """A message from the relay."""

    def transport_paused(self, connection: RelayConnection) -> None:
        """The transport's write buffer is over its bound."""

    def transport_resumed(self, connection: RelayConnection) -> None:
        """The transport's write buffer has drained."""


@implementer(IPushProducer)
class _FlowControl:
    """Registered on the WebSocket's transport: relays Twisted's pause and resume."""

    def __init__(self, connection: RelayConnection) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:  # noqa: N802 (interface)
        """The transport's buffer is over its bound: hold messages back."""
        self._connection.factory.listener.transport_paused(self._connection)

    def resumeProducing(self) -> None:  # noqa: N802 (interface)
        """The transport's buffer has drained: send what waits."""
        self._connection.factory.listener.transport_resumed(self._connection)

    def stopProducing(self) -> None:  # noqa: N802 (interface)
        """The connection is going away; the close callback does the clean-up."""


class RelayConnection(WebSocketClientProtocol):
    """The Autobahn client protocol of one connection attempt."""

    # Autobahn logs the raw opening handshake, Authorization header included, at debug
    # level. A logger pinned at error keeps the token out of every log whatever level the
    # application sets globally for txaio, and drops Autobahn's chatter about failed
    # handshakes, which the publisher reports itself, once, with the retry delay.
    # (txaio sets make_logger up at run time, hence the ignore.)
    log = txaio.make_logger(level="error")  # type: ignore[attr-defined]

    factory: RelayClientFactory
    refusal: HandshakeRefusal | None = None
    negotiated_subprotocol: str | None = None

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        """Report first: the handshake may complete at any time now."""
        self.factory.listener.connection_made(self)
        super().connectionMade()

    def failHandshake(self, reason: str) -> None:  # noqa: N802 (Autobahn API)
        """Keep the status of a refusal before Autobahn drops the connection.

        Autobahn has parsed the response into ``http_status_line`` and ``http_headers``
        by now, unless it could not parse it at all.
        """
        self.refusal = refusal_from_response(
            getattr(self, "http_status_line", None), getattr(self, "http_headers", None) or {}
        )
        super().failHandshake(reason)

    def onConnect(self, response: ConnectionResponse) -> None:  # noqa: N802 (Autobahn API)
        """Note the negotiated subprotocol (none means v1 too)."""
        self.negotiated_subprotocol = response.protocol

    @property
    def writable(self) -> bool:
        """True while messages may be sent: open, and no close started by either side
        (Autobahn refuses to send once the relay's close frame has arrived, before the
        connection is reported lost)."""
        return self.state == self.STATE_OPEN

    def onOpen(self) -> None:  # noqa: N802 (Autobahn API)
        """Register for backpressure, then report the open connection."""
        transport: Any = self.transport
        transport.registerProducer(_FlowControl(self), True)
        self.factory.listener.connection_opened(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:  # noqa: N802, N803
        """Report a message from the relay."""
        self.factory.listener.message_received(self, payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        """Report the end, with Autobahn's own account of an unclean one."""
        detail = reason if wasClean else getattr(self, "wasNotCleanReason", None)
        self.factory.listener.connection_closed(self, code, (detail or "").strip())


class RelayClientFactory(WebSocketClientFactory):
    """Builds the one :class:`RelayConnection` of a connection attempt."""

    protocol = RelayConnection  # type: ignore[assignment]  # Autobahn's is untyped
    noisy = False  # one factory per attempt: "Starting factory" on each would be noise

    def __init__(self, listener: ConnectionListener, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.listener = listener


__all__ = [
    "ConnectionListener",
    "HandshakeRefusal",
    "RelayClientFactory",
    "RelayConnection",
    "refusal_from_response",
]
