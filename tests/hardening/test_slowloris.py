"""Hardening 1: slowloris.

500 sockets send a WebSocket opening handshake one byte a second. The relay must close
each within ``--handshake-timeout`` + 1 s of its accept (here ``--handshake-timeout 2``,
so 3 s), however the bytes trickle in, while a real viewer still connects and gets media
in under 1 s.

The sockets are spread over the source addresses 127.0.0.2 … 127.0.0.20 (bound before
connecting, about 27 per address) so that they stay under the default per-address cap
of 100; the cap itself is left at its default. Each socket's close time is measured from
its ``connect()`` completing on the client, which is no later than the server's accept:
the figure is an upper bound of the real accept-to-close time. The sockets are driven by
one thread with a selector, so a close is timed the moment the client sees it.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import threading
import time
from typing import Any

import pytest

from tests.support.figures import percentile, record_figure, rounded
from tests.support.http import handshake_request
from tests.support.net import connect, source_addresses
from tests.support.relay_api import api_internals
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.ws_client import PacedPublisher, Viewer

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

HANDSHAKE_TIMEOUT = 2.0
SOCKETS = 500
BATCH = 25
SOURCES = source_addresses(19)  # 127.0.0.2 … 127.0.0.20
MAX_PROBES = 40


class Loris:
    """One socket dripping a handshake, one byte a second."""

    def __init__(self, index: int, sock: socket.socket, connected_at: float) -> None:
        self.index = index
        self.sock = sock
        self.connected_at = connected_at
        self.ended_at: float | None = None
        self.how = "open"
        self.bytes_sent = 0
        self.response = b""

    def end(self, how: str) -> None:
        self.ended_at = time.monotonic()
        self.how = how

    @property
    def lifetime(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.connected_at


class Drip:
    """Opens the sockets and drips their handshakes from one thread with a selector, so
    that each close is seen the moment it happens whatever the asyncio loop is doing."""

    def __init__(self, port: int, limit: float) -> None:
        self.port = port
        self.limit = limit
        self.lorises: list[Loris] = []
        self.opening_seconds = 0.0
        self.opened = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Drip:
        self._thread.start()
        return self

    def join(self) -> None:
        self._thread.join(self.limit + 10)

    def open_count(self) -> int:
        return sum(1 for loris in self.lorises if loris.ended_at is None)

    def _open(self) -> None:
        """Connect in batches no larger than the listen backlog (50) so that each
        connect is accepted at once: connect and accept times stay close."""
        started = time.monotonic()
        for first in range(0, SOCKETS, BATCH):
            for index in range(first, min(first + BATCH, SOCKETS)):
                sock = connect(self.port, source=SOURCES[index % len(SOURCES)])
                sock.setblocking(False)
                self.lorises.append(Loris(index, sock, time.monotonic()))
            time.sleep(0.005)
        self.opening_seconds = time.monotonic() - started

    def _run(self) -> None:
        request = handshake_request("/watch/live")
        selector = selectors.DefaultSelector()
        try:
            self._open()
            for loris in self.lorises:
                selector.register(loris.sock, selectors.EVENT_READ, loris)
            self.opened.set()
            while True:
                now = time.monotonic()
                live = [loris for loris in self.lorises if loris.ended_at is None]
                if not live:
                    return
                for loris in live:
                    if now - loris.connected_at >= self.limit:
                        loris.how = "still-open"
                        selector.unregister(loris.sock)
                        loris.ended_at = None
                    elif loris.bytes_sent <= now - loris.connected_at and loris.bytes_sent < len(
                        request
                    ):
                        try:
                            loris.sock.send(request[loris.bytes_sent : loris.bytes_sent + 1])
                            loris.bytes_sent += 1
                        except OSError:
                            loris.end("write-error")
                            selector.unregister(loris.sock)
                if all(loris.how == "still-open" for loris in live):
                    return
                for key, _ in selector.select(timeout=0.01):
                    loris = key.data
                    try:
                        chunk = loris.sock.recv(4096)
                    except ConnectionResetError:
                        loris.end("rst")
                        selector.unregister(loris.sock)
                        continue
                    except BlockingIOError:
                        continue
                    if chunk:
                        loris.response += chunk
                    else:
                        loris.end("fin")
                        selector.unregister(loris.sock)
        finally:
            self.opened.set()
            selector.close()
            for loris in self.lorises:
                loris.sock.close()


async def _probe(relay: RelayProcess, index: int, drip: Drip) -> dict[str, Any]:
    viewer = Viewer(f"{relay.ws_url}/watch/live", name=f"probe-{index}")
    open_lorises = drip.open_count()
    started = time.monotonic()
    await viewer.start()
    try:
        await asyncio.wait_for(viewer.first_media.wait(), 5.0)
        first_media = viewer.media[0][0] - started
    except TimeoutError:
        first_media = float("inf")
    finally:
        await viewer.close()
    return {
        "open_lorises": open_lorises,
        "first_media_s": first_media,
        "handshake_s": viewer.opened_at - started,
    }


async def _scenario(relay: RelayProcess) -> dict[str, Any]:
    publisher = await PacedPublisher(f"{relay.ws_url}/publish/live", rate=25, gop=25).start()
    await asyncio.sleep(0.5)  # CONFIG and a KEY are in the GOP cache
    drip = Drip(relay.port, limit=HANDSHAKE_TIMEOUT + 6).start()
    # Viewers probe from the moment 100 sockets are open until the last one is closed.
    deadline = time.monotonic() + 10
    while len(drip.lorises) < 100 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    probes: list[dict[str, Any]] = []
    index = 0
    while drip.open_count() and len(probes) < MAX_PROBES:
        probes.append(await _probe(relay, index, drip))
        index += 1
        await asyncio.sleep(0.25)
    await asyncio.to_thread(drip.join)
    await publisher.close()
    return {"lorises": drip.lorises, "probes": probes, "opening_seconds": drip.opening_seconds}


def test_slowloris_sockets_closed_on_time_while_viewers_get_media(start_relay: StartRelay) -> None:
    """500 handshakes dripping a byte a second are each closed within ``--handshake-timeout``
    + 1 s of their accept while real viewers still connect and get media in under 1 s."""
    relay = start_relay("--handshake-timeout", str(HANDSHAKE_TIMEOUT), internals=True)
    baseline = api_internals(relay)
    outcome = asyncio.run(_scenario(relay))
    lorises: list[Loris] = outcome["lorises"]
    probes: list[dict[str, Any]] = outcome["probes"]
    assert probes, "no viewer probe ran"
    lifetimes = [loris.lifetime for loris in lorises if loris.lifetime is not None]
    still_open = [loris.index for loris in lorises if loris.ended_at is None]
    how: dict[str, int] = {}
    for loris in lorises:
        how[loris.how] = how.get(loris.how, 0) + 1
    bound = HANDSHAKE_TIMEOUT + 1.0
    after = api_internals(relay)
    record_figure(
        "slowloris",
        sockets=SOCKETS,
        source_addresses="127.0.0.2-127.0.0.20 (19, about 27 each; per-IP cap left at 100)",
        handshake_timeout_s=HANDSHAKE_TIMEOUT,
        bound_s=bound,
        opening_s=rounded(outcome["opening_seconds"]),
        closed=len(lifetimes),
        close_kinds=how,
        close_after_connect_min_s=rounded(min(lifetimes, default=0)),
        close_after_connect_p50_s=rounded(percentile(lifetimes, 0.5)),
        close_after_connect_p99_s=rounded(percentile(lifetimes, 0.99)),
        close_after_connect_max_s=rounded(max(lifetimes, default=0)),
        bytes_sent_max=max(loris.bytes_sent for loris in lorises),
        viewer_probes=len(probes),
        viewer_probe_open_sockets=[probe["open_lorises"] for probe in probes],
        viewer_first_media_p50_s=rounded(percentile([p["first_media_s"] for p in probes], 0.5)),
        viewer_first_media_max_s=rounded(max(p["first_media_s"] for p in probes)),
        viewer_handshake_max_s=rounded(max(p["handshake_s"] for p in probes)),
        connections_before=baseline["connections"],
        connections_after=after["connections"],
    )
    assert not still_open, f"{len(still_open)} sockets still open after {bound + 5} s"
    assert max(lifetimes) <= bound, f"slowest close {max(lifetimes):.3f} s > {bound} s"
    assert min(lifetimes) >= HANDSHAKE_TIMEOUT - 0.1, "closed before the handshake timeout"
    assert all(not loris.response for loris in lorises), "a slowloris socket got a response"
    most_open = max(probe["open_lorises"] for probe in probes)
    assert most_open >= SOCKETS * 0.8, f"probes overlapped at most {most_open} open sockets"
    slowest_probe = max(probe["first_media_s"] for probe in probes)
    assert slowest_probe < 1.0, f"viewer waited {slowest_probe:.3f} s for media"
    assert after["connections"] == baseline["connections"]
    assert after["limiter"]["addresses"] == baseline["limiter"]["addresses"]
