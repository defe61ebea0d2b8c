"""Viewers of every rendition stream of a publisher (``cam``, ``cam~360p`` ...), each
recording what it receives, for the tests of ``streamrelay-publish --renditions``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, parse_media
from tests.support.relay_process import RelayProcess
from tests.support.ws_client import SUBPROTOCOL, ws_connect


@dataclass
class Watched:
    """Everything one viewer of one rendition stream received, with arrival times."""

    stream: str
    metas: list[dict[str, Any]] = field(default_factory=list)
    configs: list[bytes] = field(default_factory=list)
    # (arrival monotonic time, capture time, payload) of every KEY
    keys: list[tuple[float, int, bytes]] = field(default_factory=list)
    frames: int = 0
    statuses: list[str] = field(default_factory=list)

    def ready(self) -> bool:
        """meta, CONFIG and a KEY have arrived."""
        return bool(self.metas and self.configs and self.keys)


async def record(connection: ClientConnection, watched: Watched) -> None:
    """Read one viewer's messages into ``watched`` until the connection closes."""
    with contextlib.suppress(ConnectionClosed):
        async for message in connection:
            if isinstance(message, str):
                value = json.loads(message)
                if value.get("type") == "meta":
                    watched.metas.append(value)
                elif value.get("type") == "status":
                    watched.statuses.append(value["state"])
                continue
            media = parse_media(message)
            if media.flags & FLAG_CONFIG:
                watched.configs.append(media.payload)
            else:
                watched.frames += 1
                if media.flags & FLAG_KEY:
                    watched.keys.append((time.monotonic(), media.capture_time_us, media.payload))


@contextlib.asynccontextmanager
async def watching(
    relay: RelayProcess, watched: list[Watched]
) -> AsyncIterator[list[ClientConnection]]:
    """One viewer per entry of ``watched``, each recording into it, for the ``async
    with`` block; then every viewer is closed and its recording finished."""
    connections = [
        await ws_connect(f"{relay.ws_url}/watch/{w.stream}", subprotocols=[SUBPROTOCOL])
        for w in watched
    ]
    readers = [
        asyncio.create_task(record(c, w)) for c, w in zip(connections, watched, strict=True)
    ]
    try:
        yield connections
    finally:
        for connection in connections:
            await connection.close()
        for reader in readers:
            await reader


async def wait_every_rendition(
    watched: list[Watched],
    done: Callable[[Watched], bool],
    publisher: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 60.0,
) -> None:
    """Wait until ``done`` holds for every viewer; fail at ``timeout`` or at once when
    the publisher exits (with its log)."""
    deadline = time.monotonic() + timeout
    while not all(done(w) for w in watched):
        assert time.monotonic() < deadline, "not every rendition went live"
        assert publisher.poll() is None, log.read_text()
        await asyncio.sleep(0.1)
