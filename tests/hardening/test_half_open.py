"""Hardening 7: half-open connections.

100 viewers reach the relay through a black-hole TCP proxy inside the test; 5 more watch
directly. At a moment the proxy stops forwarding in both directions (it stops reading
from both sockets, so nothing moves and no write makes progress) without closing any
socket, which is what a vanished peer looks like. With ``--ping-interval 2
--ping-timeout 2`` every proxied viewer must be reaped within 2 + 2 + 1 = 5 s, while the
direct viewers keep receiving every message in order (sequence numbers in payloads).

The proxied viewers join spread over one whole ping cycle (4 s), so their ping phases
cover every position relative to the moment the proxy goes dark: the worst case is
measured, not a lucky one. The proxy's upstream connections come from 127.0.0.2 …
127.0.0.20 (about 6 per address), under the per-address cap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.figures import record_figure, rounded
from tests.support.net import source_addresses
from tests.support.proxy import TcpProxy
from tests.support.relay_api import api_streams, stream_entry
from tests.support.relay_process import RelayProcess, problems_report
from tests.support.ws_client import PacedPublisher, Viewer

pytestmark = [pytest.mark.hardening, pytest.mark.timeout(120)]

PING_INTERVAL = 2.0
PING_TIMEOUT = 2.0
PROXIED = 100
DIRECT = 5
BOUND = PING_INTERVAL + PING_TIMEOUT + 1.0


def _viewer_count(relay: RelayProcess) -> int:
    entry = stream_entry(api_streams(relay), "halfopen")
    return 0 if entry is None else int(entry["viewers"])


async def _scenario(relay: RelayProcess) -> dict[str, Any]:
    publisher = await PacedPublisher(
        f"{relay.ws_url}/publish/halfopen", rate=25, gop=25, size=512
    ).start()
    direct = [
        await Viewer(f"{relay.ws_url}/watch/halfopen", name=f"direct-{index}").start()
        for index in range(DIRECT)
    ]
    proxy = await TcpProxy(relay.port, sources=source_addresses(19)).start()
    proxied: list[Viewer] = []
    cycle = PING_INTERVAL + PING_TIMEOUT
    for index in range(PROXIED):
        viewer = Viewer(f"ws://127.0.0.1:{proxy.port}/watch/halfopen", name=f"proxied-{index}")
        proxied.append(await viewer.start())
        await asyncio.sleep(cycle / PROXIED)
    await asyncio.sleep(1.0)
    before = await asyncio.to_thread(_viewer_count, relay)
    dark_at = time.monotonic()
    proxy.go_dark()
    timeline: list[tuple[float, int]] = []
    while time.monotonic() - dark_at < BOUND + 5:
        count = await asyncio.to_thread(_viewer_count, relay)
        timeline.append((time.monotonic() - dark_at, count))
        if count <= DIRECT:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)
    sent = await publisher.stop_sending()
    await asyncio.sleep(0.5)
    await publisher.close()
    for viewer in direct:
        await viewer.close()
    await proxy.close()
    for viewer in proxied:
        await viewer.close()
    return {
        "direct": direct,
        "timeline": timeline,
        "before": before,
        "dark_at": dark_at,
        "sent": sent,
    }


@pytest.fixture(scope="module")
def half_open_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One run of the scenario, shared by the two checks below."""
    log = tmp_path_factory.mktemp("half-open") / "relay.log"
    relay = RelayProcess(
        log, ["--ping-interval", str(PING_INTERVAL), "--ping-timeout", str(PING_TIMEOUT)]
    )
    try:
        outcome = asyncio.run(_scenario(relay))
    finally:
        relay.stop()
    # What the start_relay fixture checks for the other tests: no traceback in the log.
    outcome["log_problems"] = problems_report([relay])
    timeline: list[tuple[float, int]] = outcome["timeline"]
    outcome["reaped_at"] = next((at for at, count in timeline if count <= DIRECT), None)
    reaped_by_second: dict[str, int] = {}
    for at, count in timeline:
        reaped_by_second[str(int(at))] = outcome["before"] - count
    direct: list[Viewer] = outcome["direct"]
    gaps = []
    continuity = {}
    for viewer in direct:
        sequences = viewer.sequences()
        body = sequences[1:]
        continuity[viewer.name] = (
            sequences[:1] == [0]
            and bool(body)
            and body == list(range(body[0], body[0] + len(body)))
            and body[-1] == outcome["sent"] - 1
        )
        times = [at for at, _ in viewer.media if at >= outcome["dark_at"]]
        gaps.append(max((b - a for a, b in zip(times, times[1:], strict=False)), default=0))
    outcome["continuity"] = continuity
    outcome["max_gap"] = max(gaps)
    reaped_at = outcome["reaped_at"]
    record_figure(
        "half_open",
        proxied_viewers=PROXIED,
        direct_viewers=DIRECT,
        ping_interval_s=PING_INTERVAL,
        ping_timeout_s=PING_TIMEOUT,
        bound_s=BOUND,
        viewers_before=outcome["before"],
        all_reaped_after_s=None if reaped_at is None else rounded(reaped_at),
        reaped_within_bound=max(
            (outcome["before"] - count for at, count in timeline if at <= BOUND), default=0
        ),
        reaped_by_second=reaped_by_second,
        direct_messages=[len(viewer.media) for viewer in direct],
        publisher_sent=outcome["sent"],
        direct_in_order_without_gap=continuity,
        direct_max_interarrival_after_dark_s=rounded(outcome["max_gap"]),
    )
    yield outcome


def test_half_open_other_viewers_continue_without_gap(half_open_run: dict[str, Any]) -> None:
    """While 100 half-open viewers are reaped, the direct viewers receive every message in
    order with no long gap, and the relay logs no traceback."""
    assert half_open_run["before"] == PROXIED + DIRECT
    assert all(half_open_run["continuity"].values()), half_open_run["continuity"]
    # A loose bound: the reactor is never blocked for long while it reaps.
    assert half_open_run["max_gap"] < 2.0
    assert half_open_run["log_problems"] is None, half_open_run["log_problems"]
    # Every proxied viewer is reaped in the end (the bound is checked below).
    assert half_open_run["reaped_at"] is not None


def test_half_open_viewers_reaped_within_ping_interval_plus_timeout(
    half_open_run: dict[str, Any],
) -> None:
    """Every half-open viewer is reaped within ping interval + ping timeout + 1 s."""
    # Found by this test at 1aa4f62: the next ping was scheduled a full interval after
    # the previous ping's check, so a peer that vanished just after a pong took up to
    # interval + 2 x timeout (about 6 s here). Fixed in 3e851d7 (pings every interval).
    reaped_at = half_open_run["reaped_at"]
    assert reaped_at is not None and reaped_at <= BOUND, f"last reaped after {reaped_at} s"
