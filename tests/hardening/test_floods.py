"""Hardening 4: connection floods over the per-address and global caps.

The relay runs with ``--max-connections 200 --max-connections-per-ip 20``. Viewers open
WebSockets by hand from 127.0.0.2 … 127.0.0.20 and hold them:

1. 25 from 127.0.0.2: 20 are upgraded, 5 get 503 (per-address cap) with Retry-After;
2. 20 from each of 127.0.0.3 … 127.0.0.20 (360): exactly 180 more are upgraded (the
   global cap of 200), the other 180 get 503 (global cap) with Retry-After;
3. while the relay is full, ``/healthz`` from 127.0.0.1 is refused too (503): the caps
   count every connection;
4. the relay counts every refusal (``limiter.refused`` in ``/api/internals``), and once
   every client has gone its file descriptors and counters return to their baseline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.support.figures import record_figure, rounded
from tests.support.http import Response, http_get
from tests.support.net import abort_writer, source_addresses
from tests.support.raw_ws import ws_open_async
from tests.support.relay_api import api_internals
from tests.support.relay_process import RelayProcess, StartRelay
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

MAX_CONNECTIONS = 200
PER_IP = 20


class Held:
    """Every connection the test opened, and what the relay answered."""

    def __init__(self) -> None:
        self.writers: list[Any] = []
        self.responses: list[tuple[str, Response]] = []
        self.errors: list[str] = []

    async def attempt(self, port: int, source: str, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            try:
                _reader, writer, response = await ws_open_async(
                    port, "/watch/flood", source=source, timeout=10
                )
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
                self.errors.append(f"{source}: {error!r}")
                return
            self.responses.append((source, response))
            if response.status == 101:
                self.writers.append(writer)
            else:
                abort_writer(writer)

    def tally(self, sources: set[str] | None = None) -> dict[str, Any]:
        statuses: dict[str, int] = {}
        reasons: dict[str, int] = {}
        retry_after_missing = 0
        for source, response in self.responses:
            if sources is not None and source not in sources:
                continue
            statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
            if response.status != 101:
                reason = response.body.decode("utf-8", "replace").strip()
                reasons[reason] = reasons.get(reason, 0) + 1
                if response.status == 503 and not response.header("retry-after"):
                    retry_after_missing += 1
        return {
            "statuses": statuses,
            "reasons": reasons,
            "retry_after_missing": retry_after_missing,
        }

    async def close_all(self) -> None:
        for writer in self.writers:
            abort_writer(writer)
        self.writers.clear()
        await asyncio.sleep(0)


async def _flood(relay: RelayProcess, held: Held) -> dict[str, Any]:
    semaphore = asyncio.Semaphore(40)
    first, *others = source_addresses(19)
    started = time.monotonic()
    await asyncio.gather(*(held.attempt(relay.port, first, semaphore) for _ in range(25)))
    per_ip = held.tally({first})
    await asyncio.gather(
        *(held.attempt(relay.port, source, semaphore) for source in others for _ in range(PER_IP))
    )
    flood_seconds = time.monotonic() - started
    global_cap = held.tally(set(others))
    healthz_when_full = (await asyncio.to_thread(http_get, relay.http_url, "/healthz")).status
    fds_while_full = relay.open_files()
    # Make room for the leak accounting request, then ask how many were refused.
    for writer in held.writers[:10]:
        abort_writer(writer)
    del held.writers[:10]
    await asyncio.sleep(0.3)
    counts = await asyncio.to_thread(api_internals, relay)
    await held.close_all()
    return {
        "per_ip": per_ip,
        "global": global_cap,
        "healthz_when_full": healthz_when_full,
        "counts_while_held": counts,
        "flood_seconds": flood_seconds,
        "fds_while_full": fds_while_full,
    }


def test_floods_refused_with_503_counted_and_descriptors_return(start_relay: StartRelay) -> None:
    """Connections over the per-address and global caps get 503 with Retry-After (``/healthz``
    too while full), the relay counts every refusal, and descriptors and counters return
    to their baseline once the clients are gone."""
    relay = start_relay(
        "--max-connections",
        str(MAX_CONNECTIONS),
        "--max-connections-per-ip",
        str(PER_IP),
        internals=True,
    )
    baseline = api_internals(relay)
    time.sleep(0.2)
    fds_before = relay.open_files()
    held = Held()
    outcome = asyncio.run(_flood(relay, held))
    returned = wait_until(lambda: relay.open_files() <= fds_before, timeout=5, fail=False)
    fds_after = relay.open_files()
    after = api_internals(relay)
    counts = outcome["counts_while_held"]
    refused_seen = sum(
        count
        for tally in (outcome["per_ip"], outcome["global"])
        for status, count in tally["statuses"].items()
        if status == "503"
    )
    healthz_refused = 1 if outcome["healthz_when_full"] == 503 else 0
    record_figure(
        "floods",
        max_connections=MAX_CONNECTIONS,
        max_connections_per_ip=PER_IP,
        sources="127.0.0.2 (25 attempts), 127.0.0.3-127.0.0.20 (20 attempts each)",
        attempts=len(held.responses) + len(held.errors),
        per_ip_phase=outcome["per_ip"],
        global_phase=outcome["global"],
        client_errors=held.errors[:5],
        flood_seconds=rounded(outcome["flood_seconds"]),
        healthz_while_full=outcome["healthz_when_full"],
        refused_counted_by_relay=counts["limiter"]["refused"],
        refused_seen_by_clients=refused_seen + healthz_refused,
        fds_before=fds_before,
        fds_while_full=outcome["fds_while_full"],
        fds_after=fds_after,
        connections_after=after["connections"],
        limiter_after=after["limiter"],
    )
    assert not held.errors
    assert outcome["per_ip"]["statuses"] == {"101": PER_IP, "503": 5}
    assert outcome["per_ip"]["reasons"] == {"too many connections from this address": 5}
    assert outcome["global"]["statuses"] == {"101": MAX_CONNECTIONS - PER_IP, "503": 180}
    assert outcome["global"]["reasons"] == {"server connection limit reached": 180}
    assert outcome["per_ip"]["retry_after_missing"] == 0
    assert outcome["global"]["retry_after_missing"] == 0
    assert outcome["healthz_when_full"] == 503
    assert counts["limiter"]["refused"] == refused_seen + healthz_refused
    assert returned, f"descriptors: {fds_before} before, {fds_after} after"
    assert after["connections"] == baseline["connections"]
    assert after["limiter"]["total"] == baseline["limiter"]["total"]
    assert after["limiter"]["addresses"] == baseline["limiter"]["addresses"]
    assert after["objects"] == baseline["objects"]
