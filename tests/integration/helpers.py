"""Shared helpers for the loopback integration suite.

Everything here is independent of the relay's own code: WebSocket clients come from the
``websockets`` package (asyncio), plain HTTP from :mod:`http.client` (which never follows
redirects) and hand-written raw sockets where a test needs to misbehave on purpose.
Tokens are computed here from the documented format, not with ``streamrelay.tokens``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import json
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

KEY = 0x01
CONFIG = 0x02
DELTA = 0x00
HEADER = struct.Struct("!BQ")
SUBPROTOCOL = "streamrelay.v1"

T = TypeVar("T")


# -- media messages ----------------------------------------------------------------------


def now_us() -> int:
    """Wall-clock microseconds since the Unix epoch (the v1 capture time)."""
    return time.time_ns() // 1000


def media(flags: int, payload: bytes = b"", capture_us: int | None = None) -> bytes:
    """A v1 binary message: flags, capture time (big-endian), payload."""
    return HEADER.pack(flags, now_us() if capture_us is None else capture_us) + payload


def flags_of(message: bytes) -> int:
    """The flags byte of a v1 binary message."""
    return message[0]


def capture_of(message: bytes) -> int:
    """The capture time (microseconds) of a v1 binary message."""
    return HEADER.unpack_from(message)[1]


def numbered_payload(index: int, size: int) -> bytes:
    """``size`` bytes that identify message ``index`` (so reorders and damage show)."""
    stamp = b"#%08d:" % index
    body = (stamp * (size // len(stamp) + 1))[:size]
    return body


def run(coroutine: Awaitable[T], timeout: float) -> T:
    """Run one test coroutine with an overall bound."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


# -- WebSocket clients (websockets) --------------------------------------------------------


def ws_connect(url: str, **options: Any) -> Any:
    """``websockets`` connect with test defaults: no client pings, no size limit, no
    compression, no proxy, a short open timeout."""
    options.setdefault("ping_interval", None)
    options.setdefault("max_size", None)
    options.setdefault("compression", None)
    options.setdefault("proxy", None)
    options.setdefault("open_timeout", 5)
    options.setdefault("close_timeout", 5)
    return connect(url, **options)


async def text(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """Receive one message that must be JSON text."""
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str), f"expected text, got binary {message[:16]!r}"
    value = json.loads(message)
    assert isinstance(value, dict)
    return value


async def binary(ws: ClientConnection, timeout: float = 5.0) -> bytes:
    """Receive one message that must be binary."""
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, bytes), f"expected binary, got text {message!r}"
    return message



async def text_of_type(ws: ClientConnection, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """Receive until a JSON text message of ``type`` ``kind`` (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {kind!r} message within {timeout} s")
        message = await asyncio.wait_for(ws.recv(), remaining)
        if isinstance(message, str):
            value = json.loads(message)
            if value.get("type") == kind:
                return value


async def collect_text(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """Every JSON text message received during ``seconds`` (binary ones are skipped)."""
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return found
        try:
            message = await asyncio.wait_for(ws.recv(), remaining)
        except (TimeoutError, asyncio.TimeoutError):
            return found
        if isinstance(message, str):
            found.append(json.loads(message))


async def expect_close(ws: ClientConnection, timeout: float = 10.0) -> tuple[int | None, str]:
    """Read until the relay closes; returns the close code and reason it sent (None when
    no close frame arrived)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as closed:
        if closed.rcvd is None:
            return None, ""
        return closed.rcvd.code, closed.rcvd.reason
    raise AssertionError("unreachable")


async def refused(url: str, **options: Any) -> tuple[int, dict[str, str], str]:
    """Attempt a WebSocket handshake that must be refused; returns status, headers
    (lower-case names) and body."""
    try:
        async with ws_connect(url, **options):
            pass
    except InvalidStatus as error:
        response = error.response
        headers = {name.lower(): value for name, value in response.headers.raw_items()}
        body = (response.body or b"").decode("utf-8", "replace")
        return response.status_code, headers, body
    raise AssertionError(f"handshake to {url} was accepted")


async def accepted(url: str, **options: Any) -> str | None:
    """A handshake that must succeed; returns the selected subprotocol."""
    async with ws_connect(url, **options) as ws:
        return ws.subprotocol


# -- plain HTTP --------------------------------------------------------------------------


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_get(
    base_url: str, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0,
    method: str = "GET",
) -> HttpResponse:
    """One plain HTTP request (no redirect following) on a fresh connection."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, headers={"Connection": "close", **(headers or {})})
        response = connection.getresponse()
        body = response.read()
        return HttpResponse(
            response.status, {k.lower(): v for k, v in response.getheaders()}, body
        )
    finally:
        connection.close()



def api(relay: Any) -> dict[str, Any]:
    """``/api/streams`` as JSON."""
    response = http_get(relay.http_url, "/api/streams")
    assert response.status == 200, response
    return response.json()


async def api_async(relay: Any) -> dict[str, Any]:
    """:func:`api` off the event loop."""
    return await asyncio.to_thread(api, relay)


def stream_entry(snapshot: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The entry for ``name`` in an ``/api/streams`` answer, or None."""
    for entry in snapshot["streams"]:
        if entry["name"] == name:
            return entry
    return None


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns a true value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last: {value!r})")
        time.sleep(interval)



