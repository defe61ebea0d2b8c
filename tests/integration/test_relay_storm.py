"""A storm of 2,000 connect/close cycles of every kind leaves the relay exactly idle and
answering at once."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.support.figures import write_artifact
from tests.support.frames import OP_BINARY, client_frame
from tests.support.http import handshake_request, http_get, read_response_async
from tests.support.media import DELTA, KEY, media
from tests.support.net import abort_writer
from tests.support.relay_api import idle_state
from tests.support.relay_process import StartRelay
from tests.support.waiting import run, wait_until
from tests.support.ws_client import binary, text, ws_connect

pytestmark = pytest.mark.integration

CYCLES = 2000
CONCURRENCY = 50
STREAMS = 4
KINDS = ("clean", "abrupt", "rst", "mid-handshake", "mid-frame")


async def _raw_upgrade(
    host: str, port: int, path: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(handshake_request(path, f"{host}:{port}"))
    response = await read_response_async(reader, 10)
    return reader, writer, response.status


async def _cycle(
    number: int, host: str, port: int, ws_url: str, tally: collections.Counter[str]
) -> None:
    kind = KINDS[number % len(KINDS)]
    role = "publish" if (number // len(KINDS)) % 2 else "watch"
    path = f"/{role}/storm{number % STREAMS}"
    frame = media(KEY if number % 3 == 0 else DELTA, b"s" * (number % 700))
    if kind == "clean":
        try:
            async with ws_connect(f"{ws_url}{path}") as ws:
                if role == "publish":
                    await ws.send(frame)
                else:
                    await text(ws)
        except ConnectionClosed as closed:
            # Concurrent publishers of one stream take it over from each other.
            if closed.rcvd is None or closed.rcvd.code != 4409:
                raise
            tally[f"{kind}/{role} (replaced, 4409)"] += 1
            return
        tally[f"{kind}/{role}"] += 1
        return
    if kind == "mid-handshake":
        reader, writer = await asyncio.open_connection(host, port)
        request = handshake_request(path, f"{host}:{port}")
        writer.write(request[: len(request) // 2])
        await writer.drain()
        abort_writer(writer, reset=bool(number % 2))
        tally[f"{kind}/{role}"] += 1
        return
    reader, writer, status = await _raw_upgrade(host, port, path)
    if status != 101:
        tally[f"refused-{status}"] += 1
        writer.close()
        return
    if kind == "abrupt":
        if role == "publish":
            writer.write(client_frame(OP_BINARY, frame))
            await writer.drain()
        writer.close()  # FIN without a close frame
    elif kind == "rst":
        if role == "publish":
            writer.write(client_frame(OP_BINARY, frame))
            await writer.drain()
        abort_writer(writer, reset=True)
    else:  # mid-frame
        whole = client_frame(OP_BINARY, frame if role == "publish" else b'{"type":"x"}' * 20)
        writer.write(whole[: max(3, len(whole) // 2)])
        await writer.drain()
        abort_writer(writer, reset=bool(number % 2))
    tally[f"{kind}/{role}"] += 1


@pytest.mark.timeout(150)
def test_storm_of_connects_and_closes_leaves_relay_idle(start_relay: StartRelay) -> None:
    """2,000 connect/close cycles, 50 at a time, against publishers and viewers of a few
    streams: clean closes, abrupt closes (FIN, no close frame), RSTs, closes in the
    middle of the handshake and in the middle of a frame.  Afterwards ``/api/streams``
    shows no stream and no connection but the asking one, ``/healthz`` answers at once,
    descriptors are back and memory has not run away; the relay still relays."""
    relay = start_relay(
        "--max-handshakes-per-ip", "100000", "--max-connections-per-ip", "1000",
        "--handshake-timeout", "3", "--close-timeout", "2",
    )
    host, port = relay.host, relay.port
    wait_until(lambda: idle_state(relay), 5)
    rss_before, fds_before = relay.rss(), relay.open_files()
    tally: collections.Counter[str] = collections.Counter()
    failures: list[str] = []

    async def storm() -> float:
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(number: int) -> None:
            async with gate:
                try:
                    await asyncio.wait_for(_cycle(number, host, port, relay.ws_url, tally), 20)
                except Exception as error:  # noqa: BLE001 - tallied and reported
                    failures.append(f"{number} {KINDS[number % len(KINDS)]}: {error!r}")

        started = time.monotonic()
        await asyncio.gather(*(one(number) for number in range(CYCLES)))
        return time.monotonic() - started

    seconds = run(storm(), 120)
    settle_started = time.monotonic()
    try:
        idle = wait_until(lambda: idle_state(relay), 15, interval=0.2)
    except AssertionError:
        pytest.fail(
            "relay not idle 15 s after the storm: "
            + json.dumps(http_get(relay.http_url, "/api/streams").json())
            + "\n" + relay.log_excerpt()
        )
    settle = time.monotonic() - settle_started
    asked = time.monotonic()
    health = http_get(relay.http_url, "/healthz", timeout=5)
    health_seconds = time.monotonic() - asked
    rss_after, fds_after = relay.rss(), relay.open_files()
    figures: dict[str, Any] = {
        "cycles": CYCLES,
        "concurrency": CONCURRENCY,
        "seconds": round(seconds, 2),
        "settle_seconds": round(settle, 2),
        "healthz_seconds": round(health_seconds, 4),
        "rss_before": rss_before,
        "rss_after": rss_after,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "outcomes": dict(sorted(tally.items())),
        "failures": len(failures),
        "api_after": idle,
    }
    print("storm figures:", json.dumps(figures))
    write_artifact("storm.json", figures)

    assert not failures, failures[:10]
    assert sum(tally.values()) == CYCLES
    assert not [k for k in tally if k.startswith("refused")], tally
    assert idle["streams"] == []
    assert idle["connections"]["publishers"] == 0 and idle["connections"]["viewers"] == 0
    assert idle["connections"]["total"] <= 1  # just the asking request
    assert health.status == 200 and health_seconds < 1.0
    assert fds_after <= fds_before + 2, (fds_before, fds_after)
    assert rss_after - rss_before < 64 * 1024 * 1024, (rss_before, rss_after)

    async def still_relays() -> None:
        async with ws_connect(f"{relay.ws_url}/watch/after") as viewer, \
                ws_connect(f"{relay.ws_url}/publish/after") as publisher:
            await text(viewer)
            await text(viewer)
            message = media(KEY, b"alive")
            await publisher.send(message)
            assert await binary(viewer) == message

    run(still_relays(), 15)
