"""Real WebSocket clients: the ``websockets`` package (asyncio), as a third-party client
sees the relay. :func:`ws_connect` with test defaults, small receive helpers, and two
long-running peers: :class:`Viewer` (records every message with its arrival time) and
:class:`PacedPublisher` (sends numbered media at a fixed rate)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support.media import flags_for, media_message, media_sequence

SUBPROTOCOL = "streamrelay.v1"


def ws_connect(url: str, **options: Any) -> connect:
    """``websockets`` connect with test defaults: no client pings, no size limit, no
    compression, no proxy, 5 s to open and to close. Use as ``async with`` or await."""
    options.setdefault("ping_interval", None)
    options.setdefault("max_size", None)
    options.setdefault("compression", None)
    options.setdefault("proxy", None)
    options.setdefault("open_timeout", 5)
    options.setdefault("close_timeout", 5)
    return connect(url, **options)


async def text(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """Receive one message that must be a JSON object in a text message."""
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
            if isinstance(value, dict) and value.get("type") == kind:
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
        except TimeoutError:
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


async def refused(url: str, **options: Any) -> tuple[int, dict[str, str], str]:
    """A WebSocket handshake that must be refused; returns status, headers (lower-case
    names) and body."""
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


class Viewer:
    """A viewer recording every message with its arrival time."""

    def __init__(self, url: str, name: str = "viewer", **connect_options: Any) -> None:
        self.url = url
        self.name = name
        self.options: dict[str, Any] = {
            "max_size": 64 * 1024 * 1024,
            "subprotocols": [SUBPROTOCOL],
            "open_timeout": 10,
            "close_timeout": 10,
            **connect_options,
        }
        self.connection: ClientConnection | None = None
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
        self.started_at = time.monotonic()
        self.connection = await ws_connect(self.url, **self.options)
        self.opened_at = time.monotonic()
        self._task = asyncio.create_task(self._read(self.connection))
        return self

    async def _read(self, connection: ClientConnection) -> None:
        try:
            async for message in connection:
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
            received = connection.protocol.close_rcvd
            self.close_code = received.code if received is not None else None

    def statuses(self) -> list[tuple[float, str]]:
        """Every ``status`` message: (arrival time, state)."""
        return [
            (at, message.get("state", ""))
            for at, message in self.texts
            if message.get("type") == "status"
        ]

    def sequences(self) -> list[int]:
        """Sequence numbers of the media received (see
        :func:`tests.support.media.media_message`), in arrival order."""
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
    """A publisher sending :func:`~tests.support.media.media_message` at a fixed rate:
    CONFIG, then a KEY every ``gop`` messages; it drains what the relay sends it."""

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
        self.options: dict[str, Any] = {
            "max_size": 1024 * 1024,
            "subprotocols": [SUBPROTOCOL],
            "open_timeout": 10,
            "close_timeout": 10,
            **connect_options,
        }
        self.connection: ClientConnection | None = None
        self.sent = 0
        self.received: list[dict[str, Any]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.done = asyncio.Event()

    async def start(self) -> PacedPublisher:
        """Connect and start sending."""
        connection = await ws_connect(self.url, **self.options)
        self.connection = connection
        self._tasks = [
            asyncio.create_task(self._send(connection)),
            asyncio.create_task(self._drain(connection)),
        ]
        return self

    async def _send(self, connection: ClientConnection) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        try:
            while self.limit is None or self.sent < self.limit:
                message = media_message(self.sent, flags_for(self.sent, self.gop), self.size)
                await connection.send(message)
                self.sent += 1
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        except Exception:  # noqa: BLE001 - a closed connection ends the sending
            pass
        finally:
            self.done.set()

    async def _drain(self, connection: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for message in connection:
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
