"""A ``websockets`` relay: ``broadcast()`` of each publisher message on asyncio.

``broadcast()`` frames the message once and writes it to every open viewer without
waiting for flow control (the library's recommended fan-out).  No cache, no logging,
no compression, no keepalive pings.  ``--uvloop`` runs the same code on uvloop.

Usage: python websockets_relay.py PORT [--uvloop]
"""

from __future__ import annotations

import asyncio
import logging
import sys

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

SUBPROTOCOL = "streamrelay.v1"
VIEWERS: dict[str, set[ServerConnection]] = {}
# No logging, as for every peer: abrupt disconnects of the load generator are expected.
SILENT = logging.getLogger("bench.silent")
SILENT.addHandler(logging.NullHandler())
SILENT.propagate = False
SILENT.setLevel(logging.CRITICAL + 1)


async def handler(connection: ServerConnection) -> None:
    """Route by path: a publisher's messages are broadcast, a viewer waits to be closed."""
    path = connection.request.path if connection.request else ""
    try:
        if path.startswith("/publish/"):
            name = path[len("/publish/") :]
            async for message in connection:
                broadcast(VIEWERS.get(name, ()), message)
        elif path.startswith("/watch/"):
            viewers = VIEWERS.setdefault(path[len("/watch/") :], set())
            viewers.add(connection)
            try:
                async for _ in connection:
                    pass
            finally:
                viewers.discard(connection)
    except ConnectionClosed:
        pass


async def run(port: int) -> None:
    """Serve on 127.0.0.1:PORT until cancelled."""
    async with serve(
        handler,
        "127.0.0.1",
        port,
        subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
        compression=None,
        max_size=None,
        ping_interval=None,
        open_timeout=5,
        logger=SILENT,
    ) as server:
        await server.serve_forever()


def main() -> None:
    """Parse argv and run on asyncio's loop, or uvloop's with ``--uvloop``."""
    port = int(sys.argv[1])
    if "--uvloop" in sys.argv[2:]:
        import uvloop

        uvloop.run(run(port))
    else:
        asyncio.run(run(port))


if __name__ == "__main__":
    main()
