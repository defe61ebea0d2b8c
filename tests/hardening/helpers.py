"""Tools for the hardening suite: figures, a hand-written WebSocket frame encoder and
parser, raw HTTP/WebSocket clients (blocking and asyncio), media messages carrying
sequence numbers, and probes of the relay process (``/api/internals``, RSS, CPU).

Everything here talks to the real ``twistd streamrelay`` process over loopback; nothing
imports the relay's network code (only :mod:`streamrelay.tokens` for making tokens).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- figures -----------------------------------------------------------------------------

FIGURES: list[dict[str, Any]] = []


def record_figure(name: str, **values: Any) -> dict[str, Any]:
    """Print a test's figure and append it to ``$STREAMRELAY_ARTIFACTS/hardening.json``
    (a JSON array of ``{"figure", "recorded_at", "reactor", "values"}``) when set."""
    entry = {
        "figure": name,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reactor": os.environ.get("STREAMRELAY_TEST_REACTOR") or "default",
        "values": values,
    }
    FIGURES.append(entry)
    print(f"FIGURE {name}: {json.dumps(values, sort_keys=True)}", flush=True)
    folder = os.environ.get("STREAMRELAY_ARTIFACTS")
    if folder:
        path = Path(folder) / "hardening.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        existing: list[Any] = []
        if path.exists():
            try:
                loaded = json.loads(path.read_text("utf-8") or "[]")
                existing = loaded if isinstance(loaded, list) else [loaded]
            except ValueError:
                path.replace(path.with_suffix(".json.unreadable"))
        existing.append(entry)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n", "utf-8")
        temporary.replace(path)
    return entry


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def rounded(value: float, digits: int = 3) -> float:
    """A float fit for a figure."""
    return round(float(value), digits)


# -- WebSocket frames, by hand -------------------------------------------------------------

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


def frame_header(
    opcode: int,
    length: int,
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    mask_key: bytes = b"\x11\x22\x33\x44",
) -> bytes:
    """The header of one frame claiming ``length`` payload bytes (any value up to 2^63-1,
    whatever follows), with the mask key when ``masked``."""
    first = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    mask_bit = 0x80 if masked else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    return header + (mask_key if masked else b"")


def mask_payload(payload: bytes, mask_key: bytes, offset: int = 0) -> bytes:
    """XOR ``payload`` with the mask key, starting at ``offset`` bytes into the payload."""
    if not payload:
        return b""
    key = (mask_key * 2)[offset % 4 : offset % 4 + 4]
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    masked: bool = True,
    rsv: int = 0,
    mask_key: bytes = b"\x11\x22\x33\x44",
) -> bytes:
    """One complete frame (masked, as a client must, unless ``masked=False``)."""
    header = frame_header(opcode, len(payload), fin=fin, masked=masked, rsv=rsv, mask_key=mask_key)
    return header + (mask_payload(payload, mask_key) if masked else payload)


def close_frame(code: int = 1000, reason: bytes = b"", masked: bool = True) -> bytes:
    """A close frame with ``code``."""
    return encode_frame(OP_CLOSE, struct.pack("!H", code) + reason, masked=masked)


@dataclass
class Frame:
    """One frame as read from the server."""

    fin: bool
    opcode: int
    payload: bytes
    masked: bool = False

    @property
    def close_code(self) -> int | None:
        """The close code of a close frame (None when it carries none)."""
        if self.opcode != OP_CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    @property
    def close_reason(self) -> str:
        """The close reason of a close frame."""
        return self.payload[2:].decode("utf-8", "replace")


class FrameParser:
    """Incremental parser of server frames; :meth:`feed` returns the complete ones."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        """Add bytes; return every frame now complete."""
        self._buffer += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> Frame | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        masked = bool(second & 0x80)
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            length = struct.unpack_from("!H", buffer, 2)[0]
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            length = struct.unpack_from("!Q", buffer, 2)[0]
            offset = 10
        mask_key = b""
        if masked:
            if len(buffer) < offset + 4:
                return None
            mask_key = bytes(buffer[offset : offset + 4])
            offset += 4
        if len(buffer) < offset + length:
            return None
        payload = bytes(buffer[offset : offset + length])
        del buffer[: offset + length]
        if masked:
            payload = mask_payload(payload, mask_key)
        return Frame(bool(first & 0x80), first & 0x0F, payload, masked)


# -- HTTP and the opening handshake --------------------------------------------------------


def handshake_request(
    path: str,
    host: str = "127.0.0.1",
    headers: Iterable[tuple[str, str]] = (),
    *,
    subprotocol: str | None = "streamrelay.v1",
) -> bytes:
    """A client's opening handshake for ``path``."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def plain_request(
    path: str,
    host: str = "127.0.0.1",
    headers: Iterable[tuple[str, str]] = (),
    method: str = "GET",
) -> bytes:
    """A plain HTTP/1.1 request that asks for the connection to close."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class HttpResponse:
    """A response head (and the body when it has a Content-Length)."""

    status: int
    reason: str
    headers: dict[str, list[str]]
    body: bytes = b""
    rest: bytes = b""  # bytes after the response (WebSocket frames after a 101)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        values = self.headers.get(name.lower())
        return values[0] if values else None


def parse_response_head(head: bytes) -> tuple[int, str, dict[str, list[str]]]:
    """Status, reason and headers (lower-cased names) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    _version, status, *reason = lines[0].split(" ", 2)
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status), reason[0] if reason else "", headers


