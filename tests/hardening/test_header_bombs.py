"""Hardening 2: header bombs.

Three request heads on a WebSocket path, each answered 431 and closed:

- one 64 KiB header line that never ends (no CRLF at all);
- 64 KiB of headers in lines of 4 KiB (each line under the 8 KiB line bound, the total
  over the 16 KiB head bound);
- 200 short header lines (over the 100-line bound).

Each bomb is repeated 200 times (600 connections, 20 at a time); the relay's RSS after
the bombs is within 5 MB of its RSS after a warm-up round, and its peak during them is
reported too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.figures import percentile, record_figure, rounded
from tests.support.http import read_response_async
from tests.support.net import abort_writer, open_async
from tests.support.relay_api import MB, RssSampler, api_internals
from tests.support.relay_process import StartRelay
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(180)]

REPETITIONS = 200
CONCURRENCY = 20
WARM_UP = 20
REQUEST_LINE = b"GET /watch/bomb HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"


def endless_line() -> bytes:
    """One header line of 64 KiB with no end."""
    return REQUEST_LINE + b"X-Bomb: " + b"a" * (64 * 1024)


def big_headers() -> bytes:
    """64 KiB of headers, 16 lines of 4 KiB, then the end of the head."""
    lines = b"".join(b"X-Bomb-%02d: %s\r\n" % (index, b"b" * 4080) for index in range(16))
    return REQUEST_LINE + lines + b"\r\n"


def many_lines() -> bytes:
    """200 short header lines, then the end of the head."""
    lines = b"".join(b"X-Line-%03d: v\r\n" % index for index in range(200))
    return REQUEST_LINE + lines + b"\r\n"


BOMBS = {
    "endless_64k_line": endless_line,
    "64k_of_headers": big_headers,
    "200_header_lines": many_lines,
}


async def _one_bomb(port: int, payload: bytes) -> dict[str, Any]:
    """Send a bomb; read the response and wait for the relay to end the connection."""
    reader, writer = await open_async(port)
    started = time.monotonic()
    outcome: dict[str, Any] = {"status": None, "closed": False, "seconds": None}
    try:
        writer.write(payload)
        async with asyncio.timeout(10):
            response = await read_response_async(reader)
            outcome["status"] = response.status
            outcome["connection"] = response.header("connection") or ""
            try:
                while await reader.read(65536):
                    pass
                outcome["closed"] = True
            except ConnectionResetError:
                outcome["closed"] = True
                outcome["reset"] = True
        outcome["seconds"] = time.monotonic() - started
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as error:
        outcome["error"] = repr(error)
    finally:
        abort_writer(writer)
    return outcome


async def _bombard(port: int, payload: bytes, count: int) -> list[dict[str, Any]]:
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def guarded() -> dict[str, Any]:
        async with semaphore:
            return await _one_bomb(port, payload)

    return await asyncio.gather(*(guarded() for _ in range(count)))


def test_header_bombs_get_431_and_closed_with_bounded_memory(start_relay: StartRelay) -> None:
    """Each header bomb, 200 times over, is answered 431 and closed; the connections are all
    gone afterwards and the relay's RSS stays within 5 MB of its warmed-up size."""
    relay = start_relay(internals=True)
    for build in BOMBS.values():
        asyncio.run(_bombard(relay.port, build(), WARM_UP))
    baseline = api_internals(relay)
    rss_before = relay.rss()
    results: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    with RssSampler(relay) as sampler:
        for name, build in BOMBS.items():
            results[name] = asyncio.run(_bombard(relay.port, build(), REPETITIONS))
    elapsed = time.monotonic() - started
    settled = wait_until(
        lambda: api_internals(relay)["connections"] == baseline["connections"],
        timeout=5,
        fail=False,
    )
    rss_after = relay.rss()
    figure: dict[str, Any] = {
        "repetitions_each": REPETITIONS,
        "concurrency": CONCURRENCY,
        "seconds": rounded(elapsed),
        "rss_before_mb": rounded(rss_before / MB, 2),
        "rss_after_mb": rounded(rss_after / MB, 2),
        "rss_growth_mb": rounded((rss_after - rss_before) / MB, 2),
        "rss_peak_growth_mb": rounded(sampler.peak_growth / MB, 2),
    }
    for name, outcomes in results.items():
        statuses: dict[str, int] = {}
        for outcome in outcomes:
            key = str(outcome["status"])
            statuses[key] = statuses.get(key, 0) + 1
        times = [outcome["seconds"] for outcome in outcomes if outcome["seconds"] is not None]
        figure[name] = {
            "statuses": statuses,
            "closed": sum(1 for outcome in outcomes if outcome["closed"]),
            "reset": sum(1 for outcome in outcomes if outcome.get("reset")),
            "close_p50_s": rounded(percentile(times, 0.5)),
            "close_max_s": rounded(max(times, default=0)),
            "errors": sorted({outcome["error"] for outcome in outcomes if "error" in outcome}),
        }
    record_figure("header_bombs", **figure)
    for name, outcomes in results.items():
        assert all(outcome["status"] == 431 for outcome in outcomes), (name, figure[name])
        assert all(outcome["closed"] for outcome in outcomes), (name, figure[name])
    assert settled, "connections did not return to their baseline"
    assert rss_after - rss_before < 5 * MB