def idle_state(relay: Any) -> dict[str, Any] | None:
    """``/api/streams`` when the relay is idle (no streams, only this request open)."""
    snapshot = api(relay)
    connections = snapshot["connections"]
    if (
        not snapshot["streams"]
        and connections["publishers"] == 0
        and connections["viewers"] == 0
        and connections["total"] <= 1
    ):
        return snapshot
    return None


# -- tokens ------------------------------------------------------------------------------


def make_token(secret: bytes, role: str, stream: str, expires: int) -> str:
    """``<expires>.<hex HMAC-SHA256(secret, "<role>:<stream>:<expires>")>``, as documented."""
    digest = hmac.new(secret, f"{role}:{stream}:{expires}".encode(), hashlib.sha256)
    return f"{expires}.{digest.hexdigest()}"


def write_secret(folder: Path, name: str, secret: bytes) -> Path:
    """A secret file for ``--publish-secret-file`` / ``--view-secret-file``."""
    path = folder / name
    path.write_bytes(secret + b"\n")
    return path


# -- raw sockets ---------------------------------------------------------------------------


def handshake_request(path: str, host: str, extra: list[str] = ()) -> bytes:  # type: ignore[assignment]
    """A minimal WebSocket opening handshake request, written by hand."""
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client-to-server WebSocket frame."""
    mask = os.urandom(4)
    head = bytearray([(0x80 if fin else 0) | opcode])
    length = len(payload)
    if length < 126:
        head.append(0x80 | length)
    elif length < 65536:
        head.append(0x80 | 126)
        head += struct.pack("!H", length)
    else:
        head.append(0x80 | 127)
        head += struct.pack("!Q", length)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + mask + masked


@dataclass
class Frame:
    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> int | None:
        if self.opcode == 0x8 and len(self.payload) >= 2:
            return int(struct.unpack("!H", self.payload[:2])[0])
        return None


def parse_response_head(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and whatever followed the head in ``data``."""
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def raw_exchange(
    host: str, port: int, request: bytes, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` on a fresh socket, read until the relay closes; parse the answer."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    data = b"".join(chunks)
    assert b"\r\n\r\n" in data, f"no HTTP response head in {data[:200]!r}"
    return parse_response_head(data)


@dataclass
class RawWebSocket:
    """A hand-driven WebSocket client on a blocking socket: it reads only when asked to,
    so it can play a viewer that never reads."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(
        cls, host: str, port: int, path: str, receive_buffer: int | None = None,
        timeout: float = 5.0, extra: list[str] = (),  # type: ignore[assignment]
    ) -> RawWebSocket:
        """Connect (with ``SO_RCVBUF`` set before connect when given) and do the handshake."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        sock.connect((host, port))
        client = cls(sock)
        sock.sendall(handshake_request(path, f"{host}:{port}", extra))
        data = bytearray()
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"relay closed during the handshake: {bytes(data)!r}")
            data += chunk
        client.status, client.headers, rest = parse_response_head(bytes(data))
        client.buffer += rest
        return client

    def _fill(self, needed: int) -> None:
        while len(self.buffer) < needed:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("relay closed the connection")
            self.buffer += chunk

    def read_frame(self) -> Frame:
        """Read one frame (server frames are unmasked); answers pings with pongs."""
        while True:
            self._fill(2)
            first, second = self.buffer[0], self.buffer[1]
            length = second & 0x7F
            offset = 2
            if length == 126:
                self._fill(4)
                length = struct.unpack_from("!H", self.buffer, 2)[0]
                offset = 4
            elif length == 127:
                self._fill(10)
                length = struct.unpack_from("!Q", self.buffer, 2)[0]
                offset = 10
            self._fill(offset + length)
            payload = bytes(self.buffer[offset:offset + length])
            del self.buffer[:offset + length]
            frame = Frame(first & 0x0F, payload, bool(first & 0x80))
            if frame.opcode == 0x9:
                self.send(client_frame(0xA, payload))
                continue
            return frame

    def read_message(self) -> Frame:
        """Read one whole message (fragments joined); control frames come back alone."""
        frame = self.read_frame()
        if frame.opcode >= 0x8 or frame.fin:
            return frame
        parts = [frame.payload]
        while True:
            more = self.read_frame()
            if more.opcode >= 0x8:
                continue
            parts.append(more.payload)
            if more.fin:
                return Frame(frame.opcode, b"".join(parts))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass



def relay_host_port(relay: Any) -> tuple[str, int]:
    parts = urlsplit(relay.http_url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def log_excerpt(relay: Any, lines: int = 30) -> str:
    """The last lines of the relay's log, for failure messages."""
    return "\n".join(relay.log_text().splitlines()[-lines:])


def write_artifact(name: str, data: dict[str, Any]) -> Path | None:
    """Write measured figures to ``$STREAMRELAY_ARTIFACTS/name`` when that is set."""
    folder = os.environ.get("STREAMRELAY_ARTIFACTS")
    if not folder:
        return None
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    target = path / name
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")
    return target
