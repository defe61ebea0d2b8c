"""A TCP proxy on loopback for the integration and hardening tests.

It forwards both ways; with ``rate`` it forwards what the server sends at most ``rate``
bytes a second, reading from the server only as fast as it forwards (a slow network link,
as the server sees it: its writes back up).  :meth:`TcpProxy.go_dark` turns it into a
black hole: from then on it forwards nothing, reads nothing and closes nothing (a
half-open path, as when a NAT or a laptop lid drops the route)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence


class _Pipe(asyncio.Protocol):
    """One side of a proxied connection; ``other`` is the side it forwards to.

    The server side of a rate-limited proxy keeps what it reads in ``pending`` for the
    pacer; every other side forwards at once (``pending`` then holds what arrived before
    the other side was connected)."""

    def __init__(self, proxy: TcpProxy, upstream: bool) -> None:
        self.proxy = proxy
        self.upstream = upstream  # bytes read here go towards the server
        self.transport: asyncio.Transport | None = None
        self.other: _Pipe | None = None
        self.pending = bytearray()
        self.reading = True

    @property
    def paced(self) -> bool:
        """True for the server side of a rate-limited proxy."""
        return not self.upstream and self.proxy.rate is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy.transports.append(transport)
        if self.paced:
            self.proxy.pacers.add(self)

    def data_received(self, data: bytes) -> None:
        if self.proxy.dark:
            return
        if self.paced:
            self.pending += data
            if len(self.pending) >= self.proxy.high_water and self.transport is not None:
                self.transport.pause_reading()
                self.reading = False
        elif self.other is not None and self.other.transport is not None:
            self.other.transport.write(data)
        else:
            self.pending += data
        if self.upstream:
            self.proxy.upstream_chunk()

    def forward(self, budget: int) -> None:
        """Send up to ``budget`` waiting bytes on; read more once drained (paced side)."""
        if self.proxy.dark:
            return
        other = self.other.transport if self.other is not None else None
        if self.pending and other is not None:
            chunk = bytes(self.pending[:budget])
            del self.pending[:budget]
            other.write(chunk)
        if not self.reading and len(self.pending) < self.proxy.high_water // 2:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            self.reading = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.pacers.discard(self)
        if not self.proxy.dark and self.other is not None and self.other.transport is not None:
            self.other.transport.close()


class _ClientSide(_Pipe):
    """The side a client connected to; it opens the connection to the server."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        proxy = self.proxy
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        source = proxy.next_source()
        if source is not None:
            sock.bind((source, 0))
        if proxy.rate is not None:
            # A small receive window: the server's writes back up soon after ours stop.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, proxy.receive_buffer)
        sock.setblocking(False)
        await loop.sock_connect(sock, (proxy.host, proxy.upstream_port))
        _, server_side = await loop.create_connection(
            lambda: _Pipe(proxy, upstream=False), sock=sock
        )
        server_side.other = self
        self.other = server_side
        if self.pending and server_side.transport is not None:
            server_side.transport.write(bytes(self.pending))
            self.pending.clear()


class TcpProxy:
    """Listens on a free loopback port (:attr:`port`) and forwards to ``upstream_port``.

    ``rate``: pace the server-to-client direction at that many bytes a second (None: no
    limit).  ``sources``: local addresses for the connections to the server, in turn (to
    spread over per-address caps).  ``dark_after_upstream_chunks``: go dark by itself
    right after forwarding that many reads from clients (counted over all connections).
    """

    TICK = 0.01

    def __init__(
        self,
        upstream_port: int,
        *,
        rate: int | None = None,
        host: str = "127.0.0.1",
        sources: Sequence[str] = (),
        dark_after_upstream_chunks: int | None = None,
        high_water: int = 64 * 1024,
        receive_buffer: int = 16 * 1024,
    ) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.host = host
        self.high_water = high_water
        self.receive_buffer = receive_buffer
        self.transports: list[asyncio.Transport] = []
        self.pacers: set[_Pipe] = set()
        self.dark = False
        self.dark_at: float | None = None
        self.upstream_chunks = 0
        self.dark_after_upstream_chunks = dark_after_upstream_chunks
        self._sources = list(sources)
        self._count = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._pacing: asyncio.Task[None] | None = None

    def next_source(self) -> str | None:
        """The local address for the next connection to the server (None: any)."""
        if not self._sources:
            return None
        self._count += 1
        return self._sources[self._count % len(self._sources)]

    def upstream_chunk(self) -> None:
        """Count one read forwarded towards the server; go dark at the set count."""
        self.upstream_chunks += 1
        limit = self.dark_after_upstream_chunks
        if limit is not None and self.upstream_chunks >= limit:
            self.go_dark()

    async def start(self) -> TcpProxy:
        """Start listening (and pacing, with a rate)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _ClientSide(self, upstream=True), "127.0.0.1", 0
        )
        self.port = self.server.sockets[0].getsockname()[1]
        if self.rate is not None:
            self._pacing = asyncio.create_task(self._pace(self.rate))
        return self

    async def _pace(self, rate: int) -> None:
        budget = max(1, int(rate * self.TICK))
        while True:
            await asyncio.sleep(self.TICK)
            for pacer in list(self.pacers):
                pacer.forward(budget)

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
        """Abort every connection and stop listening (and pacing)."""
        if self._pacing is not None:
            self._pacing.cancel()
        for transport in self.transports:
            transport.abort()
        if self.server is not None:
            self.server.close()
