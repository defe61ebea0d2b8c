"""``streamrelay-publish --renditions`` end to end: the real publisher process against the
real ``twistd streamrelay`` relay, watched by independent ``websockets`` viewers, one per
rendition stream (``cam``, ``cam~360p``, ``cam~180p``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import av
import pytest

from streamrelay.publisher.h264 import NAL_SPS, nal_type, parse_sps, split_annexb
from tests.support.publisher_process import start_publisher, stop_publisher
from tests.support.relay_process import RelayProcess
from tests.support.rendition_viewers import Watched, wait_every_rendition, watching
from tests.support.waiting import run, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.publisher_process]

RENDITIONS = "1280x720@2500k,640x360@800k,320x180@250k"
# (stream, label, width, height, bitrate), highest first: what the set must announce.
EXPECTED = [
    ("cam", "720p", 1280, 720, 2_500_000),
    ("cam~360p", "360p", 640, 360, 800_000),
    ("cam~180p", "180p", 320, 180, 250_000),
]


def start_renditions_publisher(relay: RelayProcess, log: Path) -> subprocess.Popen[bytes]:
    """The real command line, as a user runs it (stderr to ``log``)."""
    return start_publisher(
        f"{relay.ws_url}/publish/cam",
        "--renditions",
        RENDITIONS,
        "--fps",
        "15",
        "--preset",
        "ultrafast",
        # A GOP longer than the test: every KEY after the first ones is a forced one.
        "--keyframe-interval",
        "120s",
        log=log,
        output="stderr",
    )


def sps_size(config: bytes) -> tuple[int, int]:
    """Picture size from the SPS in a CONFIG payload."""
    sps = next(unit for unit in split_annexb(config) if nal_type(unit) == NAL_SPS)
    info = parse_sps(sps)
    return info.width, info.height


def decoded_size(config: bytes, key: bytes) -> tuple[int, int]:
    """Decode a KEY (after its CONFIG) with FFmpeg's H.264 decoder: the picture size."""
    decoder: Any = av.CodecContext.create("h264", "r")
    pictures = decoder.decode(av.Packet(config + key))
    pictures += decoder.decode(None)
    assert pictures, "the KEY did not decode"
    return pictures[0].width, pictures[0].height


@pytest.mark.timeout(120)
def test_three_renditions_are_live_aligned_and_announced(
    relay: RelayProcess, tmp_path: Path
) -> None:
    """``streamrelay-publish --renditions 1280x720@2500k,640x360@800k,320x180@250k``
    publishes three live streams, cam, cam~360p and cam~180p, each at its own size (SPS
    and a decoded KEY), each announcing the whole set in its meta with its own label and
    bitrate; their KEYs carry identical capture times, and a keyframe request from a viewer
    of one rendition yields a KEY with one and the same capture time in all three."""
    log = tmp_path / "publisher.log"
    publisher = start_renditions_publisher(relay, log)
    watched = [Watched(stream) for stream, *_ in EXPECTED]

    async def scenario() -> float:
        async with watching(relay, watched) as connections:
            await wait_every_rendition(watched, Watched.ready, publisher, log)
            # Past the first KEYs (one per connection opening), ask on the lowest rendition.
            await asyncio.sleep(1.5)
            asked = time.monotonic()
            await connections[2].send(json.dumps({"type": "keyframe-request"}))
            while not all(any(at > asked for at, *_ in w.keys) for w in watched):
                assert time.monotonic() < asked + 30, "no KEY after the keyframe request"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            return asked

    try:
        asked = run(scenario(), 100)
    finally:
        status = stop_publisher(publisher, 20, signal.SIGINT)
    output = log.read_text()
    assert status == 0, output
    assert "Traceback" not in output, output

    announced = [
        {"name": label, "stream": stream, "width": w, "height": h, "bitrate": bitrate}
        for stream, label, w, h, bitrate in EXPECTED
    ]
    codecs = {}
    for viewer, (_, label, width, height, bitrate) in zip(watched, EXPECTED, strict=True):
        assert "live" in viewer.statuses
        meta = viewer.metas[-1]
        assert (meta["rendition"], meta["bitrate"]) == (label, bitrate)
        assert (meta["width"], meta["height"]) == (width, height)
        assert [
            {k: v for k, v in entry.items() if k != "codec"} for entry in meta["renditions"]
        ] == announced
        codecs[label] = meta["codec"]
        assert sps_size(viewer.configs[0]) == (width, height)
        assert decoded_size(viewer.configs[0], viewer.keys[0][2]) == (width, height)
        assert viewer.frames > 10
    for viewer in watched:
        assert {e["name"]: e["codec"] for e in viewer.metas[-1]["renditions"]} == codecs

    # Every KEY from the moment all three streams had one is in all three, same capture
    # time (they are the same source frames).
    since = max(viewer.keys[0][1] for viewer in watched)
    key_times = [sorted({c for _, c, _ in v.keys if c >= since}) for v in watched]
    assert key_times[0] == key_times[1] == key_times[2], key_times
    requested = [min(c for at, c, _ in v.keys if at > asked) for v in watched]
    assert requested[0] == requested[1] == requested[2], requested
    assert requested[0] in key_times[0]
    wait_until(lambda: publisher.poll() is not None, 5)