def _complete_response(buffer: bytes) -> HttpResponse | None:
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    status, reason, headers = parse_response_head(buffer[:end])
    rest = buffer[end + 4 :]
    length_text = headers.get("content-length", [None])[0]
    if status != 101 and length_text is not None:
        length = int(length_text)
        if len(rest) < length:
            return None
        return HttpResponse(status, reason, headers, rest[:length], rest[length:])
    return HttpResponse(status, reason, headers, b"", rest)


# -- blocking sockets -----------------------------------------------------------------------


def connect(
    port: int,
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    rcvbuf: int | None = None,
    sndbuf: int | None = None,
    timeout: float = 5.0,
) -> socket.socket:
    """A TCP connection to the relay, bound to ``source`` when given; the buffer sizes
    are set before connecting so that the window is small from the first byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def read_response(sock: socket.socket, timeout: float = 5.0) -> HttpResponse:
    """Read one HTTP response head (and its body) from a blocking socket."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while True:
        response = _complete_response(buffer)
        if response is not None:
            return response
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete HTTP response in {timeout} s: {buffer[:200]!r}")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a complete response: {buffer!r}")
        buffer += chunk


def http_exchange(
    port: int, request: bytes, *, source: str | None = None, timeout: float = 5.0
) -> HttpResponse:
    """Send one raw request, read the response, close."""
    with contextlib.closing(connect(port, source=source, timeout=timeout)) as sock:
        sock.sendall(request)
        return read_response(sock, timeout)


def ws_open(
    port: int,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    source: str | None = None,
    rcvbuf: int | None = None,
    timeout: float = 5.0,
) -> tuple[socket.socket, HttpResponse]:
    """Open a WebSocket by hand; returns the socket and the handshake response (status
    101 on success; any bytes after the head are in ``response.rest``)."""
    sock = connect(port, source=source, rcvbuf=rcvbuf, timeout=timeout)
    sock.sendall(handshake_request(path, headers=headers))
    return sock, read_response(sock, timeout)


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


def set_linger_reset(sock: socket.socket) -> None:
    """Make ``close()`` send a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- asyncio sockets ------------------------------------------------------------------------


async def open_async(
    port: int,
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    rcvbuf: int | None = None,
    limit: int = 1 << 20,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An asyncio stream to the relay, bound to ``source`` when given."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=limit)


async def read_response_async(reader: asyncio.StreamReader, timeout: float = 5.0) -> HttpResponse:
    """Read one HTTP response (head, and body when it has a Content-Length)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status, reason, headers = parse_response_head(head[:-4])
        body = b""
        length_text = headers.get("content-length", [None])[0]
        if status != 101 and length_text is not None:
            body = await reader.readexactly(int(length_text))
        return HttpResponse(status, reason, headers, body)


async def ws_open_async(
    port: int,
    path: str,
    headers: Iterable[tuple[str, str]] = (),
    *,
    source: str | None = None,
    timeout: float = 5.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, HttpResponse]:
    """Open a WebSocket by hand over asyncio streams."""
    reader, writer = await open_async(port, source=source)
    try:
        writer.write(handshake_request(path, headers=headers))
        response = await read_response_async(reader, timeout)
    except BaseException:
        abort_writer(writer)
        raise
    return reader, writer, response


async def http_get_async(
    port: int,
    path: str,
    *,
    source: str | None = None,
    timeout: float = 5.0,
    headers: Iterable[tuple[str, str]] = (),
) -> HttpResponse:
    """A plain GET over a fresh connection."""
    reader, writer = await open_async(port, source=source)
    try:
        writer.write(plain_request(path, headers=headers))
        return await read_response_async(reader, timeout)
    finally:
        abort_writer(writer)


