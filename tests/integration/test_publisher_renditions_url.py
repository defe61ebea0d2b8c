"""``streamrelay-publish --renditions ... --source URL`` end to end: a network camera (a
live MPEG-TS stream over UDP that the test produces with PyAV) decoded and published in
two GOP-aligned renditions through the real ``twistd streamrelay`` relay, watched by
independent ``websockets`` viewers."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.integration.test_publisher_renditions import sps_size
from tests.integration.test_publisher_source import GOP, free_port, producer_process
from tests.support.publisher_process import start_publisher, stop_publisher
from tests.support.relay_process import RelayProcess
from tests.support.rendition_viewers import Watched, wait_every_rendition, watching
from tests.support.waiting import run

pytestmark = [pytest.mark.integration, pytest.mark.publisher_process]

EXPECTED = [("cam", "240p", 320, 240), ("cam~120p", "120p", 160, 120)]


@pytest.mark.timeout(120)
def test_a_url_source_is_published_in_renditions(relay: RelayProcess, tmp_path: Path) -> None:
    """A UDP MPEG-TS source with ``--renditions 320x240@400k,160x120@150k``: both streams
    go live at their own sizes, each meta announcing the set, their KEYs on the same
    source frames (identical capture times); the log shows the URL, never an error."""
    port = free_port(socket.SOCK_DGRAM)
    url = f"udp://127.0.0.1:{port}"
    log = tmp_path / "publisher.log"
    publisher = start_publisher(
        f"{relay.ws_url}/publish/cam",
        "--renditions",
        "320x240@400k,160x120@150k",
        "--source",
        url,
        "--fps",
        "25",
        "--preset",
        "ultrafast",
        log=log,
        output="stderr",
    )
    producer = producer_process(
        [f"{url}?pkt_size=1316"], "mpegts", 60 * GOP, str(tmp_path / "produced.jsonl")
    )
    watched = [Watched(stream) for stream, *_ in EXPECTED]

    async def scenario() -> None:
        async with watching(relay, watched):
            await wait_every_rendition(
                watched, lambda w: w.ready() and w.frames > 2 * GOP, publisher, log
            )

    try:
        run(scenario(), 100)
    finally:
        status = stop_publisher(publisher, 20, signal.SIGINT)
        producer.kill()
        producer.wait()
    output = log.read_text()
    assert status == 0, output
    assert "Traceback" not in output and "not a capture device" not in output, output
    assert url in output
    for viewer, (_, label, width, height) in zip(watched, EXPECTED, strict=True):
        meta = viewer.metas[-1]
        assert (meta["rendition"], meta["width"], meta["height"]) == (label, width, height)
        assert [entry["stream"] for entry in meta["renditions"]] == ["cam", "cam~120p"]
        assert sps_size(viewer.configs[0]) == (width, height)
    top, low = ({capture for _, capture, _ in w.keys} for w in watched)
    assert top & low, "no KEY on the same source frame in both renditions"
