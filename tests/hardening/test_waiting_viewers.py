"""Hardening 3 (issue 8): viewers cannot lock publishers out.

Viewing needs no token by default, and a viewer may connect before its publisher, so
anyone can make the relay hold stream names.  The relay runs with its default limits.
1,000 viewers, 100 from each of 127.0.0.2 ... 127.0.0.11, each ask for their own
invented stream name and hold their WebSocket:

1. the names that only viewers hold are bounded on their own: per address
   (``max_waiting_streams_per_ip``) and in total (``max_waiting_streams``); the rest
   are refused with 503, Retry-After and a reason that says so;
2. while they are held, a publisher on a new name is accepted at once and its media
   reaches a viewer that connected before it (viewers may still wait for a publisher),
   and a publisher on one of the invented names turns it into a stream its waiting
   viewer receives;
3. once every client is gone the relay forgets every name.

A second test fills the total bound from 60 addresses (20 names each, within the
per-address bound): 1,000 names wait, 200 more are refused for the total, a viewer of a
name that already waits is accepted, and a publisher of a new name too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from streamrelay.config import RelayConfig
from tests.support.figures import record_figure, rounded
from tests.support.frames import OP_BINARY, FrameParser, client_frame
from tests.support.http import Response
from tests.support.media import KEY, media_message
from tests.support.net import abort_writer, source_addresses
from tests.support.raw_ws import ws_open_async
from tests.support.relay_api import api_streams
from tests.support.relay_process import StartRelay
from tests.support.waiting import run, wait_until

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

ADDRESSES = source_addresses(10)  # 127.0.0.2 ... 127.0.0.11
PER_ADDRESS = 100
DEFAULTS = RelayConfig()


class Held:
    """Every viewer the test opened, and what the relay answered."""

    def __init__(self) -> None:
        self.open: list[tuple[str, asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.responses: list[Response] = []
        self.errors: list[str] = []

    async def attempt(
        self, port: int, source: str, name: str, semaphore: asyncio.Semaphore
    ) -> None:
        async with semaphore:
            try:
                reader, writer, response = await ws_open_async(
                    port, f"/watch/{name}", source=source, timeout=10
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
                self.errors.append(f"{source} {name}: {error!r}")
                return
            self.responses.append(response)
            if response.status == 101:
                self.open.append((name, reader, writer))
            else:
                abort_writer(writer)

    async def fill(self, port: int, sources: list[str], per_source: int, prefix: str) -> float:
        """``per_source`` viewers of names of their own from each source, 50 attempts
        at a time; returns the seconds it took."""
        semaphore = asyncio.Semaphore(50)
        started = time.monotonic()
        await asyncio.gather(
            *(
                self.attempt(port, source, f"{prefix}-{source}-{index}", semaphore)
                for source in sources
                for index in range(per_source)
            )
        )
        return time.monotonic() - started

    def tally(self) -> dict[str, int]:
        """Count of answers by status and reason."""
        counts: dict[str, int] = {}
        for response in self.responses:
            key = str(response.status)
            if response.status != 101:
                key += " " + response.body.decode("utf-8", "replace").strip()
            counts[key] = counts.get(key, 0) + 1
        return counts


async def _media_after(
    reader: asyncio.StreamReader, parser: FrameParser, timeout: float
) -> list[bytes]:
    """Binary messages the server sends within ``timeout`` (text is skipped)."""
    received: list[bytes] = []
    deadline = time.monotonic() + timeout
    while not received and time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                chunk = await reader.read(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        received += [f.payload for f in parser.feed(chunk) if f.opcode == OP_BINARY]
    return received


def test_a_thousand_invented_names_leave_publishing_working(start_relay: StartRelay) -> None:
    """The issue-8 scenario with the default limits: publishing on a new name works."""
    relay = start_relay()
    held = Held()
    figures: dict[str, Any] = {}

    async def scenario() -> None:
        seconds = await held.fill(relay.port, ADDRESSES, PER_ADDRESS, "invented")
        figures["viewer_attempts_s"] = rounded(seconds)

        # A viewer waits for a stream nobody publishes yet, then its publisher comes.
        early_reader, early_writer, response = await ws_open_async(relay.port, "/watch/fresh")
        assert response.status == 101, response
        started = time.monotonic()
        pub_reader, pub_writer, response = await ws_open_async(relay.port, "/publish/fresh")
        figures["new_publisher_status"] = response.status
        assert response.status == 101, (response.status, response.body)
        figures["new_publisher_handshake_s"] = rounded(time.monotonic() - started, 4)
        message = media_message(1, KEY, 100)
        pub_writer.write(client_frame(OP_BINARY, message))
        media = await _media_after(early_reader, FrameParser(), 5)
        assert media == [message], "the early viewer did not get the publisher's KEY"
        figures["new_stream_first_media_s"] = rounded(time.monotonic() - started, 4)

        # A publisher on one of the invented names: its waiting viewer gets the media.
        name, reader, _writer = held.open[0]
        _r2, invented_writer, response = await ws_open_async(relay.port, f"/publish/{name}")
        assert response.status == 101, (response.status, response.body)
        invented_writer.write(client_frame(OP_BINARY, message))
        assert await _media_after(reader, FrameParser(), 5) == [message]

        listed = api_streams(relay)
        figures["streams_listed"] = len(listed["streams"])
        figures["publishers"] = listed["connections"]["publishers"]
        for writer in (early_writer, pub_writer, invented_writer):
            abort_writer(writer)
        for _name, _reader, writer in held.open:
            abort_writer(writer)
        del pub_reader, _r2

    run(scenario(), 90)
    tally = held.tally()
    per_address = DEFAULTS.max_waiting_streams_per_ip
    expected_open = min(len(ADDRESSES) * per_address, DEFAULTS.max_waiting_streams)
    figures.update(
        {
            "attempts": len(held.responses),
            "answers": tally,
            "errors": len(held.errors),
            "waiting_limits": [DEFAULTS.max_waiting_streams, per_address],
        }
    )
    forgotten = wait_until(lambda: api_streams(relay)["streams"] == [], 10, fail=False)
    figures["names_forgotten_after_close"] = bool(forgotten)
    record_figure("viewers cannot lock publishers out", **figures)
    assert held.errors == []
    assert len(held.open) == expected_open
    assert tally == {
        "101": expected_open,
        "503 too many waiting streams from this address": 1000 - expected_open,
    }
    assert all(
        response.header("retry-after") for response in held.responses if response.status == 503
    )
    assert figures["publishers"] == 2
    assert forgotten


def test_the_total_bound_of_waiting_names_holds_and_publishing_still_works(
    start_relay: StartRelay,
) -> None:
    """Default limits, 60 addresses x 20 invented names (each address within its own
    bound): the first 1,000 names wait, the other 200 get 503 for the total; a viewer of
    a name that already waits is still accepted (no new name), and so is a publisher of
    a new name."""
    relay = start_relay()
    held = Held()
    per_address = DEFAULTS.max_waiting_streams_per_ip
    sources = source_addresses(60)
    figures: dict[str, Any] = {}

    async def scenario() -> None:
        seconds = await held.fill(relay.port, sources, per_address, "total")
        figures["viewer_attempts_s"] = rounded(seconds)
        joined_name = held.open[0][0]
        _reader, joiner, response = await ws_open_async(
            relay.port, f"/watch/{joined_name}", source="127.0.0.200"
        )
        figures["join_waiting_name_status"] = response.status
        _reader2, refused_writer, response = await ws_open_async(
            relay.port, "/watch/one-more", source="127.0.0.200"
        )
        figures["new_name_status"] = response.status
        _reader3, publisher, response = await ws_open_async(relay.port, "/publish/brand-new")
        figures["new_publisher_status"] = response.status
        for writer in (joiner, refused_writer, publisher):
            abort_writer(writer)
        for _name, _reader4, writer in held.open:
            abort_writer(writer)

    run(scenario(), 90)
    tally = held.tally()
    total = DEFAULTS.max_waiting_streams
    forgotten = wait_until(lambda: api_streams(relay)["streams"] == [], 10, fail=False)
    record_figure(
        "waiting names: total bound",
        attempts=len(held.responses),
        answers=tally,
        errors=len(held.errors),
        waiting_limits=[total, per_address],
        **figures,
    )
    assert held.errors == []
    assert tally == {
        "101": total,
        "503 too many streams waiting for a publisher": len(sources) * per_address - total,
    }
    assert figures["join_waiting_name_status"] == 101
    assert figures["new_name_status"] == 503
    assert figures["new_publisher_status"] == 101
    assert forgotten
