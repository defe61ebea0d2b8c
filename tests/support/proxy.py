"""A TCP proxy that can turn into a black hole: it forwards both ways until
:meth:`BlackHoleProxy.go_dark`, then forwards nothing, reads nothing and closes nothing
(a half-open path, as when a NAT or a laptop lid drops the route)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence


class _Pipe(asyncio.Protocol):
    """One side of a proxied connection; ``other`` is the side it forwards to."""

    def __init__(self, proxy: BlackHoleProxy, upstream: bool) -> None:
        self.proxy = proxy
        self.upstream = upstream  # bytes read here go towards the relay
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        if self.proxy.dark:
            return
        if self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.pending += data
        if self.upstream:
            self.proxy.upstream_chunk()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.proxy.dark and self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class _ClientSide(_Pipe):
    """The side a client connected to; it opens the connection to the relay."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        source = self.proxy.next_source()
        _, relay_side = await asyncio.get_running_loop().create_connection(
            lambda: _Pipe(self.proxy, upstream=False),
            self.proxy.host,
            self.proxy.upstream_port,
            local_addr=None if source is None else (source, 0),
        )
        relay_side.other = self
        self.other = relay_side
        if self.pending and relay_side.transport is not None:
            relay_side.transport.write(self.pending)
            self.pending = b""


class BlackHoleProxy:
    """Listens on a free loopback port (:attr:`port`) and forwards to the relay.

    ``sources``: local addresses for the connections to the relay, in turn (to spread
    over per-address caps). ``dark_after_upstream_chunks``: go dark by itself right
    after forwarding that many reads from clients (counted over all connections)."""

    def __init__(
        self,
        upstream_port: int,
        *,
        host: str = "127.0.0.1",
        sources: Sequence[str] = (),
        dark_after_upstream_chunks: int | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.host = host
        self.transports: list[asyncio.Transport] = []
        self.dark = False
        self.dark_at: float | None = None
        self.upstream_chunks = 0
        self.dark_after_upstream_chunks = dark_after_upstream_chunks
        self._sources = list(sources)
        self._count = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    def next_source(self) -> str | None:
        """The local address for the next connection to the relay (None: any)."""
        if not self._sources:
            return None
        self._count += 1
        return self._sources[self._count % len(self._sources)]

    def upstream_chunk(self) -> None:
        """Count one read forwarded towards the relay; go dark at the set count."""
        self.upstream_chunks += 1
        limit = self.dark_after_upstream_chunks
        if limit is not None and self.upstream_chunks >= limit:
            self.go_dark()

    async def start(self) -> BlackHoleProxy:
        """Start listening."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _ClientSide(self, upstream=True), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def go_dark(self) -> None:
        """From now on forward nothing and read nothing, on every connection."""
        if self.dark:
            return
        self.dark = True
        self.dark_at = time.monotonic()
        for transport in self.transports:
            if not transport.is_closing():
                transport.pause_reading()

    async def close(self) -> None:
        """Abort every connection and stop listening."""
        for transport in self.transports:
            transport.abort()
        if self.server is not None:
            self.server.close()
