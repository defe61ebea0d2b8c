"""A naive Autobahn relay: what most Autobahn broadcast code does.

The publisher's every message is handed to ``sendMessage`` of each viewer in a loop
(Autobahn frames it once per viewer).  No cache, no queue bounds, no logging, no
compression.  Same URL shapes as the other peers; echoes ``streamrelay.v1``.

Usage: python autobahn_relay.py PORT
"""

from __future__ import annotations

import sys

from twisted.internet import epollreactor

epollreactor.install()

from autobahn.twisted.websocket import (  # noqa: E402
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny  # noqa: E402
from twisted.internet import reactor  # noqa: E402

SUBPROTOCOL = "streamrelay.v1"
VIEWERS: dict[str, set[WebSocketServerProtocol]] = {}


class Relay(WebSocketServerProtocol):
    """Publisher or viewer, by path."""

    role = ""
    name = ""

    def onConnect(self, request):  # type: ignore[no-untyped-def]
        """Route by path and echo the subprotocol when offered."""
        path = request.path
        if path.startswith("/publish/"):
            self.role, self.name = "publish", path[len("/publish/") :]
        elif path.startswith("/watch/"):
            self.role, self.name = "watch", path[len("/watch/") :]
        else:
            raise ConnectionDeny(404)
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    def onOpen(self) -> None:
        """Viewers join their stream's set."""
        if self.role == "watch":
            VIEWERS.setdefault(self.name, set()).add(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """The publisher's message goes to every viewer; viewers' messages are ignored."""
        if self.role == "publish":
            for viewer in VIEWERS.get(self.name, ()):
                viewer.sendMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        """Viewers leave their stream's set."""
        if self.role == "watch":
            VIEWERS.get(self.name, set()).discard(self)


def main() -> None:
    """Listen on 127.0.0.1:PORT until killed."""
    port = int(sys.argv[1])
    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = Relay
    factory.setProtocolOptions(
        perMessageCompressionAccept=lambda offers: None,
        maxMessagePayloadSize=0,
        maxFramePayloadSize=0,
        autoPingInterval=0,
        openHandshakeTimeout=5,
    )
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
