"""``streamrelay-publish --on-demand --source udp://...`` end to end: a remuxed live
source (MPEG-TS over UDP that the test produces with PyAV) is closed while nobody watches
(no media reaches the relay, nothing counts as dropped) and opened again for the first
viewer, who starts at the source's next keyframe."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, parse_media
from tests.integration.test_publisher_source import GOP, free_port, producer_process
from tests.support.publisher_process import start_publisher, stop_publisher
from tests.support.relay_api import entry_in_state
from tests.support.relay_process import RelayProcess
from tests.support.waiting import run, wait_until
from tests.support.ws_client import ws_connect

pytestmark = [pytest.mark.integration, pytest.mark.publisher_process]

NAME = "idlecam"


@pytest.mark.timeout(120)
def test_a_remuxed_live_source_idles_unwatched_and_wakes_at_its_next_keyframe(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """Unwatched past the grace: "available", no media in; a viewer then gets CONFIG
    first and soon a KEY captured after it came (the reopened source's next keyframe);
    at exit the publisher reports its time idle and, of the frames the source sent
    meanwhile (a second's worth and more), none as dropped (a drop or two may come of a
    burst at start-up, when FFmpeg hands over what it read while probing)."""
    port = free_port(socket.SOCK_DGRAM)
    url = f"udp://127.0.0.1:{port}"
    log = tmp_path / "publisher.log"
    publisher = start_publisher(
        f"{relay.ws_url}/publish/{NAME}",
        "--source",
        url,
        "--on-demand",
        "--on-demand-grace",
        "1",
        log=log,
        output="stderr",
    )
    producer = producer_process(
        [f"{url}?pkt_size=1316"], "mpegts", 90 * GOP, str(tmp_path / "produced.jsonl")
    )

    def in_state(state: str) -> dict[str, object] | None:
        return entry_in_state(relay, NAME, state)

    async def first_frames() -> list[int]:
        """The flags of what a viewer receives up to a KEY captured after it came (one
        from the reopened source, not one the relay kept from before the idle period)."""
        came_us = time.time_ns() // 1000
        ws = await ws_connect(f"{relay.ws_url}/watch/{NAME}")
        flags: list[int] = []
        try:
            while True:
                message = await asyncio.wait_for(ws.recv(), 20)
                if isinstance(message, bytes):
                    media = parse_media(message)
                    flags.append(media.flags)
                    if media.flags == FLAG_KEY and media.capture_time_us > came_us:
                        return flags
                else:
                    assert json.loads(message)["type"] in ("status", "meta", "viewers")
        finally:
            await ws.close()

    try:
        wait_until(lambda: in_state("live"), 30)
        idle = wait_until(lambda: in_state("available"), 30)
        time.sleep(2.0)
        later = in_state("available")
        assert later is not None and later["messages_in"] == idle["messages_in"]
        flags = run(first_frames(), 60)
        assert flags[0] == FLAG_CONFIG and flags[-1] == FLAG_KEY, flags
        assert publisher.poll() is None, log.read_text()
    finally:
        status = stop_publisher(publisher, 20, signal.SIGINT)
        producer.kill()
        producer.wait()
    output = log.read_text()
    assert status == 0, output
    assert "Traceback" not in output, output
    summary = re.search(r"; dropped (\d+);.*; idle on demand ([\d.]+) s", output)
    assert summary is not None, output
    assert float(summary.group(2)) >= 2.0 and int(summary.group(1)) < GOP // 2, output
