"""TCP connections to the relay, blocking or asyncio, with the knobs the tests need: a
source address on 127.0.0.0/8 (to spread over per-address caps), small buffers set
before connecting (so the window is small from the first byte), and closing by RST."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_LINGER_RESET = struct.pack("ii", 1, 0)


def source_addresses(count: int, first: int = 2) -> list[str]:
    """``127.0.0.<first>`` …: loopback sources for spreading over per-address caps."""
    return [f"127.0.0.{first + index}" for index in range(count)]


def _socket(source: str | None, rcvbuf: int | None, sndbuf: int | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if source is not None:
        sock.bind((source, 0))
    return sock


def connect(
    port: int,
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    rcvbuf: int | None = None,
    sndbuf: int | None = None,
    timeout: float = 5.0,
) -> socket.socket:
    """A blocking TCP connection to the relay."""
    sock = _socket(source, rcvbuf, sndbuf)
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def set_linger_reset(sock: socket.socket) -> None:
    """Make ``close()`` send a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


async def open_async(
    port: int,
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    rcvbuf: int | None = None,
    limit: int = 1 << 20,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An asyncio stream to the relay."""
    sock = _socket(source, rcvbuf, None)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=limit)


def abort_writer(writer: asyncio.StreamWriter, reset: bool = False) -> None:
    """Close a stream now; with ``reset``, by a RST."""
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        writer.transport.abort()
    else:
        writer.close()
