"""Hand-driven WebSocket connections: the opening handshake and frames written by hand
over :mod:`tests.support.net` sockets, read only when the test asks (so a test can play
a peer that never reads, dies mid-frame or never answers a close)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.support.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    Frame,
    FrameParser,
    client_frame,
    close_frame,
)
from tests.support.http import (
    Headers,
    Response,
    handshake_request,
    read_response,
    read_response_async,
)
from tests.support.net import abort_writer, connect, open_async


def ws_open(
    port: int,
    path: str,
    headers: Headers = (),
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    rcvbuf: int | None = None,
    timeout: float = 5.0,
) -> tuple[socket.socket, Response]:
    """Open a WebSocket by hand; returns the socket and the handshake response (status
    101 on success; any bytes after the head are in ``response.rest``)."""
    sock = connect(port, host=host, source=source, rcvbuf=rcvbuf, timeout=timeout)
    try:
        sock.sendall(handshake_request(path, host, headers))
        return sock, read_response(sock, timeout)
    except BaseException:
        sock.close()
        raise


async def ws_open_async(
    port: int,
    path: str,
    headers: Headers = (),
    *,
    source: str | None = None,
    timeout: float = 5.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Response]:
    """Open a WebSocket by hand over asyncio streams."""
    reader, writer = await open_async(port, source=source)
    try:
        writer.write(handshake_request(path, headers=headers))
        response = await read_response_async(reader, timeout)
    except BaseException:
        abort_writer(writer)
        raise
    return reader, writer, response


async def read_frames_async(
    reader: asyncio.StreamReader, parser: FrameParser, timeout: float
) -> list[Frame]:
    """Wait up to ``timeout`` for at least one frame; [] on EOF or timeout."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return []
                frames = parser.feed(chunk)
                if frames:
                    return frames
    except TimeoutError:
        return []


def drain_until(sock: socket.socket, stop: threading.Event) -> None:
    """Read and drop what comes on ``sock`` (a relay's viewer counts, keyframe requests)
    until ``stop`` is set or the connection ends: for a thread beside a flooding peer."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(65536):
                return
        except TimeoutError:
            continue
        except OSError:
            return


@contextlib.contextmanager
def flood_connections(
    port: int, stream: str, viewer_path: str | None = None
) -> Iterator[tuple[socket.socket, socket.socket | None]]:
    """A publisher of ``stream`` opened by hand (what the relay sends it is read and
    dropped in a thread: :func:`drain_until`) and, with ``viewer_path``, a viewer there
    with a 4 KiB receive window that never reads; all closed at the end."""
    publisher, response = ws_open(port, f"/publish/{stream}")
    assert response.status == 101, response
    viewer = None
    stop = threading.Event()
    reader = threading.Thread(target=drain_until, args=(publisher, stop), daemon=True)
    try:
        if viewer_path is not None:
            viewer, response = ws_open(port, viewer_path, rcvbuf=4096)
            assert response.status == 101, response
        reader.start()
        yield publisher, viewer
    finally:
        stop.set()
        for sock in (publisher, viewer):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if reader.is_alive():
            reader.join(2)


@dataclass
class CloseOutcome:
    """What the peer saw when the server ended a connection."""

    code: int | None  # close code of the server's close frame, None when none came
    reason: str
    eof: bool  # the TCP connection ended (FIN or RST) by the deadline
    reset: bool  # ended with a RST
    seconds: float  # from the start of the wait to the close frame (or the end)
    frames: list[Frame] = field(default_factory=list)


def wait_for_close(
    sock: socket.socket,
    timeout: float = 5.0,
    *,
    initial: bytes = b"",
    parser: FrameParser | None = None,
    reply: bool = False,
    started: float | None = None,
) -> CloseOutcome:
    """Read frames until the server's close frame and the end of the connection; answer
    its close frame when ``reply`` (a well-behaved client)."""
    parser = parser or FrameParser()
    started = time.monotonic() if started is None else started
    deadline = started + timeout
    frames = parser.feed(initial)
    code: int | None = None
    reason = ""
    code_at: float | None = None
    eof = reset = False
    while True:
        for frame in frames:
            if frame.opcode == OP_CLOSE and code_at is None:
                code, reason = frame.close_code, frame.close_reason
                code_at = time.monotonic()
                if reply:
                    with contextlib.suppress(OSError):
                        sock.sendall(close_frame(code or 1000))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            break
        except ConnectionResetError:
            eof = reset = True
            break
        if not chunk:
            eof = True
            break
        frames = parser.feed(chunk)
    ended = code_at if code_at is not None else time.monotonic()
    return CloseOutcome(code, reason, eof, reset, ended - started, frames)


class RawWebSocket:
    """A WebSocket client on a blocking socket that reads only when asked to, so it can
    play a viewer that never reads; it answers pings while reading."""

    def __init__(self, sock: socket.socket, response: Response) -> None:
        self.sock = sock
        self.response = response
        self._parser = FrameParser()
        self._frames: list[Frame] = self._parser.feed(response.rest)

    @classmethod
    def open(
        cls,
        port: int,
        path: str,
        headers: Headers = (),
        *,
        host: str = "127.0.0.1",
        rcvbuf: int | None = None,
        timeout: float = 5.0,
    ) -> RawWebSocket:
        """Connect (with ``SO_RCVBUF`` set before connecting when given) and do the
        handshake; the status is in :attr:`status`, whatever it is."""
        sock, response = ws_open(port, path, headers, host=host, rcvbuf=rcvbuf, timeout=timeout)
        return cls(sock, response)

    @property
    def status(self) -> int:
        """The handshake's status (101 when upgraded)."""
        return self.response.status

    def read_frame(self) -> Frame:
        """Read one frame; pings are answered and not returned."""
        while True:
            while not self._frames:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise ConnectionError("relay closed the connection")
                self._frames = self._parser.feed(chunk)
            frame = self._frames.pop(0)
            if frame.opcode == OP_PING:
                self.send(client_frame(OP_PONG, frame.payload))
                continue
            return frame

    def read_message(self) -> Frame:
        """Read one whole message (fragments joined); control frames come back alone."""
        frame = self.read_frame()
        if frame.opcode >= OP_CLOSE or frame.fin:
            return frame
        parts = [frame.payload]
        while True:
            more = self.read_frame()
            if more.opcode >= OP_CLOSE:
                continue
            parts.append(more.payload)
            if more.fin:
                return Frame(frame.opcode, b"".join(parts))

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def close(self) -> None:
        """Close the socket (no close frame)."""
        with contextlib.suppress(OSError):
            self.sock.close()