def abort_writer(writer: asyncio.StreamWriter, reset: bool = False) -> None:
    """Close a stream now; with ``reset``, by a RST."""
    if reset:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
    else:
        writer.close()


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


# -- media messages (wire protocol v1) -------------------------------------------------------

FLAG_DELTA = 0x00
FLAG_KEY = 0x01
FLAG_CONFIG = 0x02
_MEDIA_HEADER = struct.Struct("!BQ")
_SEQUENCE = struct.Struct("!Q")


def media_message(sequence: int, flags: int = FLAG_DELTA, size: int = 64) -> bytes:
    """A v1 media message: flags, capture time, then the sequence number and a filler
    derived from it (so any corruption or truncation is detectable)."""
    header = _MEDIA_HEADER.pack(flags, time.time_ns() // 1000)
    body = _SEQUENCE.pack(sequence)
    filler_length = max(0, size - len(header) - len(body))
    filler = bytes((sequence + index) & 0xFF for index in range(min(filler_length, 256)))
    if filler_length > 256:
        filler = (filler * (filler_length // 256 + 1))[:filler_length]
    return header + body + filler


def media_sequence(message: bytes) -> int:
    """The sequence number a :func:`media_message` carries."""
    return int(_SEQUENCE.unpack_from(message, 9)[0])


def media_is_intact(message: bytes, expected_size: int | None = None) -> bool:
    """True when ``message`` is exactly what :func:`media_message` built for its sequence."""
    if len(message) < 17:
        return False
    if expected_size is not None and len(message) != expected_size:
        return False
    sequence = media_sequence(message)
    rebuilt = media_message(sequence, message[0], len(message))
    return rebuilt[9:] == message[9:] and rebuilt[0] == message[0]


def flags_for(sequence: int, gop: int) -> int:
    """CONFIG first, a KEY every ``gop`` messages after it, deltas in between."""
    if sequence == 0:
        return FLAG_CONFIG
    return FLAG_KEY if (sequence - 1) % gop == 0 else FLAG_DELTA


# -- real clients (the ``websockets`` package) ------------------------------------------------


class Viewer:
    """A ``websockets`` viewer recording every message with its arrival time."""

    def __init__(self, url: str, name: str = "viewer", **connect_options: Any) -> None:
        self.url = url
        self.name = name
        self.options = {
            "ping_interval": None,
            "max_size": 64 * 1024 * 1024,
            "subprotocols": ["streamrelay.v1"],
            **connect_options,
        }
        self.connection: Any = None
        self.media: list[tuple[float, bytes]] = []
        self.texts: list[tuple[float, dict[str, Any]]] = []
        self.opened_at = 0.0
        self.started_at = 0.0
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self._task: asyncio.Task[None] | None = None
        self.first_media = asyncio.Event()

    async def start(self) -> Viewer:
        """Connect and start reading in the background."""
        from websockets.asyncio.client import connect

        self.started_at = time.monotonic()
        self.connection = await connect(self.url, **self.options)
        self.opened_at = time.monotonic()
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.connection:
                now = time.monotonic()
                if isinstance(message, bytes):
                    self.media.append((now, message))
                    self.first_media.set()
                else:
                    self.texts.append((now, json.loads(message)))
        except ConnectionClosed:
            pass
        finally:
            self.closed_at = time.monotonic()
            received = getattr(self.connection, "close_rcvd", None)
            self.close_code = received.code if received is not None else None

    def statuses(self) -> list[tuple[float, str]]:
        """Every ``status`` message: (arrival time, state)."""
        return [
            (at, message.get("state", ""))
            for at, message in self.texts
            if message.get("type") == "status"
        ]

    def sequences(self) -> list[int]:
        """Sequence numbers of the media received, in arrival order."""
        return [media_sequence(message) for _, message in self.media]

    async def wait_status(self, state: str, after: int = 0, timeout: float = 5.0) -> float:
        """Wait for the ``after``-th-or-later ``status`` == ``state``; its arrival time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index, (at, value) in enumerate(self.statuses()):
                if index >= after and value == state:
                    return at
            await asyncio.sleep(0.005)
        raise TimeoutError(f"{self.name}: no status {state!r} in {timeout} s: {self.texts}")

    async def close(self) -> None:
        """Close cleanly (bounded)."""
        if self.connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.connection.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


class PacedPublisher:
    """A ``websockets`` publisher sending :func:`media_message` at a fixed rate: CONFIG,
    then a KEY every ``gop`` messages; it drains what the relay sends it."""

    def __init__(
        self,
        url: str,
        rate: float = 50.0,
        gop: int = 25,
        size: int = 512,
        limit: int | None = None,
        **connect_options: Any,
    ) -> None:
        self.url = url
        self.rate = rate
        self.gop = gop
        self.size = size
        self.limit = limit
        self.options = {
            "ping_interval": None,
            "subprotocols": ["streamrelay.v1"],
            **connect_options,
        }
        self.connection: Any = None
        self.sent = 0
        self.received: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.done = asyncio.Event()

    async def start(self) -> PacedPublisher:
        """Connect and start sending."""
        from websockets.asyncio.client import connect

        self.connection = await connect(self.url, **self.options)
        self._tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._drain())]
        return self

    async def _send(self) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        try:
            while self.limit is None or self.sent < self.limit:
                message = media_message(self.sent, flags_for(self.sent, self.gop), self.size)
                await self.connection.send(message)
                self.sent += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        except Exception:
            pass
        finally:
            self.done.set()

    async def _drain(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self.connection:
                if isinstance(message, str):
                    self.received.append(json.loads(message))

    async def stop_sending(self) -> int:
        """Stop the sender; returns how many messages went out."""
        if self._tasks:
            self._tasks[0].cancel()
            with contextlib.suppress(BaseException):
                await self._tasks[0]
        return self.sent

    async def close(self) -> None:
        """Stop and close cleanly (bounded)."""
        await self.stop_sending()
        if self.connection is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await self.connection.close()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# -- probes of the relay process --------------------------------------------------------------


def http_json(base_url: str, path: str, timeout: float = 5.0) -> Any:
    """GET a JSON document from the relay (a fresh connection that then closes)."""
    request = urllib.request.Request(base_url + path, headers={"Connection": "close"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def internals(relay: Any) -> dict[str, Any]:
    """``/api/internals`` of a relay (loopback only). The request's own connection is
    counted in it: one RelayChannel and one in ``connections`` and ``limiter.total``."""
    return http_json(relay.http_url, "/api/internals")  # type: ignore[no-any-return]


def streams(relay: Any) -> dict[str, Any]:
    """``/api/streams`` of a relay."""
    return http_json(relay.http_url, "/api/streams")  # type: ignore[no-any-return]


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it (or the last
    falsy value at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def cpu_seconds(relay: Any) -> float:
    """User plus system CPU time the relay process consumed so far."""
    times = relay.psutil.cpu_times()
    return float(times.user + times.system)


class RssSampler:
    """Samples the relay's RSS every ``interval`` in a thread; ``peak`` is the highest."""

    def __init__(self, relay: Any, interval: float = 0.01) -> None:
        self._relay = relay
        self._interval = interval
        self.start_rss = relay.rss()
        self.peak = self.start_rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.peak = max(self.peak, self._relay.rss())
            self._stop.wait(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        with contextlib.suppress(Exception):
            self.peak = max(self.peak, self._relay.rss())

    @property
    def peak_growth(self) -> int:
        """Highest RSS seen minus the RSS at the start, in bytes."""
        return self.peak - self.start_rss


MB = 1024 * 1024
LOG_PROBLEMS = ("Traceback", "Unhandled error", "Unhandled Error", "[Failure instance")


def log_problems(relay: Any) -> list[str]:
    """Log lines that show an unhandled error in the relay."""
    return [
        line
        for line in relay.log_text().splitlines()
        if any(problem in line for problem in LOG_PROBLEMS)
    ]


def source_addresses(count: int, first: int = 2) -> list[str]:
    """``127.0.0.<first>`` … : loopback sources for spreading over per-address caps."""
    return [f"127.0.0.{first + index}" for index in range(count)]


def http_status(url: str, timeout: float = 5.0) -> int:
    """The status of a GET (errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# -- a publisher process that dies mid-frame -------------------------------------------------

PARTIAL_SEQUENCE = 999_999_999


def half_frame_publisher_main() -> None:
    """``python -c ... PORT STREAM FIRST COUNT``: publish ``COUNT`` complete messages
    numbered from ``FIRST`` (CONFIG, KEY, deltas), then half of a 256 KiB frame, print
    ``HALF`` and wait to be killed."""
    import sys

    port, stream, first, count = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    sock, response = ws_open(port, f"/publish/{stream}")
    if response.status != 101:
        print(f"REFUSED {response.status}", flush=True)
        return
    for index in range(count):
        flags = flags_for(index, 10)
        sock.sendall(encode_frame(OP_BINARY, media_message(first + index, flags, 1000)))
    partial = encode_frame(OP_BINARY, media_message(PARTIAL_SEQUENCE, FLAG_KEY, 256 * 1024))
    sock.sendall(partial[: len(partial) // 2])
    print("HALF", flush=True)
    time.sleep(60)
