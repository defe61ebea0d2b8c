"""A load balancer for rolling-restart tests, doing what ``deploy/nginx.conf`` asks of
nginx: each new connection goes to the first backend that takes it; a backend that
refuses the connection, or answers the request head with 503 (a draining relay), is
skipped for the next one (``proxy_next_upstream error http_503``); then bytes flow both
ways untouched.  Every attempt is recorded as ``(backend port, status or None)``.

Only the standard library and asyncio: it runs on the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

_HEAD_END = b"\r\n\r\n"


class Balancer:
    """Listens on loopback and spreads connections over ``backends`` (ports)."""

    def __init__(self, backends: Sequence[int]) -> None:
        self.backends = list(backends)
        self.attempts: list[tuple[int, int | None]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> Balancer:
        """Start listening on an ephemeral loopback port."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._pipes):
            task.cancel()
        for task in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def statuses(self, backend: int) -> list[int | None]:
        """What ``backend`` answered each attempt (None: the connection was refused)."""
        return [status for port, status in self.attempts if port == backend]

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(client_reader.readuntil(_HEAD_END), 5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            client_writer.close()
            return
        for index, backend in enumerate(self.backends):
            last = index == len(self.backends) - 1
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", backend)
            except OSError:
                self.attempts.append((backend, None))
                continue
            writer.write(head)
            try:
                answer = await asyncio.wait_for(reader.readuntil(_HEAD_END), 5)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                self.attempts.append((backend, None))
                writer.close()
                continue
            status = int(answer.split(b" ", 2)[1])
            self.attempts.append((backend, status))
            if status == 503 and not last:
                writer.close()
                continue
            client_writer.write(answer)
            self._pipe(reader, client_writer)
            self._pipe(client_reader, writer)
            return
        client_writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        client_writer.close()

    def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def copy() -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    writer.close()

        task = asyncio.ensure_future(copy())
        self._pipes.add(task)
        task.add_done_callback(self._pipes.discard)
