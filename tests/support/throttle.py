"""A TCP proxy with a slow downstream: it forwards what the client sends at once, and
what the server sends at most ``rate`` bytes a second, reading from the server only as
fast as it forwards (a slow network link, as the server sees it: its writes back up)."""

from __future__ import annotations

import asyncio
import socket


class _ServerSide(asyncio.Protocol):
    """The connection to the server: what it reads waits in ``pending`` for the pacer."""

    def __init__(self, proxy: ThrottledProxy, client: _ClientSide) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()
        self.reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) >= self.proxy.high_water and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.pacers.discard(self)
        if self.client.transport is not None:
            self.client.transport.close()

    def forward(self, budget: int) -> None:
        """Send up to ``budget`` waiting bytes to the client; read more when drained."""
        if self.pending and self.client.transport is not None:
            chunk = bytes(self.pending[:budget])
            del self.pending[:budget]
            self.client.transport.write(chunk)
        if not self.reading and len(self.pending) < self.proxy.high_water // 2:
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            self.reading = True


class _ClientSide(asyncio.Protocol):
    """The side a client connected to; it opens the connection to the server."""

    def __init__(self, proxy: ThrottledProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.server: _ServerSide | None = None
        self.early = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proxy.transports.append(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window: the server's writes back up soon after ours stop.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.proxy.receive_buffer)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (self.proxy.host, self.proxy.upstream_port))
        _, server = await loop.create_connection(
            lambda: _ServerSide(self.proxy, self), sock=sock
        )
        self.server = server
        self.proxy.pacers.add(server)
        if self.early and server.transport is not None:
            server.transport.write(self.early)
            self.early = b""

    def data_received(self, data: bytes) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.write(data)
        else:
            self.early += data

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server is not None and self.server.transport is not None:
            self.server.transport.close()


class ThrottledProxy:
    """Listens on a free loopback port (:attr:`port`) and forwards to ``upstream_port``;
    the server-to-client direction is paced at ``rate`` bytes a second."""

    TICK = 0.01

    def __init__(
        self,
        upstream_port: int,
        rate: int,
        *,
        host: str = "127.0.0.1",
        high_water: int = 64 * 1024,
        receive_buffer: int = 16 * 1024,
    ) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.host = host
        self.high_water = high_water
        self.receive_buffer = receive_buffer
        self.transports: list[asyncio.Transport] = []
        self.pacers: set[_ServerSide] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._pacing: asyncio.Task[None] | None = None

    async def start(self) -> ThrottledProxy:
        """Start listening and pacing."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ClientSide(self), self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self._pacing = asyncio.create_task(self._pace())
        return self

    async def _pace(self) -> None:
        budget = max(1, int(self.rate * self.TICK))
        while True:
            await asyncio.sleep(self.TICK)
            for pacer in list(self.pacers):
                pacer.forward(budget)

    async def close(self) -> None:
        """Abort every connection and stop."""
        if self._pacing is not None:
            self._pacing.cancel()
        for transport in self.transports:
            transport.abort()
        if self.server is not None:
            self.server.close()
