"""HTTP/1.1 as the tests speak it: request heads written by hand (the WebSocket opening
handshake among them), one response parser, and requests over raw sockets (blocking and
asyncio) or :mod:`http.client` (which never follows redirects)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from tests.support.net import abort_writer, connect, open_async

Headers: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]
SUBPROTOCOL = "streamrelay.v1"
_HEAD_END = b"\r\n\r\n"
# Responses that never carry a body, whatever their headers say.
_BODILESS = frozenset({101, 204, 304})


def _items(headers: Headers) -> list[tuple[str, str]]:
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


# -- requests ------------------------------------------------------------------------------


def request_head(method: str, target: str, headers: Headers = ()) -> bytes:
    """An HTTP/1.1 request head with exactly these header lines, in this order."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in _items(headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def websocket_key() -> str:
    """A fresh ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode()


def upgrade_headers(
    subprotocol: str | None = SUBPROTOCOL, *, host: str = "127.0.0.1"
) -> dict[str, str]:
    """The headers of a valid WebSocket opening handshake."""
    headers = {
        "Host": host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": websocket_key(),
        "Sec-WebSocket-Version": "13",
    }
    if subprotocol is not None:
        headers["Sec-WebSocket-Protocol"] = subprotocol
    return headers


def handshake_request(
    path: str,
    host: str = "127.0.0.1",
    headers: Headers = (),
    *,
    subprotocol: str | None = SUBPROTOCOL,
) -> bytes:
    """A client's opening handshake for ``path``, with ``headers`` added after the
    handshake's own."""
    lines = [*upgrade_headers(subprotocol, host=host).items(), *_items(headers)]
    return request_head("GET", path, lines)


def plain_request(
    path: str, host: str = "127.0.0.1", headers: Headers = (), method: str = "GET"
) -> bytes:
    """A plain request that asks for the connection to close."""
    return request_head(method, path, [("Host", host), ("Connection", "close"), *_items(headers)])


# -- responses -----------------------------------------------------------------------------


@dataclass
class Response:
    """An HTTP response: ``headers`` maps each lower-cased name to its first value,
    ``fields`` keeps every header line in order; ``rest`` is what followed the response
    (WebSocket frames after a 101)."""

    status: int
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    rest: bytes = b""
    fields: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return self.headers.get(name.lower())

    def header_values(self, name: str) -> list[str]:
        """Every value of header ``name`` (case-insensitive), in order."""
        return [value for field_name, value in self.fields if field_name == name.lower()]

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


def _response(status: int, reason: str, fields: list[tuple[str, str]]) -> Response:
    headers: dict[str, str] = {}
    for name, value in fields:
        headers.setdefault(name, value)
    return Response(status, reason, headers, fields=fields)


def parse_head(head: bytes) -> Response:
    """A response head (status line and header lines, without the blank line) as a
    :class:`Response` with no body."""
    lines = head.decode("latin-1").split("\r\n")
    _version, status, *reason = lines[0].split(" ", 2)
    fields = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value.strip()))
    return _response(int(status), reason[0] if reason else "", fields)


def _body_length(response: Response) -> int | None:
    if response.status in _BODILESS or 100 <= response.status < 200:
        return 0
    length = response.header("content-length")
    return None if length is None else int(length)


def parse_response(data: bytes, *, until_close: bool = False) -> Response | None:
    """The response at the start of ``data``, or None while it is incomplete.

    The body is delimited by ``Content-Length``. ``until_close``: ``data`` is all the
    peer will send (it closed), so a body without ``Content-Length`` is everything after
    the head, and a short body is returned as it is."""
    end = data.find(_HEAD_END)
    if end < 0:
        return None
    response = parse_head(data[:end])
    after = data[end + len(_HEAD_END) :]
    length = _body_length(response)
    if length is None:
        length = len(after) if until_close else 0
    if len(after) < length and not until_close:
        return None
    response.body, response.rest = after[:length], after[length:]
    return response


# -- over a blocking socket --------------------------------------------------------------


def read_response(sock: socket.socket, timeout: float = 5.0) -> Response:
    """Read one response (head, and the body its ``Content-Length`` announces)."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while True:
        response = parse_response(buffer)
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


def read_until_close(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset ends it too)."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def http_exchange(
    port: int,
    request: bytes,
    *,
    host: str = "127.0.0.1",
    source: str | None = None,
    timeout: float = 5.0,
    until_close: bool = False,
) -> Response:
    """Send one raw request on a fresh connection and read the response; with
    ``until_close``, read until the relay closes (the body is then all it sent)."""
    with contextlib.closing(connect(port, host=host, source=source, timeout=timeout)) as sock:
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            if not until_close:
                raise
        if not until_close:
            return read_response(sock, timeout)
        data = read_until_close(sock)
    response = parse_response(data, until_close=True)
    assert response is not None, f"no HTTP response head in {data[:200]!r}"
    return response


def http_get(
    base_url: str,
    path: str,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,
    method: str = "GET",
) -> Response:
    """One request with :mod:`http.client` (no redirect following) on a fresh
    connection; any status comes back as a :class:`Response`."""
    parts = urlsplit(base_url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        connection.request(method, path, headers={"Connection": "close", **(headers or {})})
        answer = connection.getresponse()
        fields = [(name.lower(), value) for name, value in answer.getheaders()]
        response = _response(answer.status, answer.reason, fields)
        response.body = answer.read()
        return response
    finally:
        connection.close()


def http_json(base_url: str, path: str, timeout: float = 5.0) -> Any:
    """GET a JSON document that must be answered 200."""
    response = http_get(base_url, path, timeout=timeout)
    assert response.status == 200, (path, response.status, response.body[:200])
    return response.json()


# -- over asyncio streams ----------------------------------------------------------------


async def read_response_async(reader: asyncio.StreamReader, timeout: float = 5.0) -> Response:
    """Read one response (head, and the body its ``Content-Length`` announces)."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(_HEAD_END)
        response = parse_head(head[: -len(_HEAD_END)])
        length = _body_length(response)
        if length:
            response.body = await reader.readexactly(length)
        return response


async def http_get_async(
    port: int,
    path: str,
    *,
    source: str | None = None,
    timeout: float = 5.0,
    headers: Headers = (),
) -> Response:
    """A plain GET over a fresh raw connection."""
    reader, writer = await open_async(port, source=source)
    try:
        writer.write(plain_request(path, headers=headers))
        return await read_response_async(reader, timeout)
    finally:
        abort_writer(writer)
